"""The uint8 cache: samples equal the PNG path's, staleness, read-only fallback, mixed sizes."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import IMAGES, INDEX, LABELS, SplitCache, build_cache, cache_folders
from data.dataset import SegmentationFolder
from data.transforms import Resize
from tests.helpers import RAW_VALUES, write_domain
from utils.errors import UserError

TRAIN_ID_VALUES = np.array([0, 1, 2, 3, 4, 5, 255])


def assert_same_samples(a: SegmentationFolder, b: SegmentationFolder) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
                assert x[key].stride() == y[key].stride(), key
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def touch_later(path: Path) -> None:
    """Move the mtime forward, so a rewrite within the clock's resolution still shows."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("label_format, values", [("mmseg_raw", RAW_VALUES), ("train_ids", TRAIN_ID_VALUES)])
def test_cache_equals_png_path(tmp_path, label_format, values):
    write_domain(tmp_path, values=values)
    png = SegmentationFolder(tmp_path, "train", label_format=label_format)
    cached = SegmentationFolder(tmp_path, "train", label_format=label_format, cache=True, cache_dir=tmp_path / "fb")
    assert cached.cache is not None and png.cache is None
    assert_same_samples(png, cached)
    assert cached[0]["label"].dtype == torch.int64 and set(cached[0]["label"].unique().tolist()) <= {*range(6), 255}
    folder = tmp_path / ".cache" / "train"
    assert cached.cache.folder == folder
    index = json.loads((folder / INDEX).read_text())
    assert index["names"] == png.names and index["shape"] == [3, 12, 10] and index["label_format"] == label_format
    assert (folder / IMAGES).stat().st_size == 3 * 12 * 10 * 3 and (folder / LABELS).stat().st_size == 3 * 12 * 10


def test_cache_applies_transform_and_normalisation_after(tmp_path):
    write_domain(tmp_path, size=(16, 16))
    kw = {"label_format": "mmseg_raw", "transform": Resize(8), "normalize": "imagenet"}
    png = SegmentationFolder(tmp_path, "train", **kw)
    cached = SegmentationFolder(tmp_path, "train", cache=True, cache_dir=tmp_path / "fb", **kw)
    assert cached[0]["img"].shape == (3, 8, 8)
    assert_same_samples(png, cached)


def test_cache_without_labels_never_reads_ann_dir(tmp_path):
    write_domain(tmp_path)
    png = SegmentationFolder(tmp_path, "train", with_labels=False)
    for path in (tmp_path / "ann_dir" / "train").iterdir():
        path.unlink()
    cached = SegmentationFolder(tmp_path, "train", with_labels=False, cache=True, cache_dir=tmp_path / "fb")
    assert_same_samples(png, cached)
    assert "label" not in cached[0]
    assert not (cached.cache.folder / LABELS).exists()
    with pytest.raises(ValueError, match="no labels"):
        cached.cache.label(0)


def test_labelled_cache_serves_unlabelled_use_and_not_the_reverse(tmp_path, capsys):
    write_domain(tmp_path)
    build_cache(tmp_path, "train", None, cache_dir=tmp_path / "fb")
    assert "no cache yet" in capsys.readouterr().err
    labelled = SegmentationFolder(tmp_path, "train", label_format="mmseg_raw", cache=True, cache_dir=tmp_path / "fb")
    assert "labels cached as none" in capsys.readouterr().err
    unlabelled = SegmentationFolder(tmp_path, "train", with_labels=False, cache=True, cache_dir=tmp_path / "fb")
    assert capsys.readouterr().err == ""
    assert_same_samples(unlabelled, SegmentationFolder(tmp_path, "train", with_labels=False))
    assert labelled.cache.folder == unlabelled.cache.folder


def test_unchanged_sources_reuse_the_cache(tmp_path, capsys):
    write_domain(tmp_path)
    folder = build_cache(tmp_path, "train", "mmseg_raw", cache_dir=tmp_path / "fb")
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    stamp = (folder / IMAGES).stat().st_mtime_ns
    assert build_cache(tmp_path, "train", "mmseg_raw", cache_dir=tmp_path / "fb") == folder
    assert capsys.readouterr().err == ""
    assert (folder / IMAGES).stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name != "train"]  # no staging left behind


@pytest.mark.parametrize("change", ["image", "label", "added", "removed", "truncated", "format"])
def test_stale_cache_is_rebuilt_with_one_log_line(tmp_path, capsys, change):
    write_domain(tmp_path)
    build_cache(tmp_path, "train", "mmseg_raw", cache_dir=tmp_path / "fb")
    capsys.readouterr()
    rng = np.random.default_rng(1)
    fmt = "mmseg_raw"
    if change == "image":
        path = tmp_path / "img_dir" / "train" / "q1.png"
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
        touch_later(path)
    elif change == "label":
        path = tmp_path / "ann_dir" / "train" / "q2.png"
        Image.fromarray(np.full((12, 10), 3, dtype=np.uint8)).save(path)
        touch_later(path)
    elif change == "added":
        write_domain(tmp_path / "extra")
        for sub in ("img_dir", "ann_dir"):
            (tmp_path / "extra" / sub / "train" / "q0.png").rename(tmp_path / sub / "train" / "q9.png")
    elif change == "removed":
        for sub in ("img_dir", "ann_dir"):
            (tmp_path / sub / "train" / "q0.png").unlink()
    elif change == "truncated":
        with open(tmp_path / ".cache" / "train" / IMAGES, "r+b") as fh:
            fh.truncate(10)
    else:  # the same files read as another label format (values 0..5 only, so both formats accept them)
        for path in (tmp_path / "ann_dir" / "train").iterdir():
            Image.fromarray(np.full((12, 10), 2, dtype=np.uint8)).save(path)
            touch_later(path)
        build_cache(tmp_path, "train", "mmseg_raw", cache_dir=tmp_path / "fb")
        capsys.readouterr()
        fmt = "train_ids"
    cached = SegmentationFolder(tmp_path, "train", label_format=fmt, cache=True, cache_dir=tmp_path / "fb")
    log = capsys.readouterr().err.strip().splitlines()
    assert len(log) == 1 and log[0].startswith("cache: ") and "decoding" in log[0]
    assert_same_samples(SegmentationFolder(tmp_path, "train", label_format=fmt), cached)
    assert [p.name for p in (tmp_path / ".cache").iterdir()] == ["train"]  # the stale copy is gone


def _check_fallback(tmp_path: Path, root: Path) -> None:
    fallback = tmp_path / "fallback"
    png = SegmentationFolder(root, "train", label_format="mmseg_raw")
    cached = SegmentationFolder(root, "train", label_format="mmseg_raw", cache=True, cache_dir=fallback)
    assert cached.cache.folder == cache_folders(root, "train", fallback)[1]
    assert cached.cache.folder.is_relative_to(fallback)
    assert not (root / ".cache" / "train").exists()
    assert_same_samples(png, cached)
    # Opened again, the fallback cache is found valid and reused.
    assert build_cache(root, "train", "mmseg_raw", cache_dir=fallback) == cached.cache.folder


def test_read_only_root_falls_back_chmod(tmp_path):
    root = tmp_path / "domain"
    write_domain(root)
    root.chmod(0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing; see the EROFS test below")
        _check_fallback(tmp_path, root)
    finally:
        root.chmod(0o755)


def test_read_only_root_falls_back(tmp_path, monkeypatch):
    """The same as the chmod test, for runs as root: creating folders inside the domain fails with EROFS."""
    root = tmp_path / "domain"
    write_domain(root)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(root):
            raise OSError(30, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    _check_fallback(tmp_path, root)


def test_fallback_folder_depends_on_the_domain_path(tmp_path):
    a = cache_folders(tmp_path / "x" / "potsdam_rgb", "train", tmp_path)[1]
    b = cache_folders(tmp_path / "y" / "potsdam_rgb", "train", tmp_path)[1]
    assert a != b and a.parent.name.startswith("potsdam_rgb-") and a.name == "train"
    assert cache_folders(tmp_path / "x", "val")[1].is_relative_to(Path("~/.cache/napg").expanduser())


def test_mixed_sizes_are_a_user_error(tmp_path):
    write_domain(tmp_path, sizes=[(12, 10), (12, 10), (8, 10)])
    assert len(SegmentationFolder(tmp_path, "train", label_format="mmseg_raw")) == 3  # the PNG path copes
    with pytest.raises(UserError, match="different sizes.*disable") as err:
        SegmentationFolder(tmp_path, "train", label_format="mmseg_raw", cache=True, cache_dir=tmp_path / "fb")
    assert "10x8: 1 file(s), e.g. q2" in str(err.value)
    assert not (tmp_path / ".cache" / "train").exists()
    assert [p.name for p in (tmp_path / ".cache").iterdir()] == []  # the staging folder was removed


def test_bad_label_value_fails_at_build_time(tmp_path):
    write_domain(tmp_path, values=np.array([0, 1, 7]))
    with pytest.raises(UserError, match="not allowed in label_format 'mmseg_raw'"):
        build_cache(tmp_path, "train", "mmseg_raw", cache_dir=tmp_path / "fb")
    assert not (tmp_path / ".cache" / "train").exists()


def test_split_cache_pickles_without_its_data(tmp_path):
    write_domain(tmp_path)
    dataset = SegmentationFolder(tmp_path, "train", label_format="mmseg_raw", cache=True, cache_dir=tmp_path / "fb")
    dataset[0]  # opens the memmaps
    state = pickle.dumps(dataset.cache)
    assert len(state) < 3 * 12 * 10 * 3  # the maps are not in the pickle
    clone = pickle.loads(pickle.dumps(dataset))
    assert_same_samples(dataset, clone)
    assert isinstance(clone.cache, SplitCache) and len(clone.cache) == 3
