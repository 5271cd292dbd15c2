"""Published ISPRS protocols: ``prepare_isprs.py --protocol st-dasegnet`` writes that project's patch lists."""

from __future__ import annotations

import io
import json
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.isprs import PALETTE, POTSDAM, PROTOCOLS, VAIHINGEN, crop_boxes, patch_name
from tools import prepare_isprs
from utils.errors import run_cli

LISTS = Path(__file__).parent / "data" / "protocols" / "st-dasegnet"


def _names(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _inside_reference(size: int, clip: int, stride: int) -> list[int]:
    origins, x = [], 0
    while x + clip <= size:
        origins.append(x)
        x += stride
    return origins


@pytest.mark.parametrize("size", [512, 513, 767, 768, 1919, 2569, 6000])
@pytest.mark.parametrize("stride", [256, 512])
def test_inside_grid_leaves_out_the_far_strip(size, stride):
    boxes = crop_boxes(size, 600, 512, "inside", stride)
    assert sorted({b[1] for b in boxes}) == _inside_reference(size, 512, stride)
    assert sorted({b[0] for b in boxes}) == _inside_reference(600, 512, stride)
    assert all(x1 <= 600 and y1 <= size for _, _, x1, y1 in boxes)


def _area_sizes() -> dict[str, tuple[int, int]]:
    """Width and height of each Vaihingen area that reproduce the published lists: the far patch edge plus
    less than a stride (the real areas' sizes are in that range; the lists say no more)."""
    far = defaultdict(lambda: [0, 0])
    for name in _names(LISTS / "Vaihingen_IRRG_DA" / "train.txt") | _names(LISTS / "Vaihingen_IRRG_DA" / "val.txt"):
        area, _, _, x1, y1 = name.split("_")
        far[area] = [max(far[area][0], int(x1)), max(far[area][1], int(y1))]
    return {area: (w + 100, h + 137) for area, (w, h) in far.items()}


def _tif(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF", compression="tiff_deflate")
    return buffer.getvalue()


def test_vaihingen_patches_and_split_are_st_dasegnets(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    with zipfile.ZipFile(raw / VAIHINGEN.image_zips["irrg"], "w") as images, \
            zipfile.ZipFile(raw / VAIHINGEN.label_zip, "w") as labels:
        for area, (w, h) in _area_sizes().items():
            images.writestr(VAIHINGEN.image_member_name("irrg", area), _tif(np.zeros((h, w, 3), np.uint8)))
            label = np.broadcast_to(np.asarray(PALETTE[1], np.uint8), (h, w, 3)).copy()
            labels.writestr(VAIHINGEN.label_member_name(area), _tif(label))
    out = tmp_path / "vaihingen_irrg"
    code = run_cli(prepare_isprs.main, ["--dataset", "vaihingen", "--bands", "irrg", "--raw", str(raw), "--out",
                                        str(out), "--protocol", "st-dasegnet"])
    assert code == 0, capsys.readouterr().err
    for split in ("train", "val"):
        written = {p.stem for p in (out / "img_dir" / split).iterdir()}
        assert written == _names(LISTS / "Vaihingen_IRRG_DA" / f"{split}.txt"), split
        assert written == {p.stem for p in (out / "ann_dir" / split).iterdir()}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["protocol"] == "st-dasegnet" and meta["counts"] == {"train": 1296, "val": 440}


def test_potsdam_patches_and_split_are_st_dasegnets():
    """A Potsdam tile is 6000 x 6000 px; the published names are those boxes, on mmseg's tile split."""
    proto = PROTOCOLS["st-dasegnet"]
    for split in ("train", "val"):
        published = _names(LISTS / "Potsdam_IRRG_DA" / f"{split}.txt")
        tiles = {"_".join(name.split("_")[:2]) for name in published}
        assert {proto.split_of(POTSDAM, tile) for tile in tiles} == {split}
        boxes = crop_boxes(6000, 6000, proto.clip, proto.grid["potsdam"], proto.stride["potsdam"])
        assert {patch_name(tile, box).removesuffix(".png") for tile in tiles for box in boxes} == published


def test_a_protocol_refuses_its_own_settings_changed(tmp_path, capsys):
    code = run_cli(prepare_isprs.main, ["--dataset", "vaihingen", "--bands", "irrg", "--raw", str(tmp_path),
                                        "--out", str(tmp_path / "out"), "--protocol", "st-dasegnet",
                                        "--stride", "128"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "drop --grid, --stride and --clip" in err
    assert not (tmp_path / "out").exists()
