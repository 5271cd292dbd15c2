"""Evaluate a checkpoint on any domain and split, and print the metrics table.

    python tools/evaluate.py --checkpoint runs/demo/step2 --data-root data --domain vaihingen_irrg --split val

``--checkpoint`` takes a finished stage folder (its model.pt), a model.pt/best.pt file, or a converted
original checkpoint (all read by ``engine/handoff.py``); ``--normalize`` defaults to the checkpoint's.
``--protocol napg_legacy`` reproduces the original's numbers (H/4 maps, IoU + 1).
``--recalibrate-bn`` first re-estimates the BatchNorm statistics on the evaluated domain's *train* images
(no labels read; AdaBN), which is how a source-only model is given target statistics.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.dataset import SegmentationFolder
from data.domains import CLASS_NAMES, resolve_domain
from data.loaders import build_loader
from data.transforms import Resize
from engine.evaluate import evaluate, recalibrate_bn
from engine.handoff import handoff_file, handoff_network, load_handoff
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.metrics import PROTOCOLS, format_table
from utils.run import resolve_device, write_json


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--domain", required=True, help="registered domain name, alias or folder")
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
    args = parser.parse_args(argv)
    _check_args(args)
    results, info = evaluate_checkpoint(args)
    for branch, metrics in results.items():
        print(f"{branch} branch, {args.domain}/{args.split}, protocol {args.protocol}, {info['bn']}:")
        print(format_table(metrics, CLASS_NAMES))
    if args.json:
        write_json(Path(args.json), {"checkpoint": info["checkpoint"], "domain": args.domain, "split": args.split,
                                     "protocol": args.protocol, "bn": info["bn"],
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
    protos = _pick_prototypes(state.get("prototypes"), args.prototypes)
    if protos is not None:
        protos = protos.to(device)

    folder = resolve_domain(Path(args.data_root), args.domain)
    common = {"label_format": args.label_format, "normalize": args.normalize or meta["normalize"],
              "transform": Resize(args.resize) if args.resize else None}
    bn = f"{bn_domain} BatchNorm statistics" if meta["bn_stats"] == "domain" else "shared BatchNorm statistics"
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
    return results, {"checkpoint": str(path), "bn": bn, "recalibrated_bn": recalibrated}


def _is_target(meta: dict, data_root: str, domain: str) -> bool:
    """Whether ``domain`` is the checkpoint's target domain (same folder, or same name when unresolvable)."""
    if meta.get("target") is None:
        return False
    try:
        return resolve_domain(Path(data_root), meta["target"]) == resolve_domain(Path(data_root), domain)
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


def _pick_prototypes(protos: dict | None, which: str) -> torch.Tensor | None:
    if not protos or which == "none":
        return None
    if which == "auto":
        return protos["target"] if protos.get("target") is not None else protos["source_target"]
    if protos.get(which) is None:
        raise UserError(f"the checkpoint has no '{which}' prototypes (use --prototypes auto)")
    return protos[which]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
