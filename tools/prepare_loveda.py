"""Prepare LoveDA (Urban and Rural) for domain adaptation: one MMSegmentation-layout folder per domain.

    python tools/prepare_loveda.py --raw ~/loveda --out data [--protocol standard|official-uda] [--overwrite]

``--raw`` holds the official ``Train.zip``, ``Val.zip`` and ``Test.zip`` (or their extracted ``Train/``,
``Val/``, ``Test/`` folders). Writes ``<out>/loveda_urban`` and ``<out>/loveda_rural``, each with
``img_dir/{train,val,test}`` and ``ann_dir/{train,val}``: image and mask files byte for byte as in the
zips, and a ``meta.json`` (benchmark, counts, label histogram). Masks keep LoveDA's raw ids: 0 no-data
(ignored), 1..7 background, building, road, water, barren, forest, agriculture (train ids 0..6).

Protocols: ``standard`` (the default; adapt on ``Train/<target>``, evaluate on ``Val/<target>``, as
ST-DASegNet does) and ``official-uda`` (LoveDA's own UDA code: adapt and evaluate on ``Val/<target>``, so
``img_dir/train`` holds the Val images, without labels; *transductive*, and named so in every output; such
a folder serves only as a target). Nothing is written when anything fails; existing folders are replaced
only with ``--overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io
import json
import re
import zipfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import cv2
import numpy as np
from PIL import Image

from data.benchmarks import LOVEDA
from data.domains import DOMAINS
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.paths import check_output_folder
from utils.publish import publish_dir

ZIPS = {"train": "Train.zip", "val": "Val.zip", "test": "Test.zip"}
MEMBER = re.compile(r"(?:^|/)(Train|Val|Test)/(Urban|Rural)/(images_png|masks_png)/([^/]+\.png)$")
RAW_NAMES = ("no-data", *LOVEDA.classes)  # raw id -> name


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, type=Path, help="folder with Train.zip, Val.zip, Test.zip or their "
                        "extracted folders")
    parser.add_argument("--out", required=True, type=Path, help="data root: loveda_urban/ and loveda_rural/ go here")
    parser.add_argument("--protocol", choices=sorted(LOVEDA.protocols), default=LOVEDA.default_protocol,
                        help="standard: adapt on Train, evaluate on Val; official-uda: adapt and evaluate on Val "
                             "(LoveDA's UDA code, transductive)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing domain folders")
    return parser


def find_members(raw: Path) -> dict[tuple[str, str, str, str], Callable[[], bytes]]:
    """(split, domain, kind, file name) -> a reader of its bytes, from the zips or the extracted folders."""
    if not raw.is_dir():
        raise UserError(f"--raw {raw} is not a folder; pass the folder that holds Train.zip, Val.zip, Test.zip")
    found: dict[tuple[str, str, str, str], Callable[[], bytes]] = {}
    for zip_name in ZIPS.values():
        path = raw / zip_name
        if path.is_file():
            try:
                archive = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise UserError(f"{path} is not a readable zip file; download it again") from None
            for name in archive.namelist():
                if m := MEMBER.search(name):
                    found[_key(m)] = lambda a=archive, n=name: a.read(n)
    for path in raw.rglob("*.png"):
        if m := MEMBER.search(path.relative_to(raw).as_posix()):
            found.setdefault(_key(m), path.read_bytes)
    if not any(key[0] in ("train", "val") for key in found):
        raise UserError(f"no LoveDA image in {raw}: put Train.zip and Val.zip (Test.zip optional) or their extracted "
                        f"Train/ and Val/ folders there")
    return found


def _key(m: re.Match) -> tuple[str, str, str, str]:
    split, domain, kind, name = m.groups()
    return split.lower(), domain.lower(), "image" if kind == "images_png" else "mask", name


def mask_ids(data: bytes, where: str) -> np.ndarray:
    """A mask's raw ids (uint8 [H, W]); UserError for a file that is not a single-band LoveDA mask."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2 or mask.dtype != np.uint8:
        raise UserError(f"{where} is not a single-band 8-bit PNG mask")
    if int(mask.max()) > LOVEDA.num_classes:
        raise UserError(f"{where} holds label {int(mask.max())}; LoveDA masks hold 0 (no-data) to "
                        f"{LOVEDA.num_classes}")
    return mask


def write_domain(staging: Path, domain: str, members: dict, protocol: str) -> dict:
    """Copy one domain's files into ``staging``; returns its meta.json."""
    layout = {"train": "train", "val": "val", "test": "test"}
    if protocol == "official-uda":  # adaptation reads the Val images; the Train split is not used
        layout = {"val": "train", "test": "test"}
    counts, histograms, values, sizes = {}, {}, {}, set()
    for source_split, split in [*layout.items(), *([("val", "val")] if protocol == "official-uda" else [])]:
        images = sorted(name for s, d, kind, name in members if (s, d, kind) == (source_split, domain, "image"))
        with_labels = source_split != "test" and not (protocol == "official-uda" and split == "train")
        (staging / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        histogram = np.zeros(len(RAW_NAMES), dtype=np.int64)
        if with_labels:
            (staging / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for name in images:
            image = members[(source_split, domain, "image", name)]()
            sizes.add(Image.open(io.BytesIO(image)).size)  # the header only
            (staging / "img_dir" / split / name).write_bytes(image)
            if with_labels:
                reader = members.get((source_split, domain, "mask", name))
                if reader is None:
                    raise UserError(f"{source_split.title()}/{domain.title()}/images_png/{name} has no mask in "
                                    f"masks_png/; the download is incomplete")
                data = reader()
                where = f"{source_split.title()}/{domain.title()}/masks_png/{name}"
                histogram += np.bincount(mask_ids(data, where).ravel(), minlength=len(RAW_NAMES))
                (staging / "ann_dir" / split / name).write_bytes(data)
        counts[split] = len(images)
        if with_labels:
            histograms[split] = dict(zip(RAW_NAMES, histogram.tolist()))
            values[split] = [int(v) for v in np.flatnonzero(histogram)]
    registered = DOMAINS[f"loveda_{domain}"]
    return {"benchmark": "loveda", "dataset": "loveda", "domain": registered.name, "bands": list(registered.bands),
            "gsd_m": registered.gsd_m, "label_format": "mmseg_raw", "labels": "full",
            # The side of every tile (LoveDA's are all 1024 px), which checks and --resize scales read.
            **({"clip": side} if (side := _common_square_side(sizes)) else {}),
            "protocol": LOVEDA.protocols[protocol], "counts": counts, "label_histogram": histograms,
            "label_values": values, "synthetic": False, "tool": "prepare_loveda", "version": 1}


def _common_square_side(sizes: set[tuple[int, int]]) -> int | None:
    """The side when every image is the same square, else None."""
    if len(sizes) != 1:
        return None
    width, height = next(iter(sizes))
    return width if width == height else None


def prepare_loveda(raw: Path, out: Path, protocol: str = LOVEDA.default_protocol,
                   overwrite: bool = False) -> dict[str, dict]:
    """Write ``out/loveda_urban`` and ``out/loveda_rural``; returns their meta.json dicts."""
    targets = {domain: check_output_folder(out / f"loveda_{domain}", "--out", overwrite)
               for domain in ("urban", "rural")}
    members = find_members(raw)
    metas = {}
    with ExitStack() as stack:  # both folders are published only when both are complete
        for domain, final in targets.items():
            staging = stack.enter_context(publish_dir(final))
            metas[domain] = write_domain(staging, domain, members, protocol)
            if not metas[domain]["counts"].get("val"):
                raise UserError(f"no Val/{domain.title()} image in {raw}; LoveDA's Val.zip is needed for evaluation")
            (staging / "meta.json").write_text(json.dumps(metas[domain], indent=2) + "\n")
    return metas


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metas = prepare_loveda(args.raw, args.out, args.protocol, args.overwrite)
    for meta in metas.values():
        print(f"{args.out / meta['domain']}: " + ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
              + f" images (protocol {meta['protocol']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
