"""The data checks run before training or evaluation: sizes, bands, label headers and values, crops."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from data.checks import LABEL_SAMPLE, SplitUse, check_data, header
from tests.helpers import write_domain
from utils.errors import UserError


def _check(root: Path, *uses: SplitUse, resize: int | None = None, batch_size: int = 4, crop: int | None = None,
           label_format: str | None = "mmseg_raw", window: int | None = None) -> None:
    check_data(uses or (SplitUse(root, "train"),), label_format=label_format, resize=resize, batch_size=batch_size,
               batch_flag="--eval-batch-size", crop=crop, window=window)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_good_folder_passes(tmp_path):
    write_domain(tmp_path, size=(64, 64))
    write_domain(tmp_path, "val", size=(64, 64))
    _check(tmp_path, SplitUse(tmp_path, "train", cropped=True), SplitUse(tmp_path, "val"), crop=64)
    _check(tmp_path, label_format=None)  # an undeclared format: every value is one of some format


def test_mixed_sizes_name_the_folder_two_files_and_the_flag(tmp_path):
    write_domain(tmp_path, sizes=[(64, 64), (64, 64), (70, 90)])
    with pytest.raises(UserError) as err:
        _check(tmp_path)
    line = _one_line(err)
    assert str(tmp_path / "img_dir" / "train") in line and "q0.png" in line and "q2.png" in line
    assert "90x70: 1 file(s)" in line and "--resize 64 to resize" in line and "--eval-batch-size 1" in line
    # What the message offers works: a resize, or batches of one patch.
    _check(tmp_path, resize=64)
    _check(tmp_path, batch_size=1)


def test_patches_must_be_whole_windows_of_a_windowed_network(tmp_path):
    write_domain(tmp_path, size=(96, 96))
    _check(tmp_path, window=32)
    with pytest.raises(UserError, match=r"3 patch\(es\) whose sides are no multiple of the network's --window 64 "
                                        r"\(e.g. q0.png: 96x96 px\): pass --resize 128") as err:
        _check(tmp_path, window=64)
    _one_line(err)
    _check(tmp_path, window=64, resize=128)  # what the message offers works


def test_a_meta_json_patch_size_must_match_every_file(tmp_path):
    write_domain(tmp_path, size=(64, 64))
    (tmp_path / "meta.json").write_text(json.dumps({"clip": 64, "label_format": "mmseg_raw"}))
    _check(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"clip": 512, "label_format": "mmseg_raw"}))
    with pytest.raises(UserError, match=r"q0.png is 64x64 but .*meta.json says the patches are 512x512 \(3 of 3"):
        _check(tmp_path, resize=64)


@pytest.mark.parametrize("crop, resize, match", [(96, None, r"larger than the 64x64 patch .*q\d.png"),
                                                 (128, 64, "larger than --resize 64")])
def test_crops_larger_than_a_patch_are_refused(tmp_path, crop, resize, match):
    write_domain(tmp_path, size=(64, 64))
    with pytest.raises(UserError, match=match) as err:
        _check(tmp_path, SplitUse(tmp_path, "train", cropped=True), resize=resize, crop=crop)
    assert "--img-size 64 or less" in _one_line(err) and f"--resize {crop} or more" in str(err.value)
    _check(tmp_path, SplitUse(tmp_path, "train"), resize=resize, crop=crop)  # splits read whole are not cropped


@pytest.mark.parametrize("array, found", [
    (np.zeros((8, 8, 4), np.uint8), "4 band(s) (mode RGBA)"),
    (np.zeros((8, 8), np.uint8), "1 band(s) (mode L)"),
    (np.zeros((8, 8, 3), np.uint16), "mode RGB 16-bit"),
])
def test_images_must_be_8_bit_with_three_bands(tmp_path, array, found):
    write_domain(tmp_path, size=(8, 8))
    cv2.imwrite(str(tmp_path / "img_dir" / "train" / "q1.png"), array)
    with pytest.raises(UserError, match="expected an 8-bit 3-band image") as err:
        _check(tmp_path)
    assert found in _one_line(err) and "q1.png" in str(err.value)


def test_files_pillow_cannot_open_are_read_by_opencv_or_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "float.tif"), np.zeros((6, 5, 3), np.float32))
    assert header(tmp_path / "float.tif") == (6, 5, "RGB float32")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot decode image .*junk.png"):
        header(tmp_path / "junk.png")


def test_label_headers_one_band_and_the_image_size(tmp_path):
    write_domain(tmp_path, size=(8, 8))
    label = tmp_path / "ann_dir" / "train" / "q2.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(label)
    with pytest.raises(UserError, match="q2.png: expected a single-channel 8-bit label image, found mode RGB"):
        _check(tmp_path)
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(label)
    with pytest.raises(UserError, match="q2.png is 6x8 but its image is 8x8"):
        _check(tmp_path)


def test_the_target_train_labels_are_never_read(tmp_path):
    write_domain(tmp_path, size=(8, 8))
    for label in (tmp_path / "ann_dir" / "train").iterdir():
        label.write_bytes(b"broken")
    _check(tmp_path, SplitUse(tmp_path, "train", labels=False))


def test_label_values_come_from_meta_json_when_recorded(tmp_path):
    write_domain(tmp_path, size=(8, 8))
    meta = {"label_format": "train_ids", "label_values": {"train": [0, 1, 6]}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"meta.json: label value\(s\) \[6\] not allowed in label_format 'train_ids'"):
        _check(tmp_path, label_format=None)
    meta["label_values"]["train"] = [0, 1, 255]  # the files are not decoded: the recorded values decide
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    _check(tmp_path, label_format=None)


@pytest.mark.parametrize("label_format, values, match", [
    ("mmseg_raw", [0, 3, 7], r"value\(s\) \[7\] not allowed in label_format 'mmseg_raw'"),
    (None, [0, 40, 80], r"value\(s\) \[40, 80\] are no label id of any format"),
])
def test_label_values_of_a_sample_are_checked_without_meta_json(tmp_path, label_format, values, match):
    write_domain(tmp_path, n=2 * LABEL_SAMPLE, size=(4, 4), values=np.array(values))
    with pytest.raises(UserError, match=match):
        _check(tmp_path, label_format=label_format)


def test_recorded_label_values_must_be_integers(tmp_path):
    write_domain(tmp_path, size=(8, 8))
    (tmp_path / "meta.json").write_text(json.dumps({"label_format": "mmseg_raw", "label_values": {"train": ["a"]}}))
    with pytest.raises(UserError, match="label_values of train must be a list of integers"):
        _check(tmp_path)
