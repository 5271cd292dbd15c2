"""uint8 batches, scaled and normalised on the device, equal the dataset's float samples bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from data.dataset import SegmentationFolder
from data.preprocess import to_model_input
from engine.build import build_transforms
from engine.config import resolve_config


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("normalize", ["unit", "imagenet"])
# Smaller than the patches: an exact crop, which stays uint8; larger: a padded resample, computed in float.
@pytest.mark.parametrize("crop", ["smaller", "larger"])
def test_uint8_transfer_gives_the_float_path_tensors(synthetic_root, cache, normalize, crop):
    root = synthetic_root / "potsdam_irrg"
    side = SegmentationFolder(root, "train")[0]["img"].shape[-1]
    cfg = resolve_config("step1", overrides={"img_size": side // 2 if crop == "smaller" else side + 32})
    train_tf, _, _ = build_transforms(cfg)
    kw = {"transform": train_tf, "normalize": normalize, "cache": cache}
    plain, fast = SegmentationFolder(root, "train", **kw), SegmentationFolder(root, "train", uint8=True, **kw)

    def batch(dataset: SegmentationFolder) -> dict:
        torch.manual_seed(0)  # the same random crops for both
        return default_collate([dataset[i] for i in range(3)])

    reference, raw = batch(plain), batch(fast)
    assert raw["img"].dtype == (torch.uint8 if crop == "smaller" else torch.float32)
    assert torch.equal(to_model_input(raw["img"], torch.device("cpu"), normalize), reference["img"])
    assert torch.equal(raw["label"], reference["label"])
    # Float batches (refresh, evaluation, step 3's strong views) pass through unchanged.
    assert torch.equal(to_model_input(reference["img"], torch.device("cpu"), normalize), reference["img"])
