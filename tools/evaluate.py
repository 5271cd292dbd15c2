"""Evaluate a checkpoint on any domain and split, and print the metrics table.

    python tools/evaluate.py --checkpoint runs/demo/step2 --data-root data --domain vaihingen_irrg --split val

``--checkpoint`` takes a finished stage folder (its model.pt), a model.pt/best.pt file, or a converted
original checkpoint (all read by ``engine/handoff.py``); ``--normalize`` defaults to the checkpoint's.
``--protocol napg_legacy`` reproduces the original's numbers (H/4 maps, IoU + 1).
``--recalibrate-bn`` first re-estimates the BatchNorm statistics on the evaluated domain's *train* images
(no labels read; AdaBN), which is how a source-only model is given target statistics.

``--mode slide`` predicts whole images with sliding windows (``engine/inference.py``) and scores them at full
label resolution: the images of a prepared folder (``--data-root``/``--domain``; e.g. full tiles prepared with a
large ``--clip``), or the tiles of ``--split`` read straight from the raw ISPRS zips or folders::

    python tools/evaluate.py --checkpoint runs/demo/step2 --mode slide --raw ~/isprs/vaihingen \
        --dataset vaihingen --bands irrg [--labels full]
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from data.dataset import SegmentationFolder
from data.domains import CLASS_NAMES, resolve_domain
from data.isprs import DATASETS, LABEL_KINDS, decode_label, raw_to_train_ids
from data.loaders import build_loader
from data.prepare import decode_raw, find_tiles
from data.transforms import Resize
from engine.evaluate import evaluate, evaluate_tiles, recalibrate_bn
from engine.handoff import handoff_file, handoff_network, load_handoff
from engine.inference import SlideConfig
from engine.refresh import RefreshResult
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.metrics import PROTOCOLS, format_table
from utils.run import resolve_device, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--domain", help="registered domain name, alias or folder")
    parser.add_argument("--mode", default="patch", choices=("patch", "slide"),
                        help="patch: the prepared patches as they are; slide: whole images with sliding windows")
    parser.add_argument("--crop", type=int, default=512, help="slide: window side in network px")
    parser.add_argument("--stride", type=int, default=341, help="slide: window step in network px")
    parser.add_argument("--scale", type=float,
                        help="slide: resize factor image -> network (default: the checkpoint's training scale)")
    parser.add_argument("--raw", help="slide: folder of the raw ISPRS zips (or their extracted contents)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), help="slide with --raw: which benchmark")
    parser.add_argument("--bands", help="slide with --raw: rgb or irrg")
    parser.add_argument("--labels", default="eroded", choices=LABEL_KINDS, help="slide with --raw: ground truth")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--protocol", default="standard", choices=PROTOCOLS)
    parser.add_argument("--prototypes", default="auto", choices=("auto", "target", "source_target", "none"),
                        help="prototype set for the prototype branch (auto: target if present)")
    parser.add_argument("--label-format", choices=("mmseg_raw", "train_ids"))
    parser.add_argument("--normalize", choices=OPTIONS["normalize"].choices,
                        help="input normalisation (default: the one the checkpoint was trained with)")
    parser.add_argument("--resize", type=int, help="resize patches to this side (as the run did)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bn-domain", default="auto", choices=("auto", "source", "target"),
                        help="BatchNorm statistics of a --bn-stats domain checkpoint (auto: the checkpoint's target "
                             "statistics when --domain is its target, else its source statistics)")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-estimate the BatchNorm statistics on --domain's train images before evaluating")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    results, info = evaluate_checkpoint(args)
    for branch, metrics in results.items():
        print(f"{branch} branch, {args.domain}/{args.split}, {info['mode']}, protocol {args.protocol}, {info['bn']}:")
        print(format_table(metrics, CLASS_NAMES))
    if args.json:
        write_json(Path(args.json), {"checkpoint": info["checkpoint"], "domain": args.domain, "split": args.split,
                                     "mode": info["mode"], "protocol": args.protocol, "bn": info["bn"],
                                     "recalibrated_bn": info["recalibrated_bn"], **results})
    return 0


def evaluate_checkpoint(args: argparse.Namespace) -> tuple[dict, dict]:
    """Evaluate the checkpoint ``args`` name; returns (results, what was evaluated and how)."""
    path = handoff_file(args.checkpoint, "--checkpoint")
    state = load_handoff(path, flag="--checkpoint")
    meta = state["meta"]
    device = resolve_device(args.device)
    model = handoff_network(state, device)
    bn_domain = args.bn_domain
    if bn_domain == "auto":
        bn_domain = "target" if _is_target(meta, args.data_root, args.domain) else "source"
    bn = f"{bn_domain} BatchNorm statistics" if meta["bn_stats"] == "domain" else "shared BatchNorm statistics"
    if args.mode == "slide":
        cfg = SlideConfig(crop=args.crop, stride=args.stride, scale=args.scale or meta["input_scale"],
                          batch_size=args.batch_size, normalize=args.normalize or meta["normalize"], domain=bn_domain)
        results = evaluate_tiles(model, tqdm(_slide_tiles(args), desc="tiles", unit="tile"), cfg, device,
                                 meta["num_classes"])
        mode = f"slide (crop {cfg.crop}, stride {cfg.stride}, scale {cfg.scale:g})"
        return results, {"checkpoint": str(path), "bn": bn, "recalibrated_bn": None, "mode": mode}
    protos = _pick_prototypes(state.get("prototypes"), args.prototypes)
    if protos is not None:
        protos = protos.to(device)

    folder = resolve_domain(Path(args.data_root), args.domain)
    common = {"label_format": args.label_format, "normalize": args.normalize or meta["normalize"],
              "transform": Resize(args.resize) if args.resize else None}
    recalibrated = None
    if args.recalibrate_bn:
        train = SegmentationFolder(folder, "train", with_labels=False, **common)
        used = recalibrate_bn(model, build_loader(train, args.batch_size, shuffle=False, drop_last=False,
                                                  num_workers=args.num_workers), device, domain=bn_domain)
        recalibrated = {"split": "train", "images": used}
        bn += f", re-estimated on {used} {args.domain}/train images"
    dataset = SegmentationFolder(folder, args.split, **common)
    loader = build_loader(dataset, args.batch_size, shuffle=False, drop_last=False, num_workers=args.num_workers)
    results = evaluate(model, loader, protos, device, meta["num_classes"], protocol=args.protocol, domain=bn_domain)
    return results, {"checkpoint": str(path), "bn": bn, "recalibrated_bn": recalibrated, "mode": "patch"}


def _slide_tiles(args: argparse.Namespace):
    """(image uint8 [3, H, W], train-id label [H, W]) of every image to slide over."""
    if args.raw is None:
        dataset = SegmentationFolder(resolve_domain(Path(args.data_root), args.domain), args.split,
                                     label_format=args.label_format, uint8=True)
        for i in range(len(dataset)):
            sample = dataset[i]
            yield sample["img"], sample["label"]
        return
    spec = DATASETS[args.dataset]
    images, labels, notes = find_tiles(spec, args.bands, Path(args.raw).expanduser(), args.labels)
    tiles = sorted(t for t in images if spec.split_of(t) == args.split and t in labels)
    if not tiles:
        raise UserError(f"no {args.split} tile of {args.dataset} has both an image and a label in {args.raw}")
    for tile in tiles:
        image = decode_raw(images[tile])[:, :, ::-1]  # BGR -> the file's band order
        raw_ids, _ = decode_label(decode_raw(labels[tile]))
        yield (torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(raw_to_train_ids(raw_ids)))


def _is_target(meta: dict, data_root: str, domain: str) -> bool:
    """Whether ``domain`` is the checkpoint's target domain (same folder, or same name when unresolvable)."""
    if meta.get("target") is None:
        return False
    try:
        return resolve_domain(data_root, meta["target"]) == resolve_domain(data_root, domain)
    except UserError:
        return str(meta["target"]) == str(domain)


def _check_args(args: argparse.Namespace) -> None:
    """One line per impossible value, before anything is read."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.resize is not None and (args.resize < 32 or args.resize % 32):
        raise UserError(f"--resize must be a multiple of 32, got {args.resize}")
    if args.raw is not None:
        if args.mode != "slide":
            raise UserError("--raw reads whole tiles: add --mode slide (patch mode reads prepared folders)")
        if args.dataset is None or args.bands not in DATASETS[args.dataset].bands:
            raise UserError("--raw needs --dataset potsdam --bands rgb|irrg or --dataset vaihingen --bands irrg")
        args.domain = args.domain or DATASETS[args.dataset].domain_name(args.bands)
    elif args.data_root is None or args.domain is None:
        raise UserError("pass --data-root and --domain (a prepared folder), or --mode slide --raw DIR --dataset "
                        "--bands (the raw ISPRS tiles)")
    if args.mode == "slide" and (args.crop < 32 or not 1 <= args.stride <= args.crop):
        raise UserError(f"need --crop >= 32 and 1 <= --stride <= --crop, got --crop {args.crop} --stride {args.stride}")
    if args.scale is not None and not 0 < args.scale <= 8:
        raise UserError(f"--scale must be in (0, 8], got {args.scale}")


def _pick_prototypes(protos: dict | None, which: str) -> torch.Tensor | None:
    if not protos or which == "none":
        return None
    if which == "auto":
        return RefreshResult.from_state(protos, torch.device("cpu")).for_target
    if protos.get(which) is None:
        raise UserError(f"the checkpoint has no '{which}' prototypes (use --prototypes auto)")
    return protos[which]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
