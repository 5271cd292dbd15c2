"""ISPRS knowledge (crop grid, colour decoding) and tools/prepare_isprs.py end to end."""

import io
import json
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data.isprs import (
    NUM_CLASSES,
    PALETTE,
    POTSDAM,
    VAIHINGEN,
    crop_boxes,
    decode_label,
    patch_name,
    raw_to_train_ids,
)
from tools import prepare_isprs
from utils.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
PALETTE_INDEX = {colour: raw_id for raw_id, colour in enumerate(PALETTE)}


# ---------------------------------------------------------------- references (plain formulas)

def mmseg_boxes_reference(h, w, clip, stride):
    """MMSegmentation's clip_big_image box formula, written out with its meshgrid, then deduplicated."""
    rows = int(np.ceil((h - clip) / stride))
    rows = rows if rows * stride + clip >= h else rows + 1
    cols = int(np.ceil((w - clip) / stride))
    cols = cols if cols * stride + clip >= w else cols + 1
    x, y = np.meshgrid(np.arange(cols + 1), np.arange(rows + 1))
    xmin, ymin = (x * clip).ravel(), (y * clip).ravel()
    xmin = xmin + np.where(xmin + clip > w, w - xmin - clip, 0)
    ymin = ymin + np.where(ymin + clip > h, h - ymin - clip, 0)
    boxes = []
    for x0, y0 in zip(xmin.tolist(), ymin.tolist()):
        if (x0, y0, x0 + clip, y0 + clip) not in boxes:
            boxes.append((x0, y0, x0 + clip, y0 + clip))
    return boxes


def mmseg_decode_reference(label_bgr):
    """The converters' loop: weighted sum of B, G, R with weights 2, 3, 4, compared per palette colour."""
    h, w, c = label_bgr.shape
    flat = label_bgr.reshape(-1, c).astype(np.int64) @ np.array([2, 3, 4]).reshape(3, 1)
    out = np.zeros_like(flat)
    for raw_id, rgb in enumerate(PALETTE):
        out[flat == np.dot(rgb[::-1], [2, 3, 4])] = raw_id
    return out.reshape(h, w).astype(np.uint8)


def exact_decode_reference(label_rgb):
    """Exact RGB match with each palette colour, anything else 0."""
    ids = np.zeros(label_rgb.shape[:2], dtype=np.uint8)
    for raw_id, rgb in enumerate(PALETTE):
        ids[np.all(label_rgb == rgb, axis=-1)] = raw_id
    return ids


def read_png(path):
    return np.array(Image.open(path))


def read_tif(raw_dir, member):
    """A TIFF from the zips of ``raw_dir`` via Pillow (independent of the tool's cv2 reader), as RGB."""
    for zip_path in raw_dir.glob("*.zip"):
        with zipfile.ZipFile(zip_path) as archive:
            if member in archive.namelist():
                return np.array(Image.open(io.BytesIO(archive.read(member))).convert("RGB"))
    raise FileNotFoundError(member)


def tif_bytes(rgb):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="TIFF")
    return buffer.getvalue()


def write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def random_label_rgb(rng, h, w):
    return np.asarray(PALETTE, dtype=np.uint8)[rng.integers(1, 7, size=(h // 8 + 1, w // 8 + 1))].repeat(
        8, 0
    ).repeat(8, 1)[:h, :w]


def tiny_potsdam(raw, tiles, rng, size=(300, 280), label_size=None):
    """Potsdam-like raw folder: RGB zip + noBoundary label zip with random images and blocky labels."""
    raw.mkdir(parents=True, exist_ok=True)
    images, labels, arrays = {}, {}, {}
    for tile in tiles:
        w, h = size
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        lw, lh = label_size or size
        label = random_label_rgb(rng, lh, lw)
        images[POTSDAM.image_member_name("rgb", tile)] = tif_bytes(rgb)
        labels[POTSDAM.label_member_name(tile)] = tif_bytes(label)
        arrays[tile] = (rgb, label)
    write_zip(raw / POTSDAM.image_zips["rgb"], images)
    write_zip(raw / POTSDAM.label_zip, labels)
    return arrays


def run_tool(capsys, *args):
    code = run_cli(prepare_isprs.main, [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- crop grid, names, decoding

@pytest.mark.parametrize("stride", [128, 256, 512, 700])
@pytest.mark.parametrize("size", [(512, 512), (513, 900), (1024, 1200), (2000, 2557), (6000, 6000)])
def test_mmseg_grid_equals_the_converters_formula(size, stride):
    h, w = size
    assert crop_boxes(h, w, 512, "mmseg", stride) == mmseg_boxes_reference(h, w, 512, stride)


def test_mmseg_grid_on_a_potsdam_tile_is_12_by_12_with_a_snapped_edge():
    boxes = crop_boxes(6000, 6000, 512, "mmseg", 256)
    origins = sorted({b[0] for b in boxes})
    assert len(boxes) == 144
    assert origins == list(range(0, 5121, 512)) + [5488]
    assert all(x1 - x0 == 512 and y1 - y0 == 512 and x1 <= 6000 and y1 <= 6000 for x0, y0, x1, y1 in boxes)
    # For any stride <= clip the result does not depend on the stride.
    assert crop_boxes(6000, 6000, 512, "mmseg", 100) == boxes


@pytest.mark.parametrize("h,w,clip,stride", [(600, 700, 256, 128), (512, 512, 512, 256), (1000, 777, 300, 170)])
def test_sliding_grid_covers_the_tile_with_the_given_stride(h, w, clip, stride):
    boxes = crop_boxes(h, w, clip, "sliding", stride)
    expected = []
    for y in sorted(set(list(range(0, h - clip + 1, stride)) + [h - clip])):
        for x in sorted(set(list(range(0, w - clip + 1, stride)) + [w - clip])):
            expected.append((x, y, x + clip, y + clip))
    assert boxes == expected
    covered = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_crop_boxes_rejects_a_tile_smaller_than_the_crop():
    with pytest.raises(ValueError, match="smaller"):
        crop_boxes(500, 900, 512)


def test_patch_names_follow_mmseg():
    assert patch_name("2_10", (0, 0, 512, 512)) == "2_10_0_0_512_512.png"
    assert patch_name("area1", (388, 0, 900, 512)) == "area1_388_0_900_512.png"


def test_decode_label_matches_mmseg_and_strict_matching():
    rng = np.random.default_rng(0)
    rgb = np.asarray(PALETTE, dtype=np.uint8)[rng.integers(0, 7, size=(40, 50))]
    noisy = rng.random((40, 50)) < 0.2
    rgb[noisy] = rng.integers(0, 256, size=(int(noisy.sum()), 3))
    rgb[0, :4] = [(252, 255, 0), (0, 170, 255), (255, 255, 254), (255, 0, 0)]
    bgr = rgb[..., ::-1].copy()
    ids, off = decode_label(bgr)
    strict_ids, strict_off = decode_label(bgr, strict=True)
    assert np.array_equal(ids, mmseg_decode_reference(bgr))
    assert np.array_equal(strict_ids, exact_decode_reference(rgb))
    exact = np.array([[tuple(px) in PALETTE_INDEX for px in row] for row in rgb.tolist()])
    assert off == strict_off == int((~exact).sum())
    # (0,170,255) has the weighted sum of red (clutter): mmseg calls it clutter, strict calls it boundary.
    assert ids[0, 1] == 6 and strict_ids[0, 1] == 0
    assert ids[0, 0] == 0 and ids[0, 3] == 6


def test_raw_to_train_ids_reduces_zero_label():
    raw = np.arange(8, dtype=np.uint8)
    assert raw_to_train_ids(raw).tolist() == [255, 0, 1, 2, 3, 4, 5, 255]


# ---------------------------------------------------------------- end to end on the synthetic raw data

@pytest.fixture(scope="module")
def prepared(synthetic_raw, tmp_path_factory):
    """Run the tool once per domain (and once with train ids); keeps output, stdout and stderr."""
    out = tmp_path_factory.mktemp("prepared")
    runs = {}
    for name, dataset, bands, extra in [
        ("potsdam_rgb", "potsdam", "rgb", []),
        ("potsdam_irrg", "potsdam", "irrg", []),
        ("vaihingen_irrg", "vaihingen", "irrg", []),
        ("potsdam_rgb_ids", "potsdam", "rgb", ["--label-format", "train_ids"]),
        ("potsdam_irrg_full", "potsdam", "irrg", ["--labels", "full"]),
        ("vaihingen_irrg_full", "vaihingen", "irrg", ["--labels", "full"]),
    ]:
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["--dataset", dataset, "--bands", bands, "--raw", str(synthetic_raw[dataset]),
                "--out", str(out / name), *extra]
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = run_cli(prepare_isprs.main, argv)
        assert code == 0, stderr.getvalue()
        runs[name] = (out / name, stdout.getvalue(), stderr.getvalue())
    return runs


def tile_sizes(raw_dir, spec, bands, tiles):
    return {t: read_tif(raw_dir, spec.image_member_name(bands, t)).shape[:2] for t in tiles}


@pytest.mark.parametrize("name,spec,bands", [("potsdam_rgb", POTSDAM, "rgb"), ("potsdam_irrg", POTSDAM, "irrg"),
                                             ("vaihingen_irrg", VAIHINGEN, "irrg")])
def test_names_and_counts_follow_the_grid(prepared, synthetic_raw, name, spec, bands):
    out, _, _ = prepared[name]
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        sizes = tile_sizes(synthetic_raw[spec.name], spec, bands, meta["splits"][split])
        expected = {patch_name(t, b) for t, (h, w) in sizes.items() for b in crop_boxes(h, w, 512, "mmseg", 256)}
        assert {p.name for p in (out / "img_dir" / split).iterdir()} == expected
        assert {p.name for p in (out / "ann_dir" / split).iterdir()} == expected
        assert meta["counts"][split] == len(expected)
        for tile, (h, w) in sizes.items():
            # Tiles are not multiples of 512, so the last patch is snapped to the bottom-right corner.
            assert w % 512 and h % 512 and f"{tile}_{w - 512}_{h - 512}_{w}_{h}.png" in expected


@pytest.mark.parametrize("name,spec,bands", [("potsdam_rgb", POTSDAM, "rgb"), ("potsdam_irrg", POTSDAM, "irrg"),
                                             ("vaihingen_irrg", VAIHINGEN, "irrg")])
def test_patches_equal_crops_of_the_tifs(prepared, synthetic_raw, name, spec, bands):
    out, _, _ = prepared[name]
    raw = synthetic_raw[spec.name]
    meta = json.loads((out / "meta.json").read_text())
    for split, tile in (("train", meta["splits"]["train"][0]), ("val", meta["splits"]["val"][0])):
        image = read_tif(raw, spec.image_member_name(bands, tile))
        label = exact_decode_reference(read_tif(raw, spec.label_member_name(tile)))
        h, w = image.shape[:2]
        for box in (crop_boxes(h, w)[0], crop_boxes(h, w)[-1]):
            x0, y0, x1, y1 = box
            patch = patch_name(tile, box)
            assert np.array_equal(read_png(out / "img_dir" / split / patch), image[y0:y1, x0:x1])
            assert np.array_equal(read_png(out / "ann_dir" / split / patch), label[y0:y1, x0:x1])


def test_train_ids_format_maps_boundary_to_255(prepared):
    raw_out, ids_out = prepared["potsdam_rgb"][0], prepared["potsdam_rgb_ids"][0]
    for path in sorted((raw_out / "ann_dir" / "train").iterdir())[:3]:
        raw = read_png(path)
        ids = read_png(ids_out / "ann_dir" / "train" / path.name)
        assert 0 in raw and 255 in ids
        assert np.array_equal(ids, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    ids_meta = json.loads((ids_out / "meta.json").read_text())
    assert ids_meta["label_format"] == "train_ids" and ids_meta["label_values"]["train"][-1] == 255
    assert NUM_CLASSES not in ids_meta["label_values"]["train"]  # a 6 is clutter in mmseg_raw only


def test_meta_json_describes_the_output(prepared):
    meta = json.loads((prepared["potsdam_irrg"][0] / "meta.json").read_text())
    assert meta["dataset"] == "potsdam" and meta["domain"] == "potsdam_irrg"
    assert meta["bands"] == ["NIR", "R", "G"] and meta["gsd_m"] == 0.05
    assert (meta["label_format"], meta["clip"], meta["grid"], meta["stride"], meta["scale"]) == (
        "mmseg_raw", 512, "mmseg", 256, 1.0)
    assert meta["splits"] == {"train": ["2_10", "2_11"], "val": ["2_13"]}
    assert meta["off_palette_pixels"] == 0 and meta["synthetic"] is True
    assert meta["tool"] == "prepare_isprs" and meta["version"]
    vaihingen = json.loads((prepared["vaihingen_irrg"][0] / "meta.json").read_text())
    assert vaihingen["splits"] == {"train": ["area1", "area3"], "val": ["area2"]}
    assert vaihingen["gsd_m"] == 0.09 and vaihingen["bands"] == ["NIR", "R", "G"]
    hist = meta["label_histogram"]["train"]
    assert sum(hist.values()) == meta["counts"]["train"] * 512 * 512 and hist["boundary"] > 0
    # The values the label files hold, which the data checks read instead of decoding them.
    for split in ("train", "val"):
        stored = set().union(*(np.unique(read_png(p)).tolist()
                               for p in (prepared["potsdam_irrg"][0] / "ann_dir" / split).iterdir()))
        assert meta["label_values"][split] == sorted(stored)


@pytest.mark.parametrize("name", ["potsdam_irrg", "vaihingen_irrg"])
def test_full_labels_have_no_boundary_and_agree_with_the_eroded_ones(prepared, name):
    eroded, full = prepared[name][0], prepared[f"{name}_full"][0]
    meta, meta_full = (json.loads((d / "meta.json").read_text()) for d in (eroded, full))
    assert (meta["labels"], meta_full["labels"]) == ("eroded", "full")
    differ = ("labels", "label_histogram", "label_values")
    assert {k: v for k, v in meta_full.items() if k not in differ} == {k: v for k, v in meta.items() if k not in differ}
    for split in ("train", "val"):
        assert meta_full["label_histogram"][split]["boundary"] == 0 < meta["label_histogram"][split]["boundary"]
        assert meta["label_values"][split] == [0, *meta_full["label_values"][split]]
        names = sorted(p.relative_to(eroded) for p in eroded.rglob("*.png"))
        assert names == sorted(p.relative_to(full) for p in full.rglob("*.png"))
    for path in sorted((eroded / "ann_dir" / "train").iterdir())[:3]:
        a, b = read_png(path), read_png(full / "ann_dir" / "train" / path.name)
        assert 0 in a and 0 not in b and np.array_equal(a[a > 0], b[a > 0])
        assert np.array_equal(read_png(eroded / "img_dir" / "train" / path.name),
                              read_png(full / "img_dir" / "train" / path.name))


def test_full_labels_need_the_complete_ground_truth_zip(synthetic_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for zip_path in synthetic_raw["vaihingen"].glob("*.zip"):
        if zip_path.name != VAIHINGEN.label_zip_name("full"):
            (raw / zip_path.name).symlink_to(zip_path)
    code, _, err = run_tool(capsys, "--dataset", "vaihingen", "--bands", "irrg", "--raw", raw, "--out",
                            tmp_path / "out", "--labels", "full")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip" in err


@pytest.mark.slow
def test_legacy_step1_runs_on_full_labels_and_refuses_eroded_ones(prepared, tmp_path):
    from tests.helpers import run_step, tiny_args

    root = prepared["potsdam_irrg_full"][0].parent
    legacy = ("--preset", "legacy", "--epochs", "1", "--iters-per-epoch", "1", "--refresh-max-batches", "2",
              "--eval-max-batches", "1")
    proc = run_step("step1", tiny_args(root, tmp_path / "full", *legacy, "--source", "potsdam_irrg_full"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (tmp_path / "full" / "step1" / "config.yaml").read_text()
    assert "kmeans_backend: sklearn" in config and "legacy_epoch_length: true" in config
    refused = run_step("step1", tiny_args(root, tmp_path / "eroded", *legacy, "--source", "potsdam_irrg"))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "--labels full" in refused.stderr and "--proto-ignore-index true" in refused.stderr
    assert not (tmp_path / "eroded").exists()


def test_progress_bar_summary_and_area9_note(prepared):
    _, out, err = prepared["vaihingen_irrg"]
    assert "prepare vaihingen_irrg" in err and "100%" in err
    assert "area9" in err
    lines = out.strip().splitlines()
    assert lines[0].startswith("vaihingen_irrg train: 2 tiles") and "building=" in lines[0]
    assert lines[1].startswith("vaihingen_irrg val: 1 tiles")


def test_extracted_folder_gives_identical_files(synthetic_raw, prepared, tmp_path, capsys):
    extracted = tmp_path / "extracted"
    for zip_path in synthetic_raw["potsdam"].glob("*.zip"):
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(extracted / zip_path.stem)
    code, _, err = run_tool(capsys, "--dataset", "potsdam", "--bands", "rgb", "--raw", extracted,
                            "--out", tmp_path / "out")
    assert code == 0, err
    reference = prepared["potsdam_rgb"][0]
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.png"))
    assert all((reference / f).read_bytes() == (tmp_path / "out" / f).read_bytes() for f in files)


# ---------------------------------------------------------------- options on tiny hand-made tiles

def test_workers_give_identical_output(tmp_path, capsys):
    tiny_potsdam(tmp_path / "raw", ["2_10", "2_11", "2_13"], np.random.default_rng(1))
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        code, _, err = run_tool(capsys, "--dataset", "potsdam", "--bands", "rgb", "--raw", tmp_path / "raw",
                                "--out", out, "--clip", 256, "--workers", workers)
        assert code == 0, err
        outputs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")})
    assert len(outputs[0]) == 3 * 4 * 2 and outputs[0] == outputs[1]


def test_off_palette_colours_mmseg_versus_strict(tmp_path, capsys):
    rng = np.random.default_rng(2)
    raw = tmp_path / "raw"
    arrays = tiny_potsdam(raw, ["2_10"], rng, size=(256, 256))
    image, label = arrays["2_10"]
    label[:10, :10] = (0, 170, 255)  # weighted sum of clutter red
    label[20:25, :10] = (252, 255, 0)  # the real data's off-yellow: matches nothing
    write_zip(raw / POTSDAM.label_zip, {POTSDAM.label_member_name("2_10"): tif_bytes(label)})
    results = {}
    for flag in ([], ["--strict-colors"]):
        out = tmp_path / f"out{len(flag)}"
        code, _, err = run_tool(capsys, "--dataset", "potsdam", "--bands", "rgb", "--raw", raw, "--out", out,
                                "--clip", 256, *flag)
        assert code == 0, err
        results[bool(flag)] = (read_png(out / "ann_dir" / "train" / "2_10_0_0_256_256.png"),
                               json.loads((out / "meta.json").read_text()))
    mmseg_ids, mmseg_meta = results[False]
    strict_ids, strict_meta = results[True]
    assert np.array_equal(mmseg_ids, mmseg_decode_reference(label[..., ::-1].copy()))
    assert np.array_equal(strict_ids, exact_decode_reference(label))
    assert (mmseg_ids[:10, :10] == 6).all() and (strict_ids[:10, :10] == 0).all()
    assert (mmseg_ids[20:25, :10] == 0).all()
    assert mmseg_meta["off_palette_pixels"] == strict_meta["off_palette_pixels"] == 150
    assert (mmseg_meta["color_decoding"], strict_meta["color_decoding"]) == ("mmseg", "strict")


def test_target_gsd_resamples_before_cropping(tmp_path, capsys):
    raw = tmp_path / "raw"
    arrays = tiny_potsdam(raw, ["2_10"], np.random.default_rng(3), size=(1000, 950))
    code, _, err = run_tool(capsys, "--dataset", "potsdam", "--bands", "rgb", "--raw", raw,
                            "--out", tmp_path / "out", "--target-gsd", 0.09)
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["gsd_m"] == 0.09 and meta["scale"] == pytest.approx(5 / 9) and meta["domain"] == "potsdam_rgb_9cm"
    image, label = arrays["2_10"]
    size = (round(1000 * 5 / 9), round(950 * 5 / 9))
    small_image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    small_label = cv2.resize(exact_decode_reference(label), size, interpolation=cv2.INTER_NEAREST)
    boxes = crop_boxes(size[1], size[0])
    assert meta["counts"]["train"] == len(boxes) == 4
    x0, y0, x1, y1 = boxes[-1]
    name = patch_name("2_10", boxes[-1])
    assert np.array_equal(read_png(tmp_path / "out" / "img_dir" / "train" / name), small_image[y0:y1, x0:x1])
    assert np.array_equal(read_png(tmp_path / "out" / "ann_dir" / "train" / name), small_label[y0:y1, x0:x1])


def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    tiny_potsdam(tmp_path / "raw", ["2_10"], np.random.default_rng(4))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["--dataset", "potsdam", "--bands", "rgb", "--raw", tmp_path / "raw", "--out", out, "--clip", 256]
    code, _, err = run_tool(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert (out / "old.txt").exists()
    code, _, err = run_tool(capsys, *args, "--overwrite")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


# ---------------------------------------------------------------- user errors: exit 2, one line, nothing written

def _bad_zip_member(raw, member):
    tiny_potsdam(raw, ["2_10"], np.random.default_rng(5))
    with zipfile.ZipFile(raw / POTSDAM.image_zips["rgb"], "a") as archive:
        archive.writestr(member, b"x")


def _unpaired_image(raw):
    tiny_potsdam(raw, ["2_10", "2_11"], np.random.default_rng(6))
    with zipfile.ZipFile(raw / POTSDAM.label_zip) as archive:
        keep = {n: archive.read(n) for n in archive.namelist() if "2_11" not in n}
    write_zip(raw / POTSDAM.label_zip, keep)


def _unpaired_label(raw):
    tiny_potsdam(raw, ["2_10"], np.random.default_rng(7))
    with zipfile.ZipFile(raw / POTSDAM.label_zip, "a") as archive:
        archive.writestr(POTSDAM.label_member_name("2_11"), b"x")


def _size_mismatch(raw):
    tiny_potsdam(raw, ["2_10", "2_11"], np.random.default_rng(8), size=(300, 280), label_size=(300, 290))


def _empty_zip(raw):
    tiny_potsdam(raw, ["2_10"], np.random.default_rng(9))
    write_zip(raw / POTSDAM.image_zips["rgb"], {"readme.txt": b"nothing here"})


@pytest.mark.parametrize("make_raw,expected", [
    (lambda raw: None, "does not exist"),
    (_empty_zip, "2_Ortho_RGB.zip holds no member"),
    (lambda raw: _bad_zip_member(raw, "../x.tif"), "'../x.tif'"),
    (lambda raw: _bad_zip_member(raw, "/abs/top_potsdam_2_12_RGB.tif"), "leaves its folder"),
    (_unpaired_image, "no label for image tile(s) 2_11"),
    (_unpaired_label, "no image for label tile(s) 2_11"),
    (_size_mismatch, "does not belong"),
])
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, make_raw, expected):
    raw = tmp_path / "raw"
    make_raw(raw)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = run_tool(capsys, "--dataset", "potsdam", "--bands", "rgb", "--raw", raw,
                              "--out", tmp_path / "parent" / "out", "--clip", 256)
    assert code == 2
    lines = err.split("\n")
    # A failure inside a tile erases the progress bar with carriage returns: one visible line remains.
    assert len(lines) == 2 and lines[1] == "" and "\n" not in lines[0], err
    assert lines[0].split("\r")[-1].startswith("error: ") and expected in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_vaihingen_has_no_rgb(tmp_path, capsys):
    code, _, err = run_tool(capsys, "--dataset", "vaihingen", "--bands", "rgb", "--raw", tmp_path,
                            "--out", tmp_path / "out")
    assert code == 2 and "irrg" in err and not (tmp_path / "out").exists()


def test_script_entry_point_reports_user_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/prepare_isprs.py", "--dataset", "potsdam", "--bands", "rgb",
         "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: raw folder") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
