"""ConfusionMatrix and scores against hand-computed matrices and a plain-loop reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from utils.metrics import ConfusionMatrix, format_table


def reference_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
        if t != ignore:
            m[t, p] += 1
    return m


def approx(values, expected):
    assert len(values) == len(expected)
    for v, e in zip(values, expected, strict=True):
        if e is None:
            assert v is None
        else:
            assert v == pytest.approx(e, abs=1e-12)


def test_bincount_matches_plain_loop_and_accumulates():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(num_classes=6, ignore_index=255)
    preds, targets = [], []
    for _ in range(3):
        target = rng.integers(0, 6, size=(2, 17, 13))
        target[rng.random(target.shape) < 0.2] = 255
        pred = rng.integers(0, 6, size=target.shape)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    expected = reference_matrix(np.concatenate(preds), np.concatenate(targets), 6, 255)
    assert cm.matrix.dtype == torch.int64
    assert np.array_equal(cm.matrix.numpy(), expected)
    cm.reset()
    assert cm.matrix.sum() == 0


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 6, size=(3, 8, 8)).astype(np.uint8)
    target[0, :2] = 255
    pred = rng.integers(0, 6, size=target.shape).astype(np.int32)
    a, b, c = ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()
    a.update(pred, target)
    b.update(torch.from_numpy(pred).long(), torch.from_numpy(target).long())
    c.update(pred, torch.from_numpy(target))
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.matrix, c.matrix)
    assert a.compute() == b.compute()


def test_standard_and_legacy_on_hand_computed_matrix():
    # GT rows / pred cols: [[2,1,0],[1,1,0],[0,0,1]]; two ignored pixels.
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    cm.update(torch.tensor([0, 0, 1, 1, 0, 2, 1, 0]), torch.tensor([0, 0, 0, 1, 1, 2, 255, 255]))
    assert cm.matrix.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    r = cm.compute()
    assert r["pixels"] == 6
    assert r["oa"] == pytest.approx(4 / 6)
    approx(r["iou"], [2 / 4, 1 / 3, 1.0])
    approx(r["f1"], [4 / 6, 2 / 4, 1.0])
    approx(r["precision"], [2 / 3, 1 / 2, 1.0])
    approx(r["recall"], [2 / 3, 1 / 2, 1.0])
    assert r["miou"] == pytest.approx((2 / 4 + 1 / 3 + 1) / 3)
    assert r["mf1"] == pytest.approx((4 / 6 + 2 / 4 + 1) / 3)
    # The last class (clutter) is left out of the *5 means only.
    assert r["miou_5"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    assert r["mf1_5"] == pytest.approx((4 / 6 + 2 / 4) / 2)

    legacy = cm.compute("napg_legacy")
    approx(legacy["iou"], [2 / 5, 1 / 4, 1 / 2])
    approx(legacy["f1"], [4 / 6, 2 / 4, 1.0])
    assert legacy["oa"] == pytest.approx(4 / 6)
    assert legacy["miou"] == pytest.approx((2 / 5 + 1 / 4 + 1 / 2) / 3)


def test_absent_class_and_zero_tp():
    # Class 2 absent from GT and prediction; class 3 (last) only predicted, never right.
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    cm.update(np.array([0, 0, 0, 1, 3]), np.array([0, 0, 1, 1, 0]))
    assert cm.matrix.tolist() == [[2, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    r = cm.compute("standard")
    approx(r["iou"], [2 / 4, 1 / 2, None, 0.0])
    approx(r["f1"], [4 / 6, 2 / 3, None, 0.0])
    approx(r["precision"], [2 / 3, 1.0, None, 0.0])
    approx(r["recall"], [2 / 3, 1 / 2, None, None])
    assert r["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert r["mf1"] == pytest.approx((4 / 6 + 2 / 3 + 0.0) / 3)
    assert r["miou_5"] == pytest.approx(0.5)
    assert r["mf1_5"] == pytest.approx(2 / 3)

    legacy = cm.compute("napg_legacy")
    approx(legacy["iou"], [2 / 5, 1 / 3, 0.0, 0.0])
    assert legacy["miou"] == pytest.approx((2 / 5 + 1 / 3) / 4)  # plain mean, absent class counts as 0
    assert legacy["miou_5"] == pytest.approx((2 / 5 + 1 / 3) / 3)
    approx(legacy["f1"], [4 / 6, 2 / 3, None, None])  # TP = 0 -> undefined, dropped from mF1
    assert legacy["mf1"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert legacy["mf1_5"] == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_six_class_five_class_means_and_json():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 6, size=(4, 16, 16))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 6, size=target.shape))
    cm = ConfusionMatrix()
    cm.update(pred, target)
    r = cm.compute()
    assert r["miou"] == pytest.approx(sum(r["iou"]) / 6)
    assert r["miou_5"] == pytest.approx(sum(r["iou"][:5]) / 5)
    assert r["mf1_5"] == pytest.approx(sum(r["f1"][:5]) / 5)
    # Clutter confusions still count: dropping clutter pixels altogether changes the other classes.
    keep = (target != 5) & (pred != 5)
    other = ConfusionMatrix()
    other.update(pred[keep], target[keep])
    assert other.compute()["iou"][:5] != r["iou"][:5]
    for protocol in ("standard", "napg_legacy"):
        out = cm.compute(protocol)
        json.dumps(out, allow_nan=False)
        assert all(0.0 <= out[k] <= 1.0 for k in ("oa", "miou", "mf1", "miou_5", "mf1_5"))


def test_invalid_inputs():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        cm.compute()
    cm.update(torch.tensor([0, 1]), torch.tensor([6, 1]))  # a raw-format label slipped through
    assert cm.invalid == 1
    with pytest.raises(ValueError, match="label format"):
        cm.compute()
    with pytest.raises(ValueError, match="protocol"):
        ConfusionMatrix().compute("mmseg")


def test_all_reduce_without_dist_is_noop():
    whole = ConfusionMatrix()
    whole.update(torch.tensor([0, 1, 2, 3, 4, 5, 5, 0]), torch.tensor([0, 1, 2, 3, 255, 5, 4, 1]))
    before = whole.matrix.clone()
    whole.all_reduce()
    assert torch.equal(whole.matrix, before)


def test_all_reduce_single_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cm = ConfusionMatrix(num_classes=3)
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2]))
        before = cm.matrix.clone()
        cm.all_reduce()
        assert torch.equal(cm.matrix, before)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accumulates_on_cuda():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.integers(0, 6, size=(2, 32, 32)))
    pred = torch.from_numpy(rng.integers(0, 6, size=(2, 32, 32)))
    gpu, cpu = ConfusionMatrix(), ConfusionMatrix()
    gpu.update(pred.cuda(), target.cuda())
    cpu.update(pred, target)
    assert gpu.matrix.device.type == "cuda"
    assert torch.equal(gpu.matrix.cpu(), cpu.matrix)


def test_format_table():
    cm = ConfusionMatrix(num_classes=4)
    cm.update(np.array([0, 0, 0, 1, 3]), np.array([0, 0, 1, 1, 0]))
    text = format_table(cm.compute(), ["a", "b", "c", "clutter"])
    lines = text.splitlines()
    assert len(lines) == 6
    assert lines[1].split() == ["a", "50.00", "66.67", "66.67", "66.67"]
    assert lines[3].split() == ["c", "-", "-", "-", "-"]
    assert "OA 60.00" in lines[-1] and f"mIoU {100 / 3:.2f}" in lines[-1] and "mIoU-3 50.00" in lines[-1]
    # A benchmark that leaves no class out of its means (LoveDA) gets no "-N" means.
    plain = format_table(cm.compute(), ["a", "b", "c", "clutter"], without_last=False).splitlines()[-1]
    assert "mIoU-" not in plain and "mF1-" not in plain and f"mIoU {100 / 3:.2f}" in plain
