"""Original NAPG checkpoints: key layout, round trip, one-line errors, and the converter tool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tools.convert_original_checkpoint as convert
from models import FCDiscriminatorHighMask, NAPGNet, load_original_checkpoint, to_original_state_dict
from tests.helpers import fixture_path
from utils.errors import UserError, run_cli


def _model(seed: int, **kwargs) -> NAPGNet:
    torch.manual_seed(seed)
    return NAPGNet(backbone=kwargs.pop("backbone", "resnet18"), **kwargs).eval()


def _disc(seed: int, num_classes: int = 6) -> FCDiscriminatorHighMask:
    torch.manual_seed(seed)
    return FCDiscriminatorHighMask(num_classes)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _one_line_error(match: str, *args) -> str:
    with pytest.raises(UserError, match=match) as err:
        load_original_checkpoint(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture(scope="module")
def source() -> tuple[NAPGNet, FCDiscriminatorHighMask, FCDiscriminatorHighMask]:
    """A model with non-default BatchNorm statistics (so buffers are checked too) and two discriminators."""
    model = _model(0)
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 64, 64))
    return model.eval(), _disc(1), _disc(2)


@pytest.fixture(scope="module")
def ckpt(source) -> dict[str, dict[str, torch.Tensor]]:
    return to_original_state_dict(*source)


@pytest.fixture(scope="module")
def target() -> NAPGNet:
    """A model that failing loads must leave untouched (shared by the tests of errors)."""
    return _model(1)


def test_key_layout_equals_the_original_state_dict() -> None:
    torch.manual_seed(0)
    ckpt = to_original_state_dict(NAPGNet(num_classes=6, backbone="resnet50"), FCDiscriminatorHighMask(6))
    ours = [(k, v) for k, v in ckpt["network"].items()] + [(f"D.{k}", v) for k, v in ckpt["GAN"].items()]
    lines = fixture_path("state_dict_keys.txt").read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line[0] == "#"]

    def describe(v: torch.Tensor) -> tuple[str, str]:
        return "x".join(map(str, v.shape)) or "scalar", str(v.dtype).removeprefix("torch.")

    assert [(k, *describe(v)) for k, v in ours] == [tuple(row) for row in rows]


def test_round_trip_through_an_original_checkpoint_file(tmp_path: Path, source, ckpt) -> None:
    torch.save(ckpt, tmp_path / "orig.pth")
    dst, e1, e2 = _model(10), _disc(11), _disc(12)
    report = load_original_checkpoint(tmp_path / "orig.pth", dst, e1, e2)
    assert report["loaded"] == ["network", "GAN -> d1", "GAN2 -> d2"]
    assert report["ignored"] == ["resnet.fc.weight", "resnet.fc.bias"]
    for a, b in zip(source, (dst, e1, e2), strict=True):
        _assert_same_state(a, b)
    x, p = torch.rand(2, 3, 64, 64), torch.randn(12, 128)
    with torch.no_grad():
        want, got = source[0](x, p), dst(x, p)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_bare_network_and_data_parallel_state_dicts_load(source, ckpt, target) -> None:
    network = ckpt["network"]
    dst = _model(2)
    for state in (network, {"network": {f"module.{k}": v for k, v in network.items()}}):
        dst.load_state_dict(_model(3).state_dict())
        assert load_original_checkpoint(state, dst)["loaded"] == ["network"]
        _assert_same_state(source[0], dst)
    _one_line_error("no 'GAN'", network, target, _disc(0))


def test_similarity_convs_shared_versus_per_class(source, ckpt, target) -> None:
    shared = source[0]
    per_class = _model(4, shared_similarity=False)
    # one shared conv fills every per-class conv
    dst = _model(5, shared_similarity=False)
    load_original_checkpoint(ckpt, dst)
    for conv in dst.head.sim:
        assert torch.equal(conv.weight, shared.head.sim[0].weight)
    # per-class convs round-trip, but cannot be squeezed into one shared conv
    per_class_ckpt = to_original_state_dict(per_class)
    load_original_checkpoint(per_class_ckpt, dst)
    _assert_same_state(per_class, dst)
    msg = _one_line_error("shared_similarity=False", per_class_ckpt, target)
    assert "sim_0.0.weight and sim_1.0.weight differ" in msg


def test_mismatches_give_one_line_user_errors(tmp_path: Path, ckpt, target) -> None:
    before = {k: v.clone() for k, v in target.state_dict().items()}
    missing = {**ckpt, "network": {k: v for k, v in ckpt["network"].items() if k != "aspp.2.running_var"}}
    assert "aspp.2.running_var" in _one_line_error("lacks 1 keys", missing, target)
    extra = {**ckpt, "network": {**ckpt["network"], "aux.weight": torch.zeros(1)}}
    assert "aux.weight" in _one_line_error("unexpected", extra, target)
    five = to_original_state_dict(_model(0, num_classes=5), _disc(1, 5))
    assert "5 classes" in _one_line_error("--num-classes 5", five, target)
    assert "5 classes" in _one_line_error("--num-classes 5", {**ckpt, "GAN": five["GAN"]}, target, _disc(3))
    resnet34 = to_original_state_dict(_model(0, backbone="resnet34"))
    _one_line_error("--backbone resnet34", resnet34, target)
    reshaped = {**ckpt, "network": {**ckpt["network"], "aspp.1.bias": torch.zeros(64)}}
    _one_line_error("aspp.1.bias has shape", reshaped, target)
    # a discriminator that does not fit stops the network from being loaded too
    _one_line_error("unexpected", {**ckpt, "GAN": {**ckpt["GAN"], "x": torch.zeros(1)}}, target, _disc(5))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    torch.save(ckpt, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("hello")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    for name in ("truncated.pth", "text.pth", "list.pth", "absent.pth"):
        assert name in _one_line_error("original checkpoint", tmp_path / name, target)


def test_convert_tool_writes_our_format_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   source, ckpt) -> None:
    model, d1, d2 = source
    torch.save(ckpt, tmp_path / "orig.pth")
    out = tmp_path / "conv" / "ours.pt"
    argv = ["--checkpoint", str(tmp_path / "orig.pth"), "--out", str(out), "--backbone", "resnet18"]
    assert convert.main(argv) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ours.pt"]  # no temporary file left
    converted = torch.load(out, weights_only=True)
    assert set(converted) == {"model", "d1", "d2", "prototypes", "meta"} and converted["prototypes"] is None
    assert converted["meta"]["backbone"] == "resnet18" and converted["meta"]["num_classes"] == 6
    assert converted["meta"]["stage"] == "original"
    for ours, theirs in ((converted["model"], model), (converted["d1"], d1), (converted["d2"], d2)):
        assert ours.keys() == theirs.state_dict().keys()
        assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())

    stamp = out.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(convert.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert out.stat().st_mtime_ns == stamp
    assert convert.main(argv + ["--overwrite"]) == 0

    torch.save(ckpt["network"], tmp_path / "bare.pth")
    bare_out = tmp_path / "bare.pt"
    assert convert.main(["--checkpoint", str(tmp_path / "bare.pth"), "--out", str(bare_out),
                         "--backbone", "resnet18"]) == 0
    bare = torch.load(bare_out, weights_only=True)
    assert set(bare) == {"model", "prototypes", "meta"}  # no discriminators in a bare network state dict
