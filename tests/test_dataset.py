"""Domain registry, SegmentationFolder (real ISPRS patches and tiny tmp folders) and the loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.dataset import SegmentationFolder
from data.domains import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, get_domain, resolve_domain
from data.loaders import BatchStream, ShardSampler, build_loader, eval_loader
from data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from data.transforms import WeakAugment
from tests.helpers import REAL_SAMPLES
from utils.errors import UserError

# Raw-id pixel counts from tests/data/real-samples/README.md (0 = boundary -> ignore, k -> train id k-1).
REAL_COUNTS = {
    "vaihingen": {0: 21283, 1: 135362, 2: 79847, 3: 16532, 4: 4908, 5: 4212},
    "potsdam": {0: 24696, 1: 100557, 2: 64023, 3: 34357, 4: 30670, 5: 7841},
}


def write_split(root: Path, split: str, labels: dict[str, np.ndarray], images: bool = True, seed: int = 0) -> None:
    """Write uint8 PNG pairs ``<root>/{img_dir,ann_dir}/<split>/<name>.png``."""
    rng = np.random.default_rng(seed)
    (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
    (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
    for name, label in labels.items():
        if images:
            img = rng.integers(0, 256, size=(*label.shape, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "img_dir" / split / f"{name}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "ann_dir" / split / f"{name}.png")


def raw_labels(n: int = 3, size: int = 8) -> dict[str, np.ndarray]:
    return {f"p{i}": (np.arange(size * size).reshape(size, size) + i) % 7 for i in range(n)}


# --- domains -------------------------------------------------------------------------------------------


def test_class_constants():
    assert CLASS_NAMES == ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
    assert NUM_CLASSES == len(CLASS_NAMES) == 6 and IGNORE_INDEX == 255


def test_resolve_domain_canonical_alias_and_path(tmp_path):
    (tmp_path / "potsdam_rgb" / "img_dir").mkdir(parents=True)
    (tmp_path / "vailhingen6" / "img_dir").mkdir(parents=True)
    (tmp_path / "other" / "img_dir").mkdir(parents=True)
    assert resolve_domain(tmp_path, "potsdam_rgb") == tmp_path / "potsdam_rgb"
    assert resolve_domain(tmp_path, "potsdamRGB6") == tmp_path / "potsdam_rgb"
    assert resolve_domain(tmp_path, "vaihingen_irrg") == tmp_path / "vailhingen6"
    assert resolve_domain(tmp_path, "other") == tmp_path / "other"
    assert resolve_domain(None, tmp_path / "other") == tmp_path / "other"
    assert get_domain("vailhingen6").name == "vaihingen_irrg" and get_domain("vailhingen6").gsd_m == 0.09
    assert get_domain("potsdamIRRG6").bands == ("NIR", "R", "G") and get_domain("nope") is None


def test_resolve_domain_missing_lists_candidates(tmp_path):
    (tmp_path / "potsdam_irrg").mkdir()
    with pytest.raises(UserError) as err:
        resolve_domain(tmp_path, "potsdamIRRG6")
    msg = str(err.value)
    assert str(tmp_path / "potsdam_irrg") in msg and "no img_dir" in msg
    assert str(tmp_path / "potsdamIRRG6") in msg and "missing" in msg
    with pytest.raises(UserError, match="--data-root"):
        resolve_domain(None, "potsdam_rgb")


# --- real ISPRS patches ----------------------------------------------------------------------------------


def real_domain(tmp_path: Path, which: str) -> Path:
    """Link the real patch into a split layout (the samples folder is flat)."""
    src = REAL_SAMPLES / which
    if not src.is_dir():
        pytest.fail(f"real samples {src} are missing; they are part of the repository")
    root = tmp_path / which
    for sub in ("img_dir", "ann_dir"):
        (root / sub / "val").mkdir(parents=True)
        for f in (src / sub).glob("*.png"):
            (root / sub / "val" / f.name).symlink_to(f)
    return root


@pytest.mark.parametrize("which", ["vaihingen", "potsdam"])
def test_real_patch_histogram_and_decoding(tmp_path, which):
    root = real_domain(tmp_path, which)
    ds = SegmentationFolder(root, "val", label_format="mmseg_raw")
    assert len(ds) == 1
    s = ds[0]
    assert s["img"].dtype == torch.float32 and s["img"].shape == (3, 512, 512)
    assert s["label"].dtype == torch.int64 and s["label"].shape == (512, 512)
    ids, counts = torch.unique(s["label"], return_counts=True)
    expected = {(IGNORE_INDEX if raw == 0 else raw - 1): n for raw, n in REAL_COUNTS[which].items()}
    assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == expected
    # Slot order = the PNG's R,G,B (decoded independently with Pillow).
    ref = np.array(Image.open(ds.image_paths[0]).convert("RGB"))
    assert torch.equal(s["img"], torch.from_numpy(ref).permute(2, 0, 1).float() / 255)
    assert s["name"] == ds.image_paths[0].stem


def test_real_crops_without_labels_load_image_only(tmp_path):
    (tmp_path / "img_dir" / "train").mkdir(parents=True)
    for which in ("potsdam", "vaihingen"):
        for f in (REAL_SAMPLES / which / "img_dir").glob("*.png"):
            (tmp_path / "img_dir" / "train" / f.name).symlink_to(f)
    ds = SegmentationFolder(tmp_path, "train", with_labels=False)
    assert len(ds) == 2 and ds.names == sorted(ds.names)
    s = ds[0]
    assert set(s) == {"img", "name"} and s["img"].shape == (3, 512, 512)
    assert 0 <= s["img"].min() and s["img"].max() <= 1


def test_real_patch_without_format_is_ambiguous(tmp_path):
    # Neither a 6 (clutter) nor a 255 in these crops: the loader must refuse to guess.
    root = real_domain(tmp_path, "vaihingen")
    with pytest.raises(UserError, match="Pass it explicitly"):
        SegmentationFolder(root, "val")


# --- tiny folders -----------------------------------------------------------------------------------------


def test_raw_format_detected_and_mapped(tmp_path):
    labels = raw_labels()
    write_split(tmp_path, "train", labels)
    ds = SegmentationFolder(tmp_path, "train")
    assert ds.label_format == "mmseg_raw" and ds.names == ["p0", "p1", "p2"]
    for i, raw in enumerate(labels.values()):
        expected = np.where(raw == 0, 255, raw - 1)
        assert np.array_equal(ds[i]["label"].numpy(), expected)


def test_train_ids_format_detected_from_255(tmp_path):
    label = np.array([[0, 1, 2, 3], [4, 5, 255, 0]])
    write_split(tmp_path, "train", {"a": label})
    write_split(tmp_path, "val", {"b": np.zeros((2, 4))})  # no 255 here: the scan covers all splits
    assert SegmentationFolder(tmp_path, "val").label_format == "train_ids"
    ds = SegmentationFolder(tmp_path, "train")
    assert np.array_equal(ds[0]["label"].numpy(), label)


def test_meta_json_decides_and_conflicts_are_errors(tmp_path):
    write_split(tmp_path, "val", {"a": np.array([[0, 1], [2, 3]])})  # ambiguous on its own
    (tmp_path / "meta.json").write_text(json.dumps({"label_format": "train_ids", "domain": "x"}))
    ds = SegmentationFolder(tmp_path, "val")
    assert ds.label_format == "train_ids" and ds.meta["domain"] == "x"
    assert ds[0]["label"].tolist() == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match="meta.json"):
        SegmentationFolder(tmp_path, "val", label_format="mmseg_raw")
    (tmp_path / "meta.json").write_text(json.dumps({"label_format": "rgb"}))
    with pytest.raises(UserError, match="'rgb'"):
        SegmentationFolder(tmp_path, "val")


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ({"a": np.array([[6, 255]])}, "both a 6 and a 255"),
        ({"a": np.array([[0, 1]])}, "neither"),
    ],
)
def test_ambiguous_format(tmp_path, labels, match):
    write_split(tmp_path, "train", labels)
    with pytest.raises(UserError, match=match):
        SegmentationFolder(tmp_path, "train")


@pytest.mark.parametrize(("fmt", "bad"), [("mmseg_raw", 7), ("train_ids", 6), ("train_ids", 250)])
def test_value_outside_format_names_file_and_value(tmp_path, fmt, bad):
    write_split(tmp_path, "train", {"good": np.ones((4, 4)), "bad": np.full((4, 4), bad)})
    ds = SegmentationFolder(tmp_path, "train", label_format=fmt)
    ds[ds.names.index("good")]
    with pytest.raises(UserError) as err:
        ds[ds.names.index("bad")]
    assert "bad.png" in str(err.value) and f"[{bad}]" in str(err.value)


def test_unpaired_files_are_named_with_counts(tmp_path):
    write_split(tmp_path, "train", raw_labels(3))
    (tmp_path / "img_dir" / "train" / "p1.png").rename(tmp_path / "img_dir" / "train" / "q1.png")
    with pytest.raises(UserError) as err:
        SegmentationFolder(tmp_path, "train", label_format="mmseg_raw")
    msg = str(err.value)
    assert "1 image(s)" in msg and "q1" in msg and "1 label(s)" in msg and "p1" in msg
    assert "3 images, 3 labels" in msg


def test_missing_and_empty_split(tmp_path):
    write_split(tmp_path, "train", raw_labels(1))
    with pytest.raises(UserError, match="does not exist.*splits present: train"):
        SegmentationFolder(tmp_path, "val", label_format="mmseg_raw")
    (tmp_path / "img_dir" / "val").mkdir()
    with pytest.raises(UserError, match="holds no"):
        SegmentationFolder(tmp_path, "val", with_labels=False)


def test_colour_label_and_size_mismatch_are_rejected(tmp_path):
    write_split(tmp_path, "train", {"a": np.ones((4, 4))})
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "ann_dir" / "train" / "a.png")
    with pytest.raises(UserError, match="mode RGB"):
        SegmentationFolder(tmp_path, "train", label_format="mmseg_raw")[0]
    Image.fromarray(np.ones((4, 5), dtype=np.uint8)).save(tmp_path / "ann_dir" / "train" / "a.png")
    with pytest.raises(UserError, match="is 5x4 but its image is 4x4"):
        SegmentationFolder(tmp_path, "train", label_format="mmseg_raw")[0]


def test_palette_label_keeps_indices(tmp_path):
    write_split(tmp_path, "train", {"a": np.ones((4, 4))})
    im = Image.fromarray(np.array([[1, 2], [3, 6]], dtype=np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 255, 0, 255, 255] + [9] * 756)
    write_split(tmp_path, "val", {"b": np.ones((2, 2))})
    im.save(tmp_path / "ann_dir" / "val" / "b.png")
    assert SegmentationFolder(tmp_path, "val", label_format="mmseg_raw")[0]["label"].tolist() == [[0, 1], [2, 5]]


def test_image_only_and_imagenet_normalisation(tmp_path):
    write_split(tmp_path, "train", raw_labels(2))
    ds_unit = SegmentationFolder(tmp_path, "train", label_format="mmseg_raw")
    ds_net = SegmentationFolder(tmp_path, "train", label_format="mmseg_raw", normalize="imagenet")
    x = ds_unit[0]["img"] * 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(ds_net[0]["img"], (x - mean) / std, rtol=1e-5, atol=1e-5)
    for p in (tmp_path / "ann_dir" / "train").iterdir():
        p.unlink()
    unlabelled = SegmentationFolder(tmp_path, "train", with_labels=False)
    s = unlabelled[1]
    assert set(s) == {"img", "name"} and s["name"] == "p1" and unlabelled.label_format is None
    with pytest.raises(UserError, match="normalize"):
        SegmentationFolder(tmp_path, "train", with_labels=False, normalize="minmax")


def test_transform_output_is_normalised(tmp_path):
    write_split(tmp_path, "train", raw_labels(1, size=16))
    ds = SegmentationFolder(tmp_path, "train", label_format="mmseg_raw", transform=WeakAugment(8), normalize="imagenet")
    torch.manual_seed(0)
    s = ds[0]
    assert s["img"].shape == (3, 8, 8) and s["label"].shape == (8, 8) and "weak_params" in s
    assert s["img"].min() < 0  # mean/std applied after the transform


# --- loaders ---------------------------------------------------------------------------------------------


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_build_loader_is_seeded():
    def order(seed: int) -> list[int]:
        return torch.cat(list(build_loader(Indexed(20), 4, shuffle=True, drop_last=False, seed=seed))).tolist()

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(20))
    with pytest.raises(UserError, match="batch"):
        build_loader(Indexed(3), 4, shuffle=True, drop_last=True)


def test_batch_stream_reshuffles_and_never_repeats_within_a_pass():
    stream = BatchStream(Indexed(7), 3, shuffle=True, seed=0)
    assert stream.batches_per_pass == 2
    passes = []
    for _ in range(5):
        flat = [i for _ in range(2) for i in next(stream).tolist()]
        assert len(set(flat)) == 6  # 7 // 3 = 2 full batches, no repeats inside a pass
        passes.append(flat)
    assert stream.state_dict() == {"pass": 4, "batch": 2}
    assert len({tuple(p) for p in passes}) > 1


def test_batch_stream_resumes_with_the_very_next_batch():
    reference = BatchStream(Indexed(10), 3, seed=5)
    expected = [next(reference).tolist() for _ in range(8)]
    first = BatchStream(Indexed(10), 3, seed=5)
    got = [next(first).tolist() for _ in range(4)]
    resumed = BatchStream(Indexed(10), 3, seed=5)
    resumed.load_state_dict(first.state_dict())
    got += [next(resumed).tolist() for _ in range(4)]
    assert got == expected


def test_batch_stream_needs_one_full_batch():
    with pytest.raises(UserError, match="cannot fill one batch"):
        BatchStream(Indexed(3), 4)


def test_shard_sampler_covers_every_sample_once():
    shards = [list(ShardSampler(Indexed(5), 2, rank)) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]  # no padding repeats, unlike DistributedSampler


def test_training_and_evaluation_roles(tmp_path):
    write_split(tmp_path, "train", raw_labels(5))
    write_split(tmp_path, "val", raw_labels(5), seed=1)
    src = BatchStream(SegmentationFolder(tmp_path, "train"), 2, seed=0)
    assert src.batches_per_pass == 2 and set(next(src)) == {"img", "label", "name"}
    for p in (tmp_path / "ann_dir" / "train").iterdir():
        p.unlink()  # the target-train role must not need labels
    tgt = BatchStream(SegmentationFolder(tmp_path, "train", with_labels=False), 2, seed=0)
    assert set(next(tgt)) == {"img", "name"}
    val = eval_loader(SegmentationFolder(tmp_path, "val"), 2)
    names = [n for batch in val for n in batch["name"]]
    assert names == [f"p{i}" for i in range(5)]  # every patch once, in order


def test_worker_seeding_is_reproducible(tmp_path):
    write_split(tmp_path, "train", raw_labels(4, size=16))

    def params(seed: int) -> torch.Tensor:
        stream = BatchStream(SegmentationFolder(tmp_path, "train", transform=WeakAugment(8)), 2, seed=seed,
                             num_workers=2)
        return torch.cat([next(stream)["weak_params"]["crop_box"] for _ in range(2)])

    first = params(0)
    assert torch.equal(first, params(0)) and not torch.equal(first, params(1))


def test_shuffled_loader_order_follows_seed_and_epoch():
    """The legacy refresh's source loader: full batches, each sample at most once, order from (seed, epoch)."""
    from data.loaders import shuffled_loader

    class Numbers(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 11

        def __getitem__(self, i: int) -> int:
            return i

    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = shuffled_loader(Numbers(), 3, seed)
        loader.sampler.set_epoch(epoch)
        return [batch.tolist() for batch in loader]

    first = order(0, 1)
    assert len(first) == 3 and all(len(b) == 3 for b in first)  # 11 samples -> 3 full batches
    flat = [i for b in first for i in b]
    assert len(set(flat)) == 9 and flat != sorted(flat)
    assert order(0, 1) == first and order(0, 2) != first and order(1, 1) != first
