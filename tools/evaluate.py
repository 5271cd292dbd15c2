"""Evaluate a checkpoint on any domain and split, and print the metrics table.

    python tools/evaluate.py --checkpoint runs/demo/step2 --data-root data --domain vaihingen_irrg --split val

``--checkpoint`` takes a stage folder (its model.pt), a model.pt/best.pt/last.pt file, or a converted
original checkpoint. ``--protocol napg_legacy`` reproduces the original's numbers (H/4 maps, IoU + 1).
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
from engine.evaluate import PROTOCOLS, evaluate
from models import NAPGNet
from utils.checkpoint import load_checkpoint
from utils.errors import UserError, run_cli
from utils.metrics import format_table
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
    parser.add_argument("--normalize", default="unit", choices=("unit", "imagenet"))
    parser.add_argument("--resize", type=int, help="resize patches to this side (as the run did)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    _check_args(args)

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "model.pt"
    state = load_checkpoint(path)
    meta = state.get("meta")
    if "model" not in state or not isinstance(meta, dict):
        raise UserError(f"{path} is not a checkpoint of this project (convert original ones with "
                        f"tools/convert_original_checkpoint.py)")
    device = resolve_device(args.device)
    model = NAPGNet(num_classes=meta["num_classes"], backbone=meta["backbone"],
                    shared_similarity=meta.get("shared_similarity", True)).to(device)
    model.load_state_dict(state["model"])
    protos = _pick_prototypes(state.get("prototypes"), args.prototypes)
    if protos is not None:
        protos = protos.to(device)

    dataset = SegmentationFolder(resolve_domain(Path(args.data_root), args.domain), args.split,
                                 label_format=args.label_format, normalize=args.normalize,
                                 transform=Resize(args.resize) if args.resize else None)
    loader = build_loader(dataset, args.batch_size, shuffle=False, drop_last=False, num_workers=args.num_workers)
    results = evaluate(model, loader, protos, device, meta["num_classes"], protocol=args.protocol)
    for branch, metrics in results.items():
        print(f"{branch} branch, {args.domain}/{args.split}, protocol {args.protocol}:")
        print(format_table(metrics, CLASS_NAMES))
    if args.json:
        write_json(Path(args.json), {"checkpoint": str(path), "domain": args.domain, "split": args.split,
                                     "protocol": args.protocol, **results})
    return 0


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
