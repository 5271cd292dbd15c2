"""The whole NAPG network: shapes, modes, backbones, pretrained weights."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

from models import NAPGNet
from models.napg import BACKBONES, build_backbone, weights_record
from utils.errors import UserError


@pytest.fixture(scope="module")
def net() -> NAPGNet:
    torch.manual_seed(0)
    return NAPGNet(num_classes=6, backbone="resnet18").train()


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("size", [(256, 256), (320, 192)], ids=["256", "320x192"])
def test_output_shapes(net: NAPGNet, size: tuple[int, int], k: int) -> None:
    h, w = size
    with torch.no_grad():
        out = net(torch.rand(2, 3, h, w), torch.randn(6 * k, 128))
    assert out["logits"].shape == (2, 6, h // 16, w // 16)
    assert out["logits_up"].shape == (2, 6, h // 4, w // 4)
    assert out["features"].shape == (2, 128, h // 16, w // 16)
    assert out["proto_logits"].shape == (2, 6 * k, h // 16, w // 16)
    assert out["proto_max"].shape == out["proto_prob"].shape == (2, 6, h // 16, w // 16)
    assert (out["features"] >= 0).all()  # ends with a ReLU
    assert ((out["proto_prob"] > 0) & (out["proto_prob"] <= 1)).all()


def test_without_prototypes_only_classifier_outputs(net: NAPGNet) -> None:
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 96))
    assert set(out) == {"logits", "logits_up", "features"}


def test_k_can_change_between_calls_without_new_parameters(net: NAPGNet) -> None:
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for k in (1, 2, 4):
            assert net(x, torch.randn(6 * k, 128))["proto_logits"].shape[1] == 6 * k
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_fast_and_reference_heads_give_the_same_network_outputs(net: NAPGNet) -> None:
    ref = copy.deepcopy(net).eval()
    ref.head.impl = "reference"
    fast = copy.deepcopy(net).eval()
    x, p = torch.rand(1, 3, 64, 96), torch.randn(12, 128)
    with torch.no_grad():
        a, b = fast(x, p), ref(x, p)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5 * b[key].abs().max().item())


def test_state_dict_layout() -> None:
    torch.manual_seed(0)
    for shared, n_convs in ((True, 1), (False, 6)):
        keys = NAPGNet(backbone="resnet18", shared_similarity=shared).state_dict().keys()
        assert {k.split(".")[0] for k in keys} == {"backbone", "aspp", "up", "classifier", "head"}
        assert {k for k in keys if k.startswith("head.")} == {
            f"head.sim.{i}.{n}" for i in range(n_convs) for n in ("weight", "bias")}
        assert not any(k.startswith("backbone.fc") for k in keys)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbones_are_output_stride_32_with_documented_channels(name: str) -> None:
    with torch.no_grad():
        y = build_backbone(name).eval()(torch.rand(1, 3, 64, 96))
    assert y.shape == (1, BACKBONES[name][2], 2, 3)


def test_invalid_inputs_are_rejected(net: NAPGNet) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.rand(2, 3, 64, 80))
    with pytest.raises(ValueError, match="prototypes"):
        net(torch.rand(2, 3, 64, 64), torch.randn(7, 128))
    with pytest.raises(ValueError, match="backbone"):
        NAPGNet(backbone="vgg16")


def _resnet18_state(path: Path, seed: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = tvm.resnet18(weights=None).state_dict()
    state["bn1.running_mean"] += 0.5  # a non-default buffer must arrive as well
    torch.save(state, path)
    return state


def _assert_backbone_is(model: NAPGNet, state: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_pretrained_path_round_trip(tmp_path: Path) -> None:
    state = _resnet18_state(tmp_path / "r18.pth")
    model = NAPGNet(backbone="resnet18", pretrained=tmp_path / "r18.pth")
    _assert_backbone_is(model, state)
    assert model.pretrained_path == tmp_path / "r18.pth"


def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="--pretrained") as err:
        NAPGNet(backbone="resnet18", pretrained="imagenet")
    assert "\n" not in str(err.value)
    cached = tmp_path / "checkpoints" / Path(tvm.ResNet18_Weights.DEFAULT.url).name
    cached.parent.mkdir()
    state = _resnet18_state(cached)
    model = NAPGNet(backbone="resnet18", pretrained="imagenet")
    _assert_backbone_is(model, state)
    assert model.pretrained_path == cached


def test_imagenet_prefers_the_originals_weights_and_warns_on_another_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    loaded = []
    monkeypatch.setattr("models.napg.load_backbone_weights", lambda backbone, path, name: loaded.append(path))
    cache = tmp_path / "checkpoints"
    cache.mkdir()
    v1 = cache / Path(tvm.ResNet50_Weights.IMAGENET1K_V1.url).name
    v2 = cache / Path(tvm.ResNet50_Weights.IMAGENET1K_V2.url).name
    assert tvm.ResNet50_Weights.DEFAULT is tvm.ResNet50_Weights.IMAGENET1K_V2
    v1.write_bytes(b"v1")
    NAPGNet(backbone="resnet50", pretrained="imagenet")
    err = capsys.readouterr().err
    assert loaded == [v1] and err.count("\n") == 1 and err.startswith("warning: ")
    assert v2.name in err and v1.name in err
    v2.write_bytes(b"v2")
    model = NAPGNet(backbone="resnet50", pretrained="imagenet")
    assert loaded[-1] == v2 and model.pretrained_path == v2 and capsys.readouterr().err == ""
    assert weights_record(v2) == {"file": v2.name, "sha256": hashlib.sha256(b"v2").hexdigest()}
    assert weights_record(None) is None


def test_bad_pretrained_files_give_one_line_user_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(tvm.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    for path in (tmp_path / "r34.pth", tmp_path / "junk.pth", tmp_path / "missing.pth"):
        with pytest.raises(UserError, match="--pretrained PATH") as err:
            NAPGNet(backbone="resnet18", pretrained=path)
        assert "\n" not in str(err.value)


def test_a_windowed_network_segments_each_window_as_its_own_image() -> None:
    torch.manual_seed(0)
    net = NAPGNet(num_classes=6, backbone="resnet18", window=64)
    x, prototypes = torch.rand(2, 3, 128, 192), torch.randn(12, 128)
    with torch.no_grad():
        net.eval()
        out = net(x, prototypes)
        for y0 in range(0, 128, 64):  # plain loop: each window through the network, compared in place
            for x0 in range(0, 192, 64):
                alone = net(x[:, :, y0:y0 + 64, x0:x0 + 64], prototypes)
                for name, maps in alone.items():
                    scale = maps.shape[-1] / 64
                    rows = slice(round(y0 * scale), round((y0 + 64) * scale))
                    cols = slice(round(x0 * scale), round((x0 + 64) * scale))
                    torch.testing.assert_close(out[name][:, :, rows, cols], maps, rtol=1e-4, atol=1e-5)
        # In training mode BatchNorm sees the windows as one batch, as a batch of window-sized crops.
        net.train()
        whole = net(x)["logits_up"]
        windows = net(torch.cat([x[:, :, y:y + 64, c:c + 64] for y in (0, 64) for c in (0, 64, 128)]))["logits_up"]
        n = len(x)
        torch.testing.assert_close(whole[:, :, :16, :16], windows[:n], rtol=1e-4, atol=1e-5)
    assert net(torch.rand(2, 3, 64, 64))["logits_up"].shape == (2, 6, 16, 16)  # one window: as is
    with pytest.raises(ValueError, match="multiples of the window"):
        net(torch.rand(2, 3, 96, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        NAPGNet(num_classes=6, backbone="resnet18", window=48)
