"""Evaluate a checkpoint on any domain and split, and print the metrics table.

    python tools/evaluate.py --checkpoint runs/demo/step2 --data-root data --domain vaihingen_irrg --split val

``--checkpoint`` takes a finished stage folder (its model.pt), a model.pt/best.pt file, or a converted
original checkpoint (all read by ``engine/handoff.py``); ``--normalize`` defaults to the checkpoint's.
``--metric-protocol napg_legacy`` reproduces the original's numbers (H/4 maps, IoU + 1). Every output also names the
data's protocol (``meta.json``; LoveDA's ``official-uda`` says *transductive*) as ``data protocol``.
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

from data.benchmarks import ISPRS, benchmark_of, data_protocol_of
from data.checks import SplitUse, check_data
from data.dataset import SegmentationFolder
from data.domains import domain_bands, resolve_domain
from data.files import read_meta
from data.isprs import DATASETS, LABEL_KINDS, decode_label, raw_to_train_ids
from data.prepare import decode_raw, find_tiles
from engine.evaluate import (
    CheckpointScores,
    check_bands,
    check_benchmark,
    evaluate_checkpoint,
    evaluate_tiles,
    load_for_evaluation,
)
from engine.inference import SlideConfig
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.metrics import PROTOCOLS, format_table
from utils.paths import check_output_files
from utils.run import write_json


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="finished stage folder or model.pt / best.pt")
    parser.add_argument("--data-root", help="folder of prepared domain folders (patch mode)")
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
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="split of --domain to score (a stage scores its target's --target-eval-split)")
    # Not --protocol: that names the data's patch protocol (prepare_isprs.py, run_table.py).
    parser.add_argument("--metric-protocol", default="standard", choices=PROTOCOLS,
                        help="how the metrics are computed (napg_legacy: the original's H/4 maps, IoU + 1; see the "
                             "README)")
    parser.add_argument("--prototypes", default="auto", choices=("auto", "target", "source_target", "none"),
                        help="prototype set for the prototype branch (auto: target if present)")
    parser.add_argument("--label-format", choices=("mmseg_raw", "train_ids"),
                        help="label files' format (default: meta.json or a scan)")
    parser.add_argument("--normalize", choices=OPTIONS["normalize"].choices,
                        help="input normalisation (default: the one the checkpoint was trained with)")
    parser.add_argument("--resize", type=int, help="resize patches to this side (default: as the checkpoint's run "
                        "did)")
    parser.add_argument("--allow-band-mismatch", action="store_true",
                        help="score images whose bands the checkpoint's run never saw (refused by default)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
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
    if args.json:
        check_output_files([args.json], "--json")
    if args.mode == "slide":
        scores = _evaluate_slide(args)
    else:
        scores = evaluate_checkpoint(args.checkpoint, args.data_root, args.domain, split=args.split,
                                     batch_size=args.batch_size, num_workers=args.num_workers, resize=args.resize,
                                     recalibrate=args.recalibrate_bn, protocol=args.metric_protocol,
                                     prototypes=args.prototypes, label_format=args.label_format,
                                     normalize=args.normalize, bn_domain=args.bn_domain, device=args.device,
                                     allow_band_mismatch=args.allow_band_mismatch)
    data = data_protocol(args)
    for branch, metrics in scores.results.items():
        print(f"{branch} branch, {args.domain}/{args.split}, {scores.mode}, protocol {args.metric_protocol}, "
              f"data protocol {data}, {scores.bn}:")
        print(format_table(metrics, scores.benchmark.classes, scores.benchmark.mean_without is not None))
    if args.json:
        write_json(Path(args.json), {"checkpoint": str(scores.checkpoint), "domain": args.domain, "split": args.split,
                                     "mode": scores.mode, "protocol": args.metric_protocol, "data_protocol": data,
                                     "bn": scores.bn,
                                     "recalibrated_bn": scores.recalibrated_bn, **scores.results})
    return 0


def data_protocol(args: argparse.Namespace) -> str:
    """The protocol the scored data were prepared with (their meta.json, as the benchmark declaration names it,
    e.g. "official-uda (transductive)"); raw ISPRS tiles are split as mmseg's converters split them."""
    if args.raw is not None:
        return ISPRS.default_protocol
    return data_protocol_of(read_meta(resolve_domain(Path(args.data_root), args.domain)))


def _evaluate_slide(args: argparse.Namespace) -> CheckpointScores:
    """Sliding-window scores of the checkpoint over the images ``args`` name (see :func:`_slide_tiles`)."""
    if args.raw is None:  # a prepared folder, checked before the checkpoint is read (one image at a time, so
        # its sizes may differ)
        check_data([SplitUse(resolve_domain(Path(args.data_root), args.domain), args.split)],
                   label_format=args.label_format, resize=args.resize, batch_size=1, batch_flag="--batch-size")
    loaded = load_for_evaluation(args.checkpoint, args.data_root, args.domain, args.device, args.bn_domain)
    meta = loaded.state["meta"]
    bands = (list(DATASETS[args.dataset].bands[args.bands]) if args.raw is not None
             else domain_bands(resolve_domain(Path(args.data_root), args.domain)))
    if args.raw is None:
        check_benchmark(meta, resolve_domain(Path(args.data_root), args.domain))
    check_bands(meta, bands, args.domain, args.allow_band_mismatch)
    cfg = SlideConfig(crop=args.crop, stride=args.stride, scale=args.scale or meta["input_scale"],
                      batch_size=args.batch_size, normalize=args.normalize or meta["normalize"],
                      domain=loaded.bn_domain)
    results = evaluate_tiles(loaded.model, tqdm(_slide_tiles(args), desc="tiles", unit="tile"), cfg, loaded.device,
                             meta["num_classes"])
    mode = f"slide (crop {cfg.crop}, stride {cfg.stride}, scale {cfg.scale:g})"
    return CheckpointScores(results, loaded.path, mode, loaded.bn, benchmark_of(meta))


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


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
