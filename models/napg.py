"""The NAPG segmentation network (docs/method.md §1).

ResNet at output stride 32 -> ASPP (rates 6/12/18 + image pooling, no 1x1 branch) -> ConvTranspose x2
+ BN + ReLU giving the 128-channel features ``f`` at H/16 -> a 1x1 classifier (``logits`` at H/16,
``logits_up`` at H/4) and the prototype-similarity head (``models.head``). Despite the original's
class name (``DeepLabV3PlusSimGlobalLinearKL3neibor``) there is no low-level skip and no decoder.

State-dict keys (stable; ``models.original`` maps them to the original names):

* ``backbone.{conv1,bn1,layer1..layer4}.*`` -- torchvision ResNet names without ``fc``
* ``aspp.convs.{0,1,2}.{0: conv, 1: bn}.*``, ``aspp.pool.{1: conv, 2: bn}.*``,
  ``aspp.project.{0: conv, 1: bn}.*``
* ``up.0.*`` ConvTranspose2d(256, 128), ``up.1.*`` BatchNorm2d(128)
* ``classifier.*`` Conv2d(128, C, 1)
* ``head.sim.{0 | 0..C-1}.*`` the similarity conv(s), see ``models.head``
* ``target_bn.<bn path with _>.{running_mean,running_var,num_batches_tracked}`` -- only with
  ``bn_stats="domain"``: the target domain's BatchNorm statistics (the plain BN keys hold the source's)

Inputs are expected in [0, 1] (x / 255) as in the original; normalisation is the data pipeline's job.
The image-pooling branch has BatchNorm on a 1x1 map, so training mode needs a batch of at least 2
(as in the original).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from models.head import PrototypeHead, group_max, group_prob
from utils.checkpoint import sha256_file
from utils.errors import UserError

# name -> (constructor, weights enum, output channels of layer4)
BACKBONES = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights, 512),
    "resnet34": (tvm.resnet34, tvm.ResNet34_Weights, 512),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights, 2048),
    "resnet101": (tvm.resnet101, tvm.ResNet101_Weights, 2048),
}
BACKBONE_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
FEATURE_CHANNELS = 128
# Image px per feature-map px: the backbone's output stride 32, halved by the transposed conv.
FEATURE_STRIDE = 16
LOGITS_UP_STRIDE = 4  # image px per px of ``logits_up``, the classifier's output (the original's H/4)
ASPP_CHANNELS = 256
ASPP_RATES = (6, 12, 18)  # the dilations of ASPP's 3x3 branches (engine/coverage.py: which taps a map size uses)
BN_STATS = ("shared", "domain")
DOMAINS = ("source", "target")
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def build_backbone(name: str) -> nn.Sequential:
    """Randomly initialised torchvision ResNet stem + layer1..4 (OS32, no dilation, no fc)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    resnet = BACKBONES[name][0](weights=None)
    return nn.Sequential(OrderedDict((stage, getattr(resnet, stage)) for stage in BACKBONE_STAGES))


def cached_imagenet_weights(name: str) -> Path | None:
    """Path of torchvision's ImageNet weights for ``name`` in the torch hub cache, or None.

    The DEFAULT weights (V2 for resnet50/101, as in the original) are preferred; any other
    ImageNet release of the same architecture that is present is used otherwise.
    """
    weights_enum = BACKBONES[name][1]
    candidates = [weights_enum.DEFAULT] + [w for w in weights_enum if w is not weights_enum.DEFAULT]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for weights in candidates:
        path = cache / Path(weights.url).name
        if path.is_file():
            return path
    return None


def weights_record(path: Path | None) -> dict[str, str] | None:
    """File name and sha256 of the weights that initialised the backbone (None: random init), for env.json."""
    return None if path is None else {"file": path.name, "sha256": sha256_file(path)}


def load_backbone_weights(backbone: nn.Sequential, path: str | Path, name: str) -> None:
    """Load a torchvision-format ResNet state dict (``fc.*`` ignored) into ``backbone``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained weights {path} do not exist; pass a torchvision {name} state dict "
                        f"with --pretrained PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file can fail in many ways; all are the user's to fix
        raise UserError(f"cannot read pretrained weights {path} ({type(err).__name__}); pass a torchvision "
                        f"{name} state dict with --pretrained PATH") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"pretrained weights {path} are not a state dict of tensors; pass a torchvision "
                        f"{name} state dict with --pretrained PATH")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [f"{label} {len(keys)} keys (e.g. {keys[0]})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong))
                if keys]
    if problems:
        raise UserError(f"pretrained weights {path} do not fit a {name} backbone: {', '.join(problems)}; "
                        f"pass a torchvision {name} state dict with --pretrained PATH or change --backbone")
    backbone.load_state_dict(state)


def upsample_logits(logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """The classifier's scores [B, C, h, w] -> ``logits_up`` [B, C, *out_size]: bilinear with corners aligned,
    as the original (so the corner cells land on the corner pixels)."""
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Three dilated 3x3 branches + an image-pooling branch, concatenated and projected.

    [B, cin, h, w] -> [B, cout, h, w]. No 1x1 branch and no dropout (as in the original).
    """

    def __init__(self, cin: int, cout: int = ASPP_CHANNELS, rates: tuple[int, ...] = ASPP_RATES):
        super().__init__()
        self.convs = nn.ModuleList(_conv_bn_relu(cin, cout, 3, rate) for rate in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, cout, 1))
        self.project = _conv_bn_relu(cout * (len(rates) + 1), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [conv(x) for conv in self.convs]
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.project(torch.cat(branches + [pooled], dim=1))


class _RunningStats(nn.Module):
    """A second set of running statistics for one BatchNorm layer, starting as a copy of its own."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        for k in _RUNNING:
            self.register_buffer(k, getattr(bn, k).detach().clone())


def _key(module_name: str) -> str:
    return module_name.replace(".", "_")


def _swap(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Exchange the running-statistics buffers of each (BatchNorm, _RunningStats) pair."""
    for bn, stats in pairs:
        for k in _RUNNING:
            mine, theirs = getattr(bn, k), getattr(stats, k)
            setattr(bn, k, theirs)
            setattr(stats, k, mine)


class NAPGNet(nn.Module):
    """NAPG network: classifier logits plus prototype-group outputs.

    Args:
        num_classes: C.
        backbone: resnet18 | resnet34 | resnet50 | resnet101.
        pretrained: None (random init), ``"imagenet"`` (torchvision weights from the torch hub
            cache, never downloaded) or a path to a torchvision-format ResNet state dict.
        shared_similarity: one similarity conv for all classes (the original) or one per class.
        head_impl: ``"fast"`` or ``"reference"`` (see ``models.head``).
        bn_stats: ``"shared"`` (one set of BatchNorm running statistics, the original) or ``"domain"``
            (a second set for the target domain; affine weights stay shared, see ``domain``).
        window: None (every input whole) or a side in px (multiple of 32): inputs larger than
            ``window`` x ``window`` are cut into non-overlapping windows of that side, each segmented as
            an image of its own, and the outputs put back together (see ``forward``).
    """

    def __init__(self, num_classes: int = 6, backbone: str = "resnet50",
                 pretrained: str | Path | None = None, shared_similarity: bool = True,
                 head_impl: str = "fast", bn_stats: str = "shared", window: int | None = None):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        if window is not None and (window < 32 or window % 32):
            raise ValueError(f"window must be a multiple of 32, got {window}")
        self.window = window
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone)
        self.pretrained_path = self._load_pretrained(pretrained)
        self.aspp = ASPP(BACKBONES[backbone][2])
        self.up = nn.Sequential(
            nn.ConvTranspose2d(ASPP_CHANNELS, FEATURE_CHANNELS, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(FEATURE_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(FEATURE_CHANNELS, num_classes, 1)
        self.head = PrototypeHead(num_classes, FEATURE_CHANNELS, shared=shared_similarity, impl=head_impl)
        self.bn_stats = bn_stats
        if bn_stats == "domain":
            # Per-domain BatchNorm statistics (AdaBN, Li et al. 2017; DSBN, Chang et al. CVPR 2019, without
            # separate affine weights): every stage forwards source and target batches separately in
            # training mode, so training normalises each domain by its own statistics; one running mixture
            # would make evaluation and the prototype refresh see features training never produced.
            self.target_bn = nn.ModuleDict({_key(name): _RunningStats(bn) for name, bn in self._batchnorms()})

    def _batchnorms(self) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        return ((n, m) for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    @contextmanager
    def domain(self, name: str):
        """Inside the block the BatchNorm layers use (and in training mode update) ``name``'s statistics.

        With ``bn_stats="shared"`` or ``name="source"`` this does nothing. The target statistics' tensors
        take the place of the BN layers' own buffers and are put back on exit. Tensors are exchanged, not
        their values: autograd keeps the statistics a training-mode forward saved for the backward, and
        DDP, which broadcasts every buffer of the network, still finds the same set of tensors.
        """
        if name not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {name!r}")
        if self.bn_stats == "shared" or name == "source":
            yield
            return
        pairs = [(bn, self.target_bn[_key(n)]) for n, bn in self._batchnorms()]
        _swap(pairs)
        try:
            yield
        finally:
            _swap(pairs)

    @contextmanager
    def evaluating(self, name: str):
        """Inside the block the network is in eval mode with ``name``'s BatchNorm statistics; on exit both
        are as they were. What every evaluation-like pass runs under: evaluation, the prototype refresh,
        inference and the pictures (docs/method.md §1: each reads the statistics of the domain it reads)."""
        was_training = self.training
        self.eval()
        try:
            with self.domain(name):
                yield
        finally:
            self.train(was_training)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads any checkpoint of this network whatever its ``bn_stats``: a checkpoint without target
        statistics starts them as copies of its (shared) statistics; one with them loaded into a
        ``shared`` network keeps only the source statistics."""
        state = {k: v for k, v in state_dict.items() if not k.startswith("target_bn.")}
        if self.bn_stats == "domain":
            for name, _ in self._batchnorms():
                for k in _RUNNING:
                    key = f"target_bn.{_key(name)}.{k}"
                    state[key] = state_dict.get(key, state_dict.get(f"{name}.{k}"))
            state = {k: v for k, v in state.items() if v is not None}  # a missing key is reported below
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _load_pretrained(self, pretrained: str | Path | None) -> Path | None:
        if pretrained is None:
            return None
        if str(pretrained) == "imagenet":
            path = cached_imagenet_weights(self.backbone_name)
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            default = Path(BACKBONES[self.backbone_name][1].DEFAULT.url).name
            if path is None:
                raise UserError(f"no ImageNet weights for {self.backbone_name} in {cache} (nothing is "
                                f"downloaded): put torchvision's {default} there, pass a {self.backbone_name} "
                                f"state dict with --pretrained PATH, or --pretrained null for random init")
            if path.name != default:  # the numbers will not be comparable with the original's
                print(f"warning: {default} (the ImageNet weights the original used) is not in {cache}; "
                      f"initialising {self.backbone_name} from {path.name} instead", file=sys.stderr)
        else:
            path = Path(pretrained)
        load_backbone_weights(self.backbone, path, self.backbone_name)
        return path

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] (H, W multiples of 32) -> features f [B, 128, H/16, W/16] (>= 0)."""
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"input height and width must be multiples of 32, got {tuple(x.shape[-2:])}")
        return self.up(self.aspp(self.backbone(x)))

    def decode(self, features: torch.Tensor, out_size: tuple[int, int],
               prototypes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Heads on features [B, 128, h, w]; ``out_size`` is the size of ``logits_up`` (H/4, W/4).

        Returns ``logits`` [B, C, h, w], ``logits_up`` [B, C, *out_size], ``features`` and, with
        prototypes [C*K, 128] (class-major, shared by the batch), ``proto_logits`` [B, C*K, h, w],
        ``proto_max`` [B, C, h, w] (max over K of the logits) and ``proto_prob`` [B, C, h, w]
        (joint softmax over C*K, then max over K).
        """
        logits = self.classifier(features)
        out = {
            "logits": logits,
            "logits_up": upsample_logits(logits, out_size),
            "features": features,
        }
        if prototypes is not None:
            cat = self.head(features, prototypes)
            out["proto_logits"] = cat
            out["proto_max"] = group_max(cat, self.num_classes)
            out["proto_prob"] = group_prob(cat, self.num_classes)
        return out

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x [B, 3, H, W] in [0, 1], prototypes [C*K, 128] or None -> dict (see ``decode``).

        With ``window`` set and x larger than a window, H and W must be multiples of it: the network
        segments each window on its own (its BatchNorm, in training mode, sees the windows as a batch)
        and every output map is the windows' maps side by side, so a model trained on ``window``-px
        crops is evaluated on larger patches with the receptive field and context it was trained with.
        """
        grid = self._window_grid(x)
        if grid is not None:
            out = self._forward(to_windows(x, self.window), prototypes)
            return {name: from_windows(maps, grid) for name, maps in out.items()}
        return self._forward(x, prototypes)

    def _forward(self, x: torch.Tensor, prototypes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        features = self.extract_features(x)
        return self.decode(features, (x.shape[-2] // LOGITS_UP_STRIDE, x.shape[-1] // LOGITS_UP_STRIDE), prototypes)

    def _window_grid(self, x: torch.Tensor) -> tuple[int, int] | None:
        """Windows per column and row of x [B, 3, H, W] (None: x is segmented whole)."""
        if self.window is None or tuple(x.shape[-2:]) == (self.window, self.window):
            return None
        height, width = x.shape[-2:]
        if height % self.window or width % self.window:
            raise ValueError(f"input sides {height} x {width} must be multiples of the window ({self.window} px)")
        return height // self.window, width // self.window


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H / window) * (W / window), C, window, window], windows in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, window, window)


def from_windows(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_windows` for maps of any resolution: [B * rows * cols, C, h, w] ->
    [B, C, rows * h, cols * w] with ``grid`` = (rows, cols)."""
    rows, cols = grid
    n, c, h, w = maps.shape
    maps = maps.reshape(n // (rows * cols), rows, cols, c, h, w)
    return maps.permute(0, 3, 1, 4, 2, 5).reshape(-1, c, rows * h, cols * w)
