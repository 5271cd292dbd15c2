"""Predict class maps of image tiles of any size with a trained checkpoint (sliding windows).

    python tools/predict.py --checkpoint runs/demo/step2 --input tiles/ --out pred/ [--entropy] [--probs]

Input: one GeoTIFF / TIFF / PNG / JPEG file or a folder of them, 8-bit, three bands picked by ``--band-order``
(1-based, in the order the network was trained on; e.g. ``4,1,2`` turns a Potsdam RGBIR tile into IRRG).
A tile with more than three bands needs ``--band-order``. Per input ``<stem>`` it writes ``<stem>_classes.tif``
(one uint8 band of train ids with the input's CRS and transform, the benchmark's colour table, nodata 255,
the class names as band metadata, and ``<stem>_classes.qml``, the QGIS style with the legend; a plain
TIFF's ``.tfw`` world file is copied next to it), ``<stem>_color.png`` (the same colours; for a georeferenced
input with a ``.pgw`` world file and a ``.png.aux.xml`` holding the CRS), and on request
``<stem>_entropy.tif`` (float32, normalised entropy in [0, 1]) and ``<stem>_probs.tif`` (one uint8 band per
class, probability * 255, named by class). Files follow the user's umask. Existing outputs are kept unless
``--overwrite``; a tile that cannot be read is reported and skipped, and the tool exits with 2 at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io
import warnings
from collections.abc import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import torch
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from tqdm import tqdm

from data.benchmarks import Benchmark, benchmark_of
from data.isprs import IGNORE_INDEX
from engine.handoff import handoff_file, handoff_network, load_handoff, trained_bands
from engine.inference import Prediction, SlideConfig, predict_image
from utils.checkpoint import atomic_write_bytes
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.paths import check_output_files, check_output_folder
from utils.run import resolve_device

SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="finished stage folder or model.pt / best.pt")
    parser.add_argument("--input", required=True, type=Path, help="image file or folder of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--crop", type=int, default=512, help="window side in network px")
    parser.add_argument("--stride", type=int, default=341, help="window step in network px")
    parser.add_argument("--scale", type=float,
                        help="resize factor image -> network (default: the checkpoint's training scale)")
    # Not --bands: that names a band combination (rgb, irrg) in prepare_isprs.py and evaluate.py.
    parser.add_argument("--band-order", help="three 1-based band numbers, e.g. 4,1,2 for IRRG from an RGBIR tile "
                        "(default: 1,2,3 of a three-band tile; needed for more bands)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--entropy", action="store_true", help="also write <stem>_entropy.tif")
    parser.add_argument("--probs", action="store_true", help="also write <stem>_probs.tif (uint8 per class)")
    parser.add_argument("--hflip", action="store_true", help="average with the horizontally flipped windows")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", default="off", choices=OPTIONS["amp"].choices, help=OPTIONS["amp"].help)
    parser.add_argument("--overwrite", action="store_true", help="replace outputs written before")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bands = parse_bands(args.band_order) if args.band_order is not None else None
    if args.crop < 32 or args.stride < 1 or args.stride > args.crop or args.batch_size < 1:
        raise UserError(f"need --crop >= 32, 1 <= --stride <= --crop and --batch-size >= 1, got --crop {args.crop} "
                        f"--stride {args.stride} --batch-size {args.batch_size}")
    if args.scale is not None and not 0 < args.scale <= 8:
        raise UserError(f"--scale must be in (0, 8], got {args.scale}")
    tiles = list_inputs(args.input)
    check_output_folder(args.out, "--out")
    outputs = {tile: output_paths(args.out, tile, args.entropy, args.probs) for tile in tiles}
    check_output_files([p for paths in outputs.values() for p in paths.values()], "--out", args.overwrite)

    path = handoff_file(args.checkpoint, "--checkpoint")
    state = load_handoff(path, flag="--checkpoint")
    meta = state["meta"]
    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA device, this run is on {device}; use --amp bf16 or off")
    model = handoff_network(state, device).eval()
    cfg = SlideConfig(crop=args.crop, stride=args.stride, scale=args.scale or meta["input_scale"],
                      batch_size=args.batch_size, amp=args.amp, hflip=args.hflip, normalize=meta["normalize"])
    trained = " or ".join(",".join(b) for b in trained_bands(meta)) or "not recorded"
    print(f"{path}: {meta['stage']} {meta['backbone']}, scale {cfg.scale:g}, crop {cfg.crop}, stride {cfg.stride}"
          + (", flip TTA" if cfg.hflip else "")
          + f"; trained on bands {trained} (--band-order picks them in that order)")
    failed = []
    for tile in tqdm(tiles, desc="tiles", unit="tile", disable=len(tiles) < 2):
        try:
            image, profile = read_tile(tile, bands)
        except UserError as err:
            tqdm.write(f"skipped {tile}: {err}", file=sys.stderr)
            failed.append(tile)
            continue
        pred = predict_image(model, image, cfg, device, entropy=args.entropy, probs=args.probs, progress=True)
        write_outputs(pred, profile, tile, outputs[tile], benchmark_of(meta))
        tqdm.write(f"{tile} -> {outputs[tile]['classes']}")
    if failed:
        raise UserError(f"{len(failed)} of {len(tiles)} tiles could not be read ({', '.join(map(str, failed))}); "
                        f"the others were written to {args.out}")
    return 0


def parse_bands(text: str) -> list[int]:
    """``"4,1,2"`` -> [4, 1, 2] (rasterio's 1-based band indexes)."""
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        bands = []
    if len(bands) != 3 or min(bands) < 1:
        raise UserError(f"--band-order takes three 1-based band numbers like 1,2,3 or 4,1,2, got {text!r}")
    return bands


def list_inputs(path: Path) -> list[Path]:
    """The image files ``--input`` names (a file, or the supported files directly in a folder)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if files:
            return files
        raise UserError(f"--input {path} holds no {'/'.join(SUFFIXES)} file")
    raise UserError(f"--input {path} does not exist; pass an image file or a folder of images")


def output_paths(out: Path, tile: Path, entropy: bool, probs: bool) -> dict[str, Path]:
    """Where the outputs of ``tile`` go (``tfw`` only for inputs that carry a world file, the PNG's world file
    and CRS only for georeferenced inputs)."""
    paths = {"classes": out / f"{tile.stem}_classes.tif", "style": out / f"{tile.stem}_classes.qml",
             "color": out / f"{tile.stem}_color.png"}
    if _georeferenced(tile):
        paths["color_pgw"] = out / f"{tile.stem}_color.pgw"
        paths["color_aux"] = out / f"{tile.stem}_color.png.aux.xml"
    if entropy:
        paths["entropy"] = out / f"{tile.stem}_entropy.tif"
    if probs:
        paths["probs"] = out / f"{tile.stem}_probs.tif"
    if _world_file(tile) is not None:
        for key in ("classes", "entropy", "probs"):
            if key in paths:
                paths[f"{key}_tfw"] = paths[key].with_suffix(".tfw")
    return paths


def _world_file(tile: Path) -> Path | None:
    for suffix in (".tfw", ".TFW", ".tifw", ".wld"):
        candidate = tile.with_suffix(suffix)
        if tile.suffix.lower() in (".tif", ".tiff") and candidate.is_file():
            return candidate
    return None


def _georeferenced(tile: Path) -> bool:
    """Whether ``tile`` has a CRS or a map transform (an unreadable tile is reported when it is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tile) as src:
                return src.crs is not None or not src.transform.is_identity
    except RasterioIOError:
        return False


def read_tile(path: Path, bands: list[int] | None) -> tuple[torch.Tensor, dict]:
    """Bands ``bands`` (default: the three of a three-band image) of an 8-bit image as uint8 [3, H, W] and
    the georeference to write back."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if bands is None and src.count != 3:
                    raise UserError(f"it has {src.count} band(s); pass --band-order with the three the network was "
                                    f"trained on, e.g. 4,1,2 for IRRG from RGBIR")
                bands = bands or [1, 2, 3]
                if max(bands) > src.count:
                    raise UserError(f"it has {src.count} bands, --band-order asks for band {max(bands)}")
                if src.dtypes[0] != "uint8":
                    raise UserError(f"expected 8-bit bands, found {src.dtypes[0]}; convert the image to 8 bit")
                image = src.read(bands)
                profile = {"crs": src.crs, "transform": src.transform, "height": src.height, "width": src.width}
    except RasterioIOError as err:
        raise UserError(f"cannot read it as an image ({err})") from None
    return torch.from_numpy(image), profile


def _geotiff_bytes(bands: np.ndarray, profile: dict, descriptions: Sequence[str], colormap: dict | None = None,
                   tags: dict[str, str] | None = None, **options: object) -> bytes:
    """A GeoTIFF of ``bands`` [N, H, W] with ``profile``'s size, CRS and transform, a description per band,
    and optionally a colour table and metadata on band 1, in memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.MemoryFile() as memfile:
            with memfile.open(driver="GTiff", count=bands.shape[0], dtype=bands.dtype.name, **profile,
                              **options) as dst:
                dst.write(bands)
                for index, text in enumerate(descriptions, start=1):
                    dst.set_band_description(index, text)
                if colormap is not None:
                    dst.write_colormap(1, colormap)
                if tags:
                    dst.update_tags(1, **tags)
            return memfile.read()


def qgis_style(names: Sequence[str], palette: np.ndarray) -> str:
    """A QGIS layer style (``.qml``, loaded with the raster of the same name): a paletted legend of the
    class names in the palette's colours [C, 3]."""
    entries = "\n".join(f'        <paletteEntry value="{i}" label="{escape(name)}" alpha="255" '
                        f'color="#{r:02x}{g:02x}{b:02x}"/>' for i, (name, (r, g, b)) in enumerate(zip(names, palette)))
    return ("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n<qgis>\n  <pipe>\n"
            '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1">\n'
            f"      <colorPalette>\n{entries}\n      </colorPalette>\n    </rasterrenderer>\n  </pipe>\n</qgis>\n")


def world_file_text(transform: rasterio.Affine) -> str:
    """An ESRI world file (``.pgw``): pixel sizes and rotations, then the centre of the upper-left pixel."""
    a, b, c, d, e, f = transform[:6]
    return "\n".join(f"{v:.10f}" for v in (a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2)) + "\n"


def pam_crs_xml(crs: rasterio.crs.CRS) -> str:
    """GDAL's ``.aux.xml`` sidecar holding ``crs``: what a GIS reads as the CRS of the PNG beside it."""
    return f'<PAMDataset>\n  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>\n</PAMDataset>\n'


def color_png_bytes(classes: np.ndarray, palette: np.ndarray) -> bytes:
    """Train ids [H, W] -> a paletted PNG in the benchmark's colours ``palette`` [C, 3]."""
    image = Image.fromarray(classes, mode="P")
    image.putpalette(palette.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_outputs(pred: Prediction, profile: dict, tile: Path, paths: dict[str, Path], benchmark: Benchmark) -> None:
    """Write every output of one tile, each atomically (a temporary name, then a rename), with ``benchmark``'s
    class names and colours."""
    names, palette = benchmark.classes, benchmark.palette_array
    tiled = {"tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}
    colormap = {i: tuple(int(v) for v in rgb) for i, rgb in enumerate(palette)}
    classes = {"classes": f"train id: {', '.join(f'{i} {n}' for i, n in enumerate(names))}; "
                          f"{IGNORE_INDEX} nodata"}
    atomic_write_bytes(paths["classes"], _geotiff_bytes(
        pred.classes[None], profile, nodata=IGNORE_INDEX, descriptions=["class"], colormap=colormap,
        tags={**classes, **{f"class_{i}": name for i, name in enumerate(names)}}, **tiled))
    atomic_write_bytes(paths["style"], qgis_style(names, palette).encode())
    atomic_write_bytes(paths["color"], color_png_bytes(pred.classes, palette))
    if "color_pgw" in paths:
        atomic_write_bytes(paths["color_pgw"], world_file_text(profile["transform"]).encode())
        if profile["crs"] is not None:
            atomic_write_bytes(paths["color_aux"], pam_crs_xml(profile["crs"]).encode())
    if pred.entropy is not None:
        atomic_write_bytes(paths["entropy"], _geotiff_bytes(pred.entropy[None], profile,
                                                            descriptions=["normalised entropy"], **tiled))
    if pred.probs is not None:
        atomic_write_bytes(paths["probs"], _geotiff_bytes(
            pred.probs, profile, descriptions=[f"p({name}) x 255" for name in names], **tiled))
    world = _world_file(tile)
    for key, dest in paths.items():
        if key.endswith("_tfw") and world is not None:
            atomic_write_bytes(dest, world.read_bytes())


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
