"""The synthetic ISPRS-like data set: official structure, GSD, labels, determinism and a real domain gap."""

import dataclasses
import io
import json
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from data.isprs import PALETTE, POTSDAM, SYNTHETIC_MARKER, VAIHINGEN, crop_boxes
from data.synthetic import SIZES, make_synthetic
from data.synthetic.calibration import CLASS_SHARES, DOMAIN_BANDS, target_colour_means
from data.synthetic.colour_baseline import colour_classifier_scores
from data.synthetic.downloads import EROSION_RADIUS_PX, TILE_IDS, erode_labels
from data.synthetic.pair import SOURCE, SOURCE_LOOK, TARGET, TARGET_LOOK, make_tile, target_look
from tests.helpers import REAL_SAMPLES
from tools import make_synthetic as make_synthetic_tool
from utils.errors import UserError, run_cli


def zip_members(path):
    with zipfile.ZipFile(path) as archive:
        return set(archive.namelist())


def read_member(path, member):
    with zipfile.ZipFile(path) as archive:
        return np.array(Image.open(io.BytesIO(archive.read(member))).convert("RGB"))


def rgb_to_ids(rgb):
    ids = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    for raw_id, colour in enumerate(PALETTE):
        ids[np.all(rgb == colour, axis=-1)] = raw_id
    return ids


def test_raw_mode_writes_the_official_zips(synthetic_raw):
    potsdam, vaihingen = synthetic_raw["potsdam"], synthetic_raw["vaihingen"]
    assert {p.name for p in potsdam.iterdir()} == {
        "2_Ortho_RGB.zip", "3_Ortho_IRRG.zip", "5_Labels_all_noBoundary.zip", "5_Labels_all.zip", SYNTHETIC_MARKER}
    assert {p.name for p in vaihingen.iterdir()} == {
        "ISPRS_semantic_labeling_Vaihingen.zip", "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", SYNTHETIC_MARKER}
    tiles = ("2_10", "2_11", "2_13")
    assert {f"2_Ortho_RGB/top_potsdam_{t}_RGB.tif" for t in tiles} < zip_members(potsdam / "2_Ortho_RGB.zip")
    assert "2_Ortho_RGB/top_potsdam_2_10_RGB.tfw" in zip_members(potsdam / "2_Ortho_RGB.zip")
    assert {f"3_Ortho_IRRG/top_potsdam_{t}_IRRG.tif" for t in tiles} < zip_members(potsdam / "3_Ortho_IRRG.zip")
    assert zip_members(potsdam / POTSDAM.label_zip) == {f"top_potsdam_{t}_label_noBoundary.tif" for t in tiles}
    images = zip_members(vaihingen / VAIHINGEN.image_zips["irrg"])
    assert {f"top/top_mosaic_09cm_area{n}.tif" for n in (1, 3, 2)} < images
    assert "gts_for_participants/top_mosaic_09cm_area1.tif" in images
    assert zip_members(vaihingen / VAIHINGEN.label_zip) == {
        f"top_mosaic_09cm_area{n}_noBoundary.tif" for n in (1, 3, 2, 9)}
    # the complete ground truth, with the official names
    assert zip_members(potsdam / POTSDAM.label_zip_name("full")) == {f"top_potsdam_{t}_label.tif" for t in tiles}
    assert zip_members(vaihingen / VAIHINGEN.label_zip_name("full")) == {
        f"top_mosaic_09cm_area{n}.tif" for n in (1, 3, 2)}
    assert json.loads((potsdam / SYNTHETIC_MARKER).read_text())["seed"] == 0


def test_tiles_have_domain_sizes_and_consistent_bands(synthetic_raw):
    rgb = read_member(synthetic_raw["potsdam"] / "2_Ortho_RGB.zip", "2_Ortho_RGB/top_potsdam_2_10_RGB.tif")
    irrg = read_member(synthetic_raw["potsdam"] / "3_Ortho_IRRG.zip", "3_Ortho_IRRG/top_potsdam_2_10_IRRG.tif")
    assert rgb.shape == irrg.shape == (1200, 1200, 3)
    # RGB holds (R, G, B), IRRG holds (NIR, R, G): the shared bands must be the same pixels.
    assert np.array_equal(rgb[..., 0], irrg[..., 1]) and np.array_equal(rgb[..., 1], irrg[..., 2])
    images = synthetic_raw["vaihingen"] / VAIHINGEN.image_zips["irrg"]
    for n in (1, 3, 2):
        tile = read_member(images, f"top/top_mosaic_09cm_area{n}.tif")
        h, w, _ = tile.shape
        assert abs(h - 700) <= 40 and abs(w - 900) <= 40 and h % 512 and w % 512


def erode_reference(ids, radius):
    """Loop over the disk of offsets: a pixel is boundary if any pixel within ``radius`` differs."""
    h, w = ids.shape
    border = np.zeros((h, w), dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            for y in range(max(0, -dy), min(h, h - dy)):
                for x in range(max(0, -dx), min(w, w - dx)):
                    border[y, x] |= ids[y + dy, x + dx] != ids[y, x]
    return np.where(border, 0, ids)


def test_erosion_matches_a_plain_reference_and_the_written_labels(synthetic_raw):
    rng = np.random.default_rng(0)
    ids = np.ones((24, 30), dtype=np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, 20), rng.integers(0, 26)
        ids[y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = rng.integers(1, 7)
    assert np.array_equal(erode_labels(ids, 3), erode_reference(ids, 3))
    folder = synthetic_raw["vaihingen"]
    full = rgb_to_ids(read_member(folder / VAIHINGEN.image_zips["irrg"],
                                  "gts_for_participants/top_mosaic_09cm_area1.tif"))
    eroded = rgb_to_ids(read_member(folder / VAIHINGEN.label_zip, "top_mosaic_09cm_area1_noBoundary.tif"))
    assert set(np.unique(full)) <= set(range(1, 7)) and 0 in eroded
    assert np.array_equal(eroded, erode_labels(full, EROSION_RADIUS_PX))


def test_tiles_are_deterministic_by_seed():
    small = dataclasses.replace(TARGET, tile_px=(160, 200), tile_jitter_px=0)
    first, again, other = (make_tile(small, "area1", seed) for seed in (0, 0, 1))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[0].shape == (160, 200, 4) and first[1].shape == (160, 200)
    assert not np.array_equal(first[0], other[0])


def median_car_area(labels, car=5):
    areas = []
    for ids in labels:
        _, _, stats, _ = cv2.connectedComponentsWithStats((ids == car).astype(np.uint8), connectivity=4)
        areas += stats[1:, cv2.CC_STAT_AREA].tolist()
    return float(np.median([a for a in areas if a >= 20]))


def test_objects_are_rasterised_at_each_domain_gsd():
    source = median_car_area([make_tile(SOURCE, t, 0)[1] for t in ("2_10", "2_11")])
    target = median_car_area([make_tile(TARGET, t, 0, target_look())[1] for t in ("area1", "area3", "area2")])
    # The same 4.3 x 1.7 m cars cover (0.09 / 0.05)^2 = 3.24 times more pixels in the source.
    assert 2.5 < source / target < 4.2
    assert 1500 < source < 4000


def test_car_sizes_resemble_the_real_patches(synthetic_root):
    for real, synthetic in (("potsdam", "potsdam_rgb"), ("vaihingen", "vaihingen_irrg")):
        real_area = median_car_area([np.array(Image.open(p)) for p in (REAL_SAMPLES / real).glob("ann_dir/*.png")])
        synthetic_area = median_car_area(
            [np.array(Image.open(p)) for p in (synthetic_root / synthetic / "ann_dir").rglob("*.png")])
        assert 0.5 < synthetic_area / real_area < 2.0, (real, synthetic_area, real_area)


def load_pixels(domain_dir, split, step=4):
    """Colours ``[N, 3]`` (PNG slot order) and train ids ``[N]`` of the labelled pixels, subsampled."""
    colours, labels = [], []
    for path in sorted((domain_dir / "img_dir" / split).glob("*.png")):
        colours.append(np.array(Image.open(path))[::step, ::step].reshape(-1, 3))
        labels.append(np.array(Image.open(domain_dir / "ann_dir" / split / path.name))[::step, ::step].ravel())
    colours, labels = np.concatenate(colours).astype(np.float64), np.concatenate(labels)
    keep = labels > 0
    return colours[keep], labels[keep] - 1


def test_vegetation_is_green_in_rgb_and_red_in_irrg(synthetic_root):
    for domain, dominant in (("potsdam_rgb", 1), ("potsdam_irrg", 0), ("vaihingen_irrg", 0)):
        colours, labels = load_pixels(synthetic_root / domain, "train")
        mean = colours[(labels == 2) | (labels == 3)].mean(axis=0)
        assert mean.argmax() == dominant, (domain, mean)


def test_prepared_mode_layout_and_meta(synthetic_root):
    assert {p.name for p in synthetic_root.iterdir()} == {"potsdam_rgb", "potsdam_irrg", "vaihingen_irrg"}
    for domain in ("potsdam_rgb", "potsdam_irrg", "vaihingen_irrg"):
        meta = json.loads((synthetic_root / domain / "meta.json").read_text())
        assert meta["synthetic"] is True and meta["domain"] == domain and meta["label_format"] == "mmseg_raw"
        for split in ("train", "val"):
            names = sorted(p.name for p in (synthetic_root / domain / "img_dir" / split).iterdir())
            assert names == sorted(p.name for p in (synthetic_root / domain / "ann_dir" / split).iterdir())
            assert len(names) == meta["counts"][split] > 0
            label = np.array(Image.open(synthetic_root / domain / "ann_dir" / split / names[0]))
            assert label.shape == (512, 512) and label.dtype == np.uint8 and label.max() <= 6


def class_shares(domain_dir):
    """Percent of the labelled pixels (train and val) per class, raw ids 1..6."""
    counts = np.zeros(7)
    for path in (domain_dir / "ann_dir").rglob("*.png"):
        counts += np.bincount(np.array(Image.open(path)).ravel(), minlength=7)
    return 100.0 * counts[1:] / counts[1:].sum()


def test_class_shares_match_the_real_data_sets(synthetic_root):
    # Three tiles per domain: one tile's share of a large class varies by 4-7 points (std), so the
    # three-tile mean by up to 4; 10 points is 2.5 of those, with room for the approximate published shares.
    # Cars and clutter are small classes: within 3 points, and present.
    for domain, dataset in (("potsdam_rgb", "potsdam"), ("vaihingen_irrg", "vaihingen")):
        shares, target = class_shares(synthetic_root / domain), np.array(CLASS_SHARES[dataset])
        tolerance = np.array([10.0, 10.0, 10.0, 10.0, 3.0, 3.0])
        assert np.all(np.abs(shares - target) <= tolerance), (domain, shares.round(1), target)
        assert shares[4] > 0.3 and shares[5] > 0.3, (domain, shares.round(1))


def class_colours(domain_dir, split="train"):
    """Per-class mean and std ``[6, 3]`` of the PNG slots (NaN for an absent class)."""
    colours, labels = load_pixels(domain_dir, split)
    means = np.full((6, 3), np.nan)
    stds = np.full((6, 3), np.nan)
    for c in range(6):
        if np.any(labels == c):
            means[c], stds[c] = colours[labels == c].mean(axis=0), colours[labels == c].std(axis=0)
    return means, stds


def test_class_colours_match_the_real_patches(synthetic_root):
    # 25 grey levels: the real patches' class stds are 10-60, and a 512 px crop's class mean is itself
    # only known to about that (it shows one street); the fit itself is within a few levels.
    for domain in DOMAIN_BANDS:
        means, _ = class_colours(synthetic_root / domain)
        for c, target in enumerate(target_colour_means(domain)):
            if target is not None:
                assert np.all(np.abs(means[c] - target) <= 25), (domain, c, means[c].round(1), target)


def test_each_class_keeps_its_colour_across_domains(synthetic_root):
    source, source_std = class_colours(synthetic_root / "potsdam_irrg")
    target, _ = class_colours(synthetic_root / "vaihingen_irrg")
    # The target's mean colour of every class is one the source shows for that class: inside the source's
    # spread for it (RMS over the bands of the shift in source standard deviations). Buildings shift most,
    # about one std, as between the real patches (red tiles in Potsdam, greyer roofs in Vaihingen).
    z = np.sqrt(np.mean(((target - source) / source_std) ** 2, axis=1))
    assert np.all(z < 1.5), z.round(2)
    # The same class across domains is much closer than two classes within the target.
    across = np.linalg.norm(target - source, axis=1).mean()
    between = np.mean([np.linalg.norm(target[i] - target[j]) for i in range(6) for j in range(i + 1, 6)])
    assert across < 0.75 * between, (across, between)


def miou(pred, truth, num_classes=6):
    """Mean IoU over the classes present in the prediction or the ground truth."""
    ious = []
    for c in range(num_classes):
        union = np.sum((pred == c) | (truth == c))
        if union:
            ious.append(np.sum((pred == c) & (truth == c)) / union)
    return 100.0 * float(np.mean(ious))


@pytest.mark.parametrize("source", ["potsdam_irrg", "potsdam_rgb"])
def test_nearest_class_mean_classifier_drops_on_the_target(synthetic_root, source):
    colours, labels = load_pixels(synthetic_root / source, "train")
    means = np.stack([colours[labels == c].mean(axis=0) if np.any(labels == c) else np.full(3, np.inf)
                      for c in range(6)])

    def predict(x):
        return np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)

    source_val = miou(predict(*load_pixels(synthetic_root / source, "val")[:1]),
                      load_pixels(synthetic_root / source, "val")[1])
    target_colours, target_labels = load_pixels(synthetic_root / "vaihingen_irrg", "val")
    target_val = miou(predict(target_colours), target_labels)
    # A gap (sensor response, GSD, layout), but not one that changes what colour a class has: a colour-only
    # classifier keeps a good part of its source score on the target. The drop is relative: since classes
    # share colours (test_colour_alone_does_not_segment_the_source), colour alone scores only ~27 on the
    # source, where the former fixed 5 points (set when it scored ~34) would ask for a fifth of its score.
    assert target_val <= 0.95 * source_val and target_val >= 0.25 * source_val, (source_val, target_val)


def test_domain_gap_knob_blends_the_target_look():
    assert target_look(1.0) == TARGET_LOOK and target_look(0.0) == SOURCE_LOOK
    half = target_look(0.5)
    assert half.gamma == pytest.approx((SOURCE_LOOK.gamma + TARGET_LOOK.gamma) / 2)
    assert half.white_balance[3] == pytest.approx((SOURCE_LOOK.white_balance[3] + TARGET_LOOK.white_balance[3]) / 2)


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "potsdam").mkdir()
    (tmp_path / "potsdam" / "keep.txt").write_text("mine")
    code = run_cli(make_synthetic_tool.main, ["--out", str(tmp_path), "--mode", "raw"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "potsdam"]
    with pytest.raises(UserError, match="size"):
        make_synthetic(tmp_path / "new", size="huge")


def test_study_size_holds_enough_patches():
    # Counted from the grid, not generated: every tile size the jitter allows gives the same grid.
    wanted = {"potsdam": {"train": 800, "val": 200}, "vaihingen": {"train": 400, "val": 200}}
    for dataset, spec in (("potsdam", SOURCE), ("vaihingen", TARGET)):
        size = SIZES["study"][dataset]
        for split in ("train", "val"):
            tiles = TILE_IDS[dataset][split][: size[split]]
            assert len(tiles) == size[split] and all(spec.dataset.split_of(t) == split for t in tiles)
            for jitter in (-spec.tile_jitter_px, spec.tile_jitter_px):
                h, w = (side + jitter for side in size["tile_px"])
                assert len(tiles) * len(crop_boxes(h, w)) >= wanted[dataset][split], (dataset, split, jitter)
    # small and demo keep their tiles: small is the start of demo.
    for dataset in TILE_IDS:
        for split in ("train", "val"):
            small, demo = (TILE_IDS[dataset][split][: SIZES[s][dataset][split]] for s in ("small", "demo"))
            assert demo[: len(small)] == small


def write_tiny_domain(root, images, labels):
    """A prepared folder with one train and one val patch: ``images[split]`` [H, W, 3], ``labels[split]``."""
    for split in ("train", "val"):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        Image.fromarray(images[split]).save(root / "img_dir" / split / "p.png")
        Image.fromarray(labels[split]).save(root / "ann_dir" / split / "p.png")
    (root / "meta.json").write_text(json.dumps({"label_format": "mmseg_raw"}))


def colour_reference(train_pixels, train_labels, val_pixels, val_labels, bins):
    """Plain loops: majority label per colour cell (ties to the smaller id, unseen cells to the most common
    label), then IoU per class over the labelled val pixels."""
    def cell(colour):
        return tuple(int(v) * bins // 256 for v in colour)

    votes, overall = {}, {}
    for colour, label in zip(train_pixels, train_labels):
        if label != 255:
            votes.setdefault(cell(colour), {}).setdefault(label, 0)
            votes[cell(colour)][label] += 1
            overall[label] = overall.get(label, 0) + 1
    fallback = min(overall, key=lambda c: (-overall[c], c))
    ious = []
    pred = [min(votes[cell(x)], key=lambda c: (-votes[cell(x)][c], c)) if cell(x) in votes else fallback
            for x in val_pixels]
    for c in range(6):
        tp = sum(p == c and t == c for p, t in zip(pred, val_labels) if t != 255)
        union = sum((p == c or t == c) for p, t in zip(pred, val_labels) if t != 255)
        ious.append(100.0 * tp / union if union else None)
    return ious


def test_colour_classifier_matches_a_plain_reference(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (5, 3))
    images, labels = {}, {}
    for split in ("train", "val"):
        # Colours drawn from a few shared swatches, so that several classes meet in one colour cell.
        images[split] = (palette[rng.integers(0, 5, (6, 7))] + rng.integers(-6, 7, (6, 7, 3))).clip(0, 255)
        images[split] = images[split].astype(np.uint8)
        labels[split] = rng.integers(0, 6, (6, 7)).astype(np.uint8)  # mmseg_raw: 0 ignored, 1..5 classes
    write_tiny_domain(tmp_path / "tiny", images, labels)
    scores = colour_classifier_scores(tmp_path, "tiny", bins=4)
    train_ids = {split: np.where(labels[split] == 0, 255, labels[split] - 1) for split in labels}
    expected = colour_reference(images["train"].reshape(-1, 3), train_ids["train"].ravel(),
                                images["val"].reshape(-1, 3), train_ids["val"].ravel(), bins=4)
    assert scores["iou"] == pytest.approx(expected)
    assert scores["miou"] == pytest.approx(np.mean([v for v in expected if v is not None]))
    assert scores["pixels"] == int(np.sum(labels["val"] > 0))


def test_colour_alone_does_not_segment_the_source(synthetic_root):
    # Before the shared materials, patchy grass, tile/strip radiometry and label noise, the quantised-colour
    # table scored 73.7 (IRRG) and 63.0 (RGB) mIoU on the small set's source val: classes were told apart
    # by colour alone. Now shape and context must do part of the work.
    for source in ("potsdam_irrg", "potsdam_rgb"):
        source_val = colour_classifier_scores(synthetic_root, source)["miou"]
        assert source_val <= 60, (source, source_val)
    cross = colour_classifier_scores(synthetic_root, "potsdam_irrg", eval_domain="vaihingen_irrg")["miou"]
    assert cross <= 0.5 * colour_classifier_scores(synthetic_root, "potsdam_irrg")["miou"], cross
