"""Sliding-window inference against plain references of the same formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.inference import SlideConfig, predict_image, slide_bands, window_origins
from models import NAPGNet
from tests.helpers import assert_close


def slide_logits(model, image: torch.Tensor, cfg: SlideConfig, device: torch.device) -> torch.Tensor:
    """The whole image's mean window logits, its row bands put together: [3, H, W] -> [C, H, W]."""
    return torch.cat([band for _, band in slide_bands(model, image, cfg, device)], 1)


@pytest.fixture(scope="module")
def model() -> NAPGNet:
    torch.manual_seed(0)
    net = NAPGNet(num_classes=6, backbone="resnet18").eval()
    # Random BatchNorm statistics so that the network is not close to constant.
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _whole(model: NAPGNet, image: torch.Tensor, net_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Whole-image inference: [3, H, W] in [0, 1] -> logits [C, H, W] (optionally at another network size)."""
    x = image[None]
    if net_size is not None:
        x = F.interpolate(x, net_size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        logits = model(x)["logits_up"]
    return F.interpolate(logits, image.shape[-2:], mode="bilinear", align_corners=False)[0]


def _per_window_loop(model: NAPGNet, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's slide_inference written out: one window at a time, full-size sum and count."""
    _, h, w = image.shape
    total = torch.zeros(6, h, w)
    count = torch.zeros(h, w)
    for hi in range(max(h - crop + stride - 1, 0) // stride + 1):
        for wi in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(hi * stride + crop, h), min(wi * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            total[:, y1:y2, x1:x2] += _whole(model, image[:, y1:y2, x1:x2])
            count[y1:y2, x1:x2] += 1
    return total / count


def test_window_origins_cover_the_side_with_the_last_window_flush():
    assert window_origins(100, 64, 40) == [0, 36]
    assert window_origins(200, 64, 40) == [0, 40, 80, 120, 136]
    assert window_origins(50, 64, 40) == [0]  # shorter than a window: one window of the side's length


def test_one_window_equals_whole_image_inference(model):
    image = torch.rand(3, 64, 96)
    assert_close(slide_logits(model, image, SlideConfig(crop=128, stride=64), torch.device("cpu")),
                 _whole(model, image), "one window")


def test_one_scaled_window_equals_whole_image_inference_at_that_scale(model):
    image = torch.rand(3, 128, 192)
    cfg = SlideConfig(crop=128, stride=64, scale=0.5)  # a window is 256 image px: the whole image
    assert_close(slide_logits(model, image, cfg, torch.device("cpu")), _whole(model, image, (64, 96)), "scaled")


def test_short_window_equals_inference_on_the_zero_padded_image(model):
    image = torch.rand(3, 50, 70)  # smaller than the crop, and not a multiple of 32
    padded = F.pad(image, (0, 26, 0, 14))
    with torch.no_grad():
        logits = model(padded[None])["logits_up"]
    want = F.interpolate(logits, (64, 96), mode="bilinear", align_corners=False)[0, :, :50, :70]
    assert_close(slide_logits(model, image, SlideConfig(crop=128, stride=64), torch.device("cpu")), want, "padded")


def test_a_windowed_network_pads_a_short_window_to_its_own_window(model):
    windowed = NAPGNet(num_classes=6, backbone="resnet18", window=64).eval()
    windowed.load_state_dict(model.state_dict())
    image = torch.rand(3, 50, 70)  # padded to 64 x 128 (two of the network's windows), not to 64 x 96
    padded = F.pad(image, (0, 58, 0, 14))
    with torch.no_grad():
        logits = windowed(padded[None])["logits_up"]
    want = F.interpolate(logits, (64, 128), mode="bilinear", align_corners=False)[0, :, :50, :70]
    assert_close(slide_logits(windowed, image, SlideConfig(crop=128, stride=64), torch.device("cpu")), want,
                 "window-padded")


def test_uint8_input_equals_unit_float_input(model):
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    cfg = SlideConfig(crop=64, stride=64)
    assert_close(slide_logits(model, image, cfg, torch.device("cpu")),
                 slide_logits(model, image.float() / 255, cfg, torch.device("cpu")), "uint8")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_windows_equal_a_plain_per_window_loop(model, batch_size):
    image = torch.rand(3, 150, 170)  # 4 x 4 windows, the last row and column shifted inside the image
    cfg = SlideConfig(crop=64, stride=40, batch_size=batch_size)
    got = slide_logits(model, image, cfg, torch.device("cpu"))
    assert got.shape == (6, 150, 170)
    assert_close(got, _per_window_loop(model, image, 64, 40), "slide")


def test_flip_tta_averages_with_the_mirrored_image(model):
    image = torch.rand(3, 64, 64)
    got = slide_logits(model, image, SlideConfig(crop=64, stride=64, hflip=True), torch.device("cpu"))
    want = (_whole(model, image) + _whole(model, image.flip(-1)).flip(-1)) / 2
    assert_close(got, want, "hflip")


def test_predict_image_outputs_match_the_logits(model):
    image = torch.rand(3, 150, 170)
    cfg = SlideConfig(crop=64, stride=40)
    logits = slide_logits(model, image, cfg, torch.device("cpu"))
    pred = predict_image(model, image, cfg, torch.device("cpu"), entropy=True, probs=True)
    prob = logits.softmax(0)
    assert torch.equal(torch.from_numpy(pred.classes).long(), logits.argmax(0))
    want_entropy = -(prob * prob.clamp_min(1e-30).log()).sum(0) / torch.log(torch.tensor(6.0))
    assert_close(torch.from_numpy(pred.entropy), want_entropy, "entropy", rel=1e-4)
    assert (torch.from_numpy(pred.probs).float() - prob * 255).abs().max() <= 0.5 + 1e-3
    assert not model.training
