"""Convert an original NAPG checkpoint (``network``/``GAN``/``GAN2``) to this project's format.

Writes a hand-off checkpoint (``engine/handoff.py``) atomically: the network, ``d1``/``d2`` when the
original has ``GAN``/``GAN2``, no prototypes (the original never saved them), and every meta field, with
``stage: "original"``, so that ``--init converted.pt`` starts steps 1 to 3 and ``tools/evaluate.py``
evaluates it. An existing output is kept unless ``--overwrite`` is given.

    python tools/convert_original_checkpoint.py --checkpoint ORIG.pth --out OURS.pt \
        [--num-classes 6 --backbone resnet50 --shared-similarity false --overwrite]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.handoff import handoff_meta, save_handoff
from models import FCDiscriminatorHighMask, NAPGNet, load_original_checkpoint
from models.napg import BACKBONES
from models.original import read_original_checkpoint
from utils.errors import run_cli
from utils.flags import FlagParser, add_shared_similarity
from utils.paths import check_output_files
from utils.stages import ORIGINAL


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="original NAPG .pth file")
    parser.add_argument("--out", required=True, type=Path, help="converted checkpoint to write")
    parser.add_argument("--num-classes", type=int, default=6, help="classes of the original model")
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES),
                        help="ResNet depth of the original model")
    add_shared_similarity(parser, "the original model shares one similarity conv for all classes; false: one per class")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_files([args.out], "--out", args.overwrite)
    ckpt = read_original_checkpoint(args.checkpoint)
    model = NAPGNet(num_classes=args.num_classes, backbone=args.backbone,
                    shared_similarity=args.shared_similarity)
    # A bare network state dict has no discriminators; a full checkpoint may lack them too.
    d1 = FCDiscriminatorHighMask(args.num_classes) if ckpt.get("GAN") is not None else None
    d2 = FCDiscriminatorHighMask(args.num_classes) if ckpt.get("GAN2") is not None else None
    report = load_original_checkpoint(ckpt, model, d1, d2)
    loaded = report["loaded"]
    # The original feeds the network x/255 with shared BatchNorm statistics; its domain pair is unknown.
    meta = handoff_meta(stage=ORIGINAL, source=None, target=None, num_classes=args.num_classes,
                        backbone=args.backbone, shared_similarity=args.shared_similarity, clusters=None,
                        bn_stats="shared", normalize="unit", epoch=None,
                        converted_from=str(args.checkpoint.resolve()),
                        converted_by="tools/convert_original_checkpoint.py", loaded=loaded,
                        ignored=report["ignored"])
    save_handoff(args.out, model, d1, d2, None, meta)
    print(f"wrote {args.out} ({', '.join(loaded)}; ignored: {', '.join(report['ignored']) or 'nothing'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
