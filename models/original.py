"""Original NAPG checkpoints <-> our modules.

An original checkpoint (``main/step*.py`` of Fanrongbo/NAPG-UDA-RS-SS) is a dict with ``network``
(``DeepLabV3PlusSimGlobalLinearKL3neibor``), ``GAN`` (D1) and ``GAN2`` (D2) state dicts, plus an
optimizer and ``None`` entries that are not used here. Key names (tests/fixtures/state_dict_keys.txt):

=======================================  ===========================================
original                                 ours (``NAPGNet``)
=======================================  ===========================================
``resnet.{conv1,bn1,layer1..4}.*``       ``backbone.*``
``resnet.fc.*``                          (unused by the original; ignored)
``aspp.0.{convs,pool,project}.*``        ``aspp.{convs,pool,project}.*``
``aspp.1.*`` ConvTranspose2d             ``up.0.*``
``aspp.2.*`` BatchNorm2d                 ``up.1.*``
``classifier.*``                         ``classifier.*``
``sim_{c}.0.*``, c = 0..C-1              ``head.sim.0.*`` (shared: six names of one conv)
                                         or ``head.sim.{c}.*`` (per class)
=======================================  ===========================================

The discriminators use the original names already (``FCDiscriminator.{0,2,4,6,8}.*``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.discriminator import FCDiscriminatorHighMask
from models.napg import NAPGNet
from utils.errors import UserError

FC_KEYS = ("resnet.fc.weight", "resnet.fc.bias")
IMAGENET_CLASSES = 1000
# (number of blocks in layer3, bottleneck?) -> architecture, to name the backbone in error messages
_RESNET_SIGNATURES = {(2, False): "resnet18", (6, False): "resnet34", (6, True): "resnet50",
                      (23, True): "resnet101"}


def _ours_to_original(key: str, model: NAPGNet) -> list[str]:
    """Original name(s) of one of our network keys (a shared sim conv has one name per class)."""
    for ours, orig in (("backbone.", "resnet."), ("aspp.", "aspp.0."), ("up.0.", "aspp.1."),
                       ("up.1.", "aspp.2."), ("classifier.", "classifier.")):
        if key.startswith(ours):
            return [orig + key[len(ours):]]
    match = re.fullmatch(r"head\.sim\.(\d+)\.(\w+)", key)
    if match is None:
        raise KeyError(f"no original name for {key}")
    index, name = int(match[1]), match[2]
    classes = range(model.num_classes) if model.head.shared else [index]
    return [f"sim_{c}.0.{name}" for c in classes]


def _original_items(model: NAPGNet) -> list[tuple[str, torch.Tensor]]:
    """(original name, tensor) pairs of the network in the original order, without copies."""
    items = [(name, value) for key, value in model.state_dict().items() for name in _ours_to_original(key, model)]
    n_backbone = sum(name.startswith("resnet.") for name, _ in items)
    backbone_channels = model.aspp.pool[1].in_channels
    fc = [(FC_KEYS[0], torch.zeros(IMAGENET_CLASSES, backbone_channels)),
          (FC_KEYS[1], torch.zeros(IMAGENET_CLASSES))]
    rest = [it for it in items[n_backbone:] if not it[0].startswith("sim_")]
    # The original registers sim_0 .. sim_{C-1} one after the other (weight, bias of each).
    sims = sorted((it for it in items if it[0].startswith("sim_")), key=lambda it: int(it[0][4:it[0].index(".")]))
    return items[:n_backbone] + fc + rest + sims


def to_original_state_dict(model: NAPGNet, d1: nn.Module | None = None,
                           d2: nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Our modules as an original checkpoint: ``{"network": ..., "GAN": ..., "GAN2": ...}``.

    ``GAN``/``GAN2`` are present only when ``d1``/``d2`` are given. ``resnet.fc.*`` are zero
    placeholders of the original's shapes (the original never uses them). Tensors are copies.
    """
    ckpt = {"network": {name: value.detach().clone() for name, value in _original_items(model)}}
    for name, d in (("GAN", d1), ("GAN2", d2)):
        if d is not None:
            ckpt[name] = {k: v.detach().clone() for k, v in d.state_dict().items()}
    return ckpt


def read_original_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an original checkpoint file with ``weights_only=True``; unreadable files raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"original checkpoint {path} does not exist; pass the .pth file saved by NAPG's "
                        f"step scripts with --checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, foreign or non-torch files fail in many ways
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        raise UserError(f"cannot read original checkpoint {path} ({type(err).__name__}: {reason}); pass an "
                        f"intact .pth file saved by NAPG's step scripts") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"original checkpoint {path} holds a {type(ckpt).__name__}, not a dict; pass the "
                        f".pth file saved by NAPG's step scripts")
    return ckpt


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    # Checkpoints saved from nn.DataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _as_state(value: Any, what: str, src: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not value or not all(torch.is_tensor(v) for v in value.values()):
        raise UserError(f"{src}: {what} is not a state dict of tensors; pass a checkpoint saved by NAPG's "
                        f"step scripts")
    return _strip_module(value)


def _guess_backbone(state: dict[str, torch.Tensor]) -> str | None:
    layer3 = {int(m[1]) for k in state if (m := re.match(r"resnet\.layer3\.(\d+)\.", k))}
    bottleneck = any(k.startswith("resnet.layer1.0.conv3.") for k in state)
    return _RESNET_SIGNATURES.get((len(layer3), bottleneck))


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str,
                src: str) -> None:
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing:
        raise UserError(f"{src}: {what} lacks {len(missing)} keys (e.g. {missing[0]}); pass an original NAPG "
                        f"checkpoint that matches the model (--backbone, --num-classes)")
    if unexpected:
        raise UserError(f"{src}: {what} has {len(unexpected)} unexpected keys (e.g. {unexpected[0]}); pass "
                        f"an original NAPG checkpoint that matches the model (--backbone, --num-classes)")
    if wrong:
        k = wrong[0]
        raise UserError(f"{src}: {what} key {k} has shape {list(given[k].shape)}, the model "
                        f"{list(expected[k].shape)}; check --backbone and --num-classes")


def _network_state(network: dict[str, torch.Tensor], model: NAPGNet, src: str) -> dict[str, torch.Tensor]:
    """Validate an original ``network`` state dict and rename it to our keys."""
    classes = network.get("classifier.weight")
    if classes is not None and classes.shape[0] != model.num_classes:
        raise UserError(f"{src} has {classes.shape[0]} classes, the model {model.num_classes}; pass "
                        f"--num-classes {classes.shape[0]}")
    arch = _guess_backbone(network)
    if arch is not None and arch != model.backbone_name:
        raise UserError(f"{src} has a {arch} backbone, the model {model.backbone_name}; "
                        f"pass --backbone {arch}")
    expected = dict(_original_items(model))
    given = {k: v for k, v in network.items() if k not in FC_KEYS}
    _check_keys({k: v for k, v in expected.items() if k not in FC_KEYS}, given, "network", src)
    ours = {}
    for key in model.state_dict():
        names = _ours_to_original(key, model)
        first = given[names[0]]
        for other in names[1:]:
            if not torch.equal(given[other], first):
                raise UserError(f"{src}: {names[0]} and {other} differ (per-class similarity convs) but the "
                                f"model shares one; build it with shared_similarity=False (--shared-similarity false)")
        ours[key] = first
    return ours


def load_original_checkpoint(path_or_state: str | Path | dict[str, Any], model: NAPGNet,
                             d1: FCDiscriminatorHighMask | None = None,
                             d2: FCDiscriminatorHighMask | None = None) -> dict[str, Any]:
    """Fill ``model`` (and ``d1``/``d2`` when given) from an original NAPG checkpoint.

    ``path_or_state``: a path (read with ``weights_only=True``), a checkpoint dict with ``network``,
    ``GAN``, ``GAN2``, or a bare ``network`` state dict. Everything is validated before anything is
    loaded; any mismatch raises ``UserError``. Returns ``{"source", "loaded", "ignored"}``: the
    checkpoint entries loaded (``network``, ``GAN -> d1``, ...) and the original keys left out.
    """
    if isinstance(path_or_state, dict):
        ckpt, src = path_or_state, "checkpoint"
    else:
        ckpt, src = read_original_checkpoint(path_or_state), str(path_or_state)
    if "network" in ckpt:
        network = _as_state(ckpt["network"], "'network'", src)
    else:
        network = _as_state(ckpt, "the file", src)
    states: list[tuple[nn.Module, dict[str, torch.Tensor], str]] = [
        (model, _network_state(network, model, src), "network")]
    for d, name, target in ((d1, "GAN", "d1"), (d2, "GAN2", "d2")):
        if d is None:
            continue
        if ckpt.get(name) is None:
            raise UserError(f"{src} has no '{name}' discriminator weights for {target}; pass a checkpoint "
                            f"saved by NAPG's step scripts or do not ask for {target}")
        state = _as_state(ckpt[name], f"'{name}'", src)
        first = state.get("FCDiscriminator.0.weight")
        if first is not None and first.shape[1] != model.num_classes:
            raise UserError(f"{src}: {name} takes {first.shape[1]} classes, the model {model.num_classes}; "
                            f"pass --num-classes {first.shape[1]}")
        _check_keys(d.state_dict(), state, f"'{name}'", src)
        states.append((d, state, f"{name} -> {target}"))
    for module, state, _ in states:
        module.load_state_dict(state)
    ignored = [k for k in FC_KEYS if k in network]
    ignored += [name for d, name in ((d1, "GAN"), (d2, "GAN2")) if d is None and ckpt.get(name) is not None]
    return {"source": src, "loaded": [label for _, _, label in states], "ignored": ignored}
