"""Convert the official ISPRS Potsdam / Vaihingen downloads into the MMSegmentation layout.

    python tools/prepare_isprs.py --dataset potsdam --bands rgb --raw RAW --out data/potsdam_rgb
    python tools/prepare_isprs.py --dataset vaihingen --bands irrg --raw RAW --out data/vaihingen_irrg

RAW holds the zips (2_Ortho_RGB.zip, 3_Ortho_IRRG.zip, 5_Labels_all_noBoundary.zip; or
ISPRS_semantic_labeling_Vaihingen.zip and ..._ground_truth_eroded_COMPLETE.zip) or their extracted
contents; zips are read in place. ``--labels full`` reads the complete ground truth instead
(5_Labels_all.zip; ..._ground_truth_COMPLETE.zip), which has no boundary (0) pixels: what the legacy
preset's prototype loss, which has no ignore index, needs; names and layout are otherwise identical.
With the defaults the output equals what MMSegmentation's converters write, file for file and pixel
for pixel: OUT/img_dir/{train,val}/*.png, OUT/ann_dir/{train,val}/*.png (raw ids 0..6), plus
OUT/meta.json. The output is built in a hidden sibling folder and renamed into place at the end, so a
failed run leaves nothing behind.
"""


from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from data.isprs import DATASETS, GRIDS, LABEL_FORMATS, LABEL_KINDS, PROTOCOLS
from data.prepare import prepare_isprs, summary_lines
from utils.errors import run_cli
from utils.flags import FlagParser


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="which ISPRS benchmark")
    parser.add_argument("--bands", required=True, choices=["rgb", "irrg"], help="image bands to write")
    parser.add_argument("--raw", required=True, type=Path, help="folder with the official zips or their contents")
    parser.add_argument("--out", required=True, type=Path, help="output domain folder, e.g. data/potsdam_rgb")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--clip", type=int, default=512, help="patch size in px (default 512)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="mmseg",
                        help="whose patches and split: mmseg (MMSegmentation's converters) or st-dasegnet (Potsdam "
                             "every 512 px, Vaihingen every 256 px on its own area split; sets grid, stride, clip)")
    parser.add_argument("--grid", choices=GRIDS, default="mmseg",
                        help="mmseg's effective grid, true sliding, or inside (no patch flush with the far edge)")
    parser.add_argument("--stride", type=int, default=None, help="grid stride in px (default clip/2)")
    parser.add_argument("--target-gsd", type=float, default=None, help="resample tiles to this GSD in m first")
    parser.add_argument("--strict-colors", action="store_true", help="decode only exact palette colours")
    parser.add_argument("--label-format", choices=LABEL_FORMATS, default="mmseg_raw",
                        help="label files written: MMSegmentation's raw ids or train ids")
    parser.add_argument("--labels", choices=LABEL_KINDS, default="eroded",
                        help="eroded (noBoundary, the benchmark's) or full ground truth (no ignored pixels)")
    parser.add_argument("--num-workers", "--workers", dest="workers", type=int, default=1,
                        help="tiles converted in parallel processes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = prepare_isprs(
        args.dataset,
        args.bands,
        args.raw,
        args.out,
        overwrite=args.overwrite,
        clip=args.clip,
        grid=args.grid,
        stride=args.stride,
        target_gsd=args.target_gsd,
        strict_colors=args.strict_colors,
        label_format=args.label_format,
        labels=args.labels,
        workers=args.workers,
        protocol=args.protocol,
    )
    for line in summary_lines(meta):
        print(line)
    print(f"wrote {args.out} ({meta['off_palette_pixels']} off-palette label pixels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
