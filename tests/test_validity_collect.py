"""tools/validity.py --collect: studies of other training seeds joined into one, and what is refused."""

from __future__ import annotations

import json

import pytest

from tools import validity
from utils.errors import UserError


def _scores(miou: float) -> dict:
    return {"miou": miou, "mf1": miou, "iou": [miou] * 6}


def _study(seeds: list[int], methods=("source_only", "source_only_bn", "napg"), budget: int = 40) -> dict:
    """A validity.json as the study writes it, with made-up scores: method i of seed s scores (10s + i) %."""
    runs, warm, seconds = {}, {}, {}
    for s in seeds:
        runs[str(s)] = {m: {"target_val": _scores((10 * s + i) / 100),
                            "target_val_recalibrated": _scores((10 * s + i + 1) / 100),
                            "source_val": _scores(0.5),
                            "curve": [{"iteration": budget, "target_val_miou": (10 * s + i) / 100,
                                       "source_val_miou": 0.5}]}
                        for i, m in enumerate(methods)}
        warm[str(s)] = {"run": f"warm{s}", "target_val": _scores(0.1), "source_val": _scores(0.4)}
        seconds[str(s)] = {m: 1.0 for m in methods}
    return {"data_seed": 1, "size": "small", "config": "configs/validity.yaml", "extra_flags": [],
            "methods": list(methods), "warm_start": warm, "runs": runs, "seconds": seconds,
            "budget": {"iterations": budget}, "colour_classifier": {"source_val": 50.0, "target_val": 10.0}}


def _write(folder, study: dict):
    folder.mkdir()
    (folder / "validity.json").write_text(json.dumps(study))
    return str(folder)


def test_studies_of_other_seeds_join_into_the_study_of_all_seeds(tmp_path, capsys):
    a, b = _write(tmp_path / "a", _study([2])), _write(tmp_path / "b", _study([0, 1]))
    assert validity.main(["--collect", a, b, "--out", str(tmp_path / "all")]) == 0
    joined = json.loads((tmp_path / "all" / "validity.json").read_text())
    assert joined == {**_study([0, 1, 2]), "methods": list(validity.methods_of(joined))}
    assert list(joined["runs"]) == ["0", "1", "2"]  # seeds in order, whatever the order of the folders
    # The table: NAPG (method 2) scores 2, 12 and 22 % on seeds 0, 1, 2; source only 0, 10, 20: +2 each seed.
    napg = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("NAPG step 2"))
    assert "12.00 ± 10.00" in napg and "2.0 12.0 22.0" in napg and "+2.00 ± 0.00" in napg
    # validity.md: the same row as a Markdown table (recalibrated: 3, 13, 23 %; AdaBN is method 1)
    row = next(line for line in (tmp_path / "all" / "validity.md").read_text().splitlines()
               if line.startswith("| NAPG step 2"))
    assert row.split(" | ")[1:] == ["12.00 ± 10.00", "13.00 ± 10.00", "2.0 12.0 22.0", "+2.00 ± 0.00",
                                    "+1.00 ± 0.00", "50.00 ± 0.00 |"]


def test_only_other_seeds_of_one_study_are_joined(tmp_path):
    base = _write(tmp_path / "base", _study([0]))
    longer = _write(tmp_path / "longer", _study([1], budget=80))
    with pytest.raises(UserError, match="differ in budget"):
        validity.main(["--collect", base, longer, "--out", str(tmp_path / "x")])
    other_size = _write(tmp_path / "other_size", {**_study([1]), "resize": 128})  # base: written before 'resize'
    with pytest.raises(UserError, match="differ in resize"):
        validity.main(["--collect", base, other_size, "--out", str(tmp_path / "x")])
    same_seed = _write(tmp_path / "same", _study([0]))
    with pytest.raises(UserError, match="training seed 0 is in more than one study"):
        validity.main(["--collect", base, same_seed, "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="no validity.json there"):
        validity.main(["--collect", base, str(tmp_path), "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="only the study folders"):
        validity.main(["--collect", base, "--seeds", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--data-seed and --seeds are required"):
        validity.main(["--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
