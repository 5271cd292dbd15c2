"""LoveDA: tools/prepare_loveda.py on fake official zips (and three real tiles), a 7-class run, its evaluation
and prediction."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from data.benchmarks import BENCHMARKS
from data.dataset import SegmentationFolder
from engine.cli import stage_main
from engine.handoff import handoff_meta, save_handoff
from models import NAPGNet
from tests.helpers import REPO
from tools import collect_results, evaluate, predict, prepare_loveda, run_pipeline
from utils.errors import run_cli

REAL = Path(__file__).parent / "data" / "real-samples" / "loveda"
LOVEDA = BENCHMARKS["loveda"]
SIZE = 64  # fake tiles (the real ones are 1024 px)


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _fake_zips(raw: Path, rng: np.random.Generator) -> dict[str, bytes]:
    """Train/Val/Test zips of both domains; the three real tiles sit in Train/Rural. Returns member -> bytes."""
    raw.mkdir(parents=True)
    members: dict[str, bytes] = {}
    for split, n in (("Train", 6), ("Val", 4), ("Test", 2)):
        for domain in ("Urban", "Rural"):
            for i in range(n):
                name = f"{split}/{domain}/images_png/{1000 * len(domain) + 10 * len(split) + i}.png"
                members[name] = _png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                if split != "Test":
                    members[name.replace("images_png", "masks_png")] = _png(
                        rng.integers(0, 8, (SIZE, SIZE), dtype=np.uint8))
    for path in sorted((REAL / "img_dir").iterdir()):
        members[f"Train/Rural/images_png/{path.name}"] = path.read_bytes()
        members[f"Train/Rural/masks_png/{path.name}"] = (REAL / "ann_dir" / path.name).read_bytes()
    for split in ("Train", "Val", "Test"):
        with zipfile.ZipFile(raw / f"{split}.zip", "w") as archive:
            for name, data in members.items():
                if name.startswith(f"{split}/"):
                    archive.writestr(name, data)  # Train.zip holds Train/Urban/images_png/..., as the official
    return members


@pytest.fixture(scope="module")
def loveda(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("loveda")
    members = _fake_zips(root / "raw", np.random.default_rng(0))
    assert run_cli(prepare_loveda.main, ["--raw", str(root / "raw"), "--out", str(root / "data")]) == 0
    return root, members


def test_each_domain_holds_the_zip_members_byte_for_byte(loveda):
    root, members = loveda
    for name, data in members.items():
        split, domain, kind, file = name.split("/")
        folder = root / "data" / f"loveda_{domain.lower()}" / ("img_dir" if kind == "images_png" else "ann_dir")
        assert (folder / split.lower() / file).read_bytes() == data, name
    for domain in ("urban", "rural"):
        meta = json.loads((root / "data" / f"loveda_{domain}" / "meta.json").read_text())
        assert meta["benchmark"] == "loveda" and meta["protocol"] == "standard"
        assert meta["counts"] == {"train": 6 + 3 * (domain == "rural"), "val": 4, "test": 2}
        assert not (root / "data" / f"loveda_{domain}" / "ann_dir" / "test").exists()


def test_masks_map_to_seven_train_ids_as_a_plain_reference_says(loveda):
    root, _ = loveda
    dataset = SegmentationFolder(root / "data" / "loveda_rural", "train")
    assert dataset.benchmark.name == "loveda" and dataset.benchmark.num_classes == 7
    for i, name in enumerate(dataset.names):
        raw = np.asarray(Image.open(root / "data" / "loveda_rural" / "ann_dir" / "train" / f"{name}.png"))
        reference = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # 0 no-data ignored, raw k -> k - 1
        assert np.array_equal(dataset[i]["label"].numpy(), reference), name
    real = [n for n in dataset.names if n in ("0", "1", "2")]
    counts = np.bincount(dataset[dataset.names.index("2")]["label"].numpy().ravel(), minlength=256)
    assert real == ["0", "1", "2"] and counts[5] == 914057  # forest (raw 6) of the real tile 2.png


def test_official_uda_adapts_on_val_and_says_transductive(loveda, tmp_path):
    root, _ = loveda
    assert run_cli(prepare_loveda.main, ["--raw", str(root / "raw"), "--out", str(tmp_path),
                                         "--protocol", "official-uda"]) == 0
    urban = tmp_path / "loveda_urban"
    assert sorted(p.name for p in (urban / "img_dir" / "train").iterdir()) == sorted(
        p.name for p in (urban / "img_dir" / "val").iterdir())
    assert not (urban / "ann_dir" / "train").exists()  # a target only: its adaptation images carry no labels
    assert "transductive" in json.loads((urban / "meta.json").read_text())["protocol"]


def test_evaluate_names_the_datas_protocol_and_official_uda_as_transductive(loveda, tmp_path, capsys):
    root, _ = loveda
    assert run_cli(prepare_loveda.main, ["--raw", str(root / "raw"), "--out", str(tmp_path / "uda"),
                                         "--protocol", "official-uda"]) == 0
    torch.manual_seed(0)
    meta = handoff_meta(stage="step0", source="loveda_rural", target="loveda_urban", num_classes=7,
                        backbone="resnet18", shared_similarity=True, clusters=None, bn_stats="shared",
                        normalize="unit", epoch=1, benchmark="loveda")
    checkpoint = tmp_path / "model.pt"
    save_handoff(checkpoint, NAPGNet(num_classes=7, backbone="resnet18"), None, None, None, meta)
    for data_root, said in ((root / "data", "standard"), (tmp_path / "uda", "official-uda (transductive)")):
        out = tmp_path / f"{data_root.name}.json"
        capsys.readouterr()
        assert run_cli(evaluate.main, ["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--domain",
                                       "loveda_urban", "--num-workers", "0", "--device", "cpu", "--json",
                                       str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"protocol standard, data protocol {said}, " in printed and "agriculture" in printed
        written = json.loads(out.read_text())
        assert written["data_protocol"] == said and written["protocol"] == "standard"
        assert len(written["classifier"]["iou"]) == 7


def test_bad_input_is_one_line_and_writes_nothing(loveda, tmp_path, capsys):
    root, _ = loveda
    assert run_cli(prepare_loveda.main, ["--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert run_cli(prepare_loveda.main, ["--raw", str(root / "raw"), "--out", str(root / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a folder" in err[0] and "--overwrite" in err[1]
    broken = tmp_path / "broken"
    broken.mkdir()
    with zipfile.ZipFile(broken / "Train.zip", "w") as archive:
        archive.writestr("Train/Urban/images_png/1.png", _png(np.zeros((8, 8, 3), np.uint8)))
        archive.writestr("Train/Urban/masks_png/1.png", _png(np.full((8, 8), 9, np.uint8)))
        archive.writestr("Val/Urban/images_png/2.png", _png(np.zeros((8, 8, 3), np.uint8)))
    assert run_cli(prepare_loveda.main, ["--raw", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "holds label 9" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_a_seven_class_pipeline_evaluates_and_predicts_in_lovedas_colours(loveda, synthetic_root, tmp_path, capsys):
    root, _ = loveda
    work = tmp_path / "runs"
    tiny = ["--config", str(REPO / "configs" / "loveda_rural2urban.yaml"), "--data-root", str(root / "data"),
            "--work-dir", str(work), "--backbone", "resnet18", "--pretrained", "null", "--resize", "64",
            "--img-size", "64", "--batch-size", "2", "--eval-batch-size", "4", "--epochs", "1",
            "--iters-per-epoch", "2", "--refresh-max-batches", "2", "--num-workers", "0", "--device", "cpu",
            "--progress", "false", "--tgt-proto-start", "1"]
    for stage in ("step0", "step1", "step2"):
        init = ["--init", str(work / "step0")] if stage == "step1" else []
        assert run_cli(lambda a, s=stage: stage_main(s, a), [*tiny, *init]) == 0, stage
    evaluation = json.loads((work / "step2" / "eval.json").read_text())
    assert evaluation["benchmark"] == "loveda" and evaluation["classes"] == list(LOVEDA.classes)
    assert len(evaluation["classifier"]["iou"]) == 7
    capsys.readouterr()
    assert run_cli(evaluate.main, ["--checkpoint", str(work / "step2"), "--data-root", str(root / "data"),
                                   "--domain", "loveda_urban", "--num-workers", "0", "--device", "cpu"]) == 0
    assert "agriculture" in capsys.readouterr().out
    # ISPRS data are refused: another class list.
    assert run_cli(evaluate.main, ["--checkpoint", str(work / "step2"), "--data-root", str(synthetic_root),
                                   "--domain", "vaihingen_irrg", "--num-workers", "0", "--device", "cpu"]) == 2
    assert "holds isprs labels" in capsys.readouterr().err
    tile = tmp_path / "tile.png"
    Image.open(REAL / "img_dir" / "0.png").crop((0, 0, 160, 128)).save(tile)
    assert run_cli(predict.main, ["--checkpoint", str(work / "step2"), "--input", str(tile), "--out",
                                  str(tmp_path / "pred"), "--crop", "64", "--stride", "48", "--device", "cpu"]) == 0
    with rasterio.open(tmp_path / "pred" / "tile_classes.tif") as got:
        assert got.tags(1)["class_6"] == "agriculture" and got.read(1).max() < 7
        assert got.colormap(1)[4][:3] == LOVEDA.palette[4]
    colours = np.asarray(Image.open(tmp_path / "pred" / "tile_color.png").convert("RGB")).reshape(-1, 3)
    assert {tuple(c) for c in np.unique(colours, axis=0)} <= set(LOVEDA.palette)


def test_the_tables_take_their_class_wording_from_the_benchmark(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for benchmark, classes in (("loveda", LOVEDA.classes), (None, BENCHMARKS["isprs"].classes)):
        run = tmp_path / (benchmark or "isprs")
        metrics = {k: float(rng.uniform(0.2, 0.9)) for k in ("miou", "miou_5", "mf1", "mf1_5", "oa")}
        metrics["iou"] = [float(v) for v in rng.uniform(0, 1, len(classes))]
        (run / "step0").mkdir(parents=True)
        (run / "step0" / "manifest.json").write_text(json.dumps({"stage": "step0", "source": "a", "target": "b"}))
        evaluation = {"split": "target-val", "classifier": metrics, **({"benchmark": benchmark} if benchmark else {})}
        (run / "step0" / "eval.json").write_text(json.dumps(evaluation))
        table = run_pipeline.results_table(run_pipeline.collect_results(run))
        assert run_cli(collect_results.main, [str(run), "--out", str(run / "table")]) == 0
        written = (run / "table" / "results.md").read_text()
        header = next(iter(csv.reader((run / "table" / "results.csv").open())))
        if benchmark == "loveda":  # no class is declared out of a mean: no "-N" column, and not a word of clutter
            assert "clutter" not in table + written and "-6" not in table + written and "miou_5_mean" not in header
            assert "protocol standard, classifier branch, 7 loveda classes;" in table
            assert "7 loveda classes" in written and "iou_agriculture_mean" in header
        else:
            assert table.splitlines()[0].split() == ["stage", "mIoU", "mF1", "OA", "mIoU-5", "mF1-5", "src", "mIoU"]
            assert "protocol mmseg, classifier branch, 6 classes incl. clutter; -5 = clutter excluded from the mean;" \
                in table and "-5 = clutter excluded from the mean" in written and "miou_5_mean" in header
    capsys.readouterr()
