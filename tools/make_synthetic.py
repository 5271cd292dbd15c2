"""Write the synthetic ISPRS-like data set (Potsdam-like source, Vaihingen-like target).

    python tools/make_synthetic.py --out data_synthetic/raw --mode raw        # fake official zips
    python tools/make_synthetic.py --out data_synthetic --mode prepared       # potsdam_rgb, potsdam_irrg,
                                                                              # vaihingen_irrg ready to use
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

from data.synthetic import DOMAIN_GAP, MODES, SIZES, make_synthetic
from utils.errors import run_cli
from utils.flags import FlagParser


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write into")
    parser.add_argument("--mode", choices=MODES, default="prepared", help="fake zips or prepared folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data set")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small: tests; demo: CPU demo; study: 864/216 source, 400/200 target train/val patches")
    parser.add_argument("--domain-gap", type=float, default=DOMAIN_GAP,
                        help="0: target looks like the source; 1: default appearance gap")
    parser.add_argument("--overwrite", action="store_true", help="replace folders written before")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    written = make_synthetic(args.out, args.mode, args.seed, args.size, args.overwrite, args.domain_gap)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
