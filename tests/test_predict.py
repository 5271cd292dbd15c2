"""tools/predict.py: georeference kept, palette PNG, band selection, skipped tiles, no overwrite."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from data.benchmarks import BENCHMARKS
from data.isprs import CLASS_NAMES, IGNORE_INDEX
from tests.helpers import random_checkpoint
from tools.predict import main
from utils.errors import run_cli
from utils.publish import publish_dir

PALETTE = BENCHMARKS["isprs"].palette_array

# A quarter-scale network input keeps a 2000 x 1500 tile to a few dozen small windows.
FAST = ["--crop", "128", "--stride", "96", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", input_scale=0.25)


CRS_UTM32 = CRS.from_epsg(32632)
TRANSFORM = from_origin(364000.0, 5808000.0, 0.05, 0.05)


def _geotiff(path: Path, bands: np.ndarray, crs: CRS | None = CRS_UTM32, transform=TRANSFORM) -> None:
    with rasterio.open(path, "w", driver="GTiff", count=bands.shape[0], height=bands.shape[1], width=bands.shape[2],
                       dtype="uint8", crs=crs, transform=transform) as dst:
        dst.write(bands)


def _image(bands: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (bands, height, width), dtype=np.uint8)


def _predict(checkpoint: Path, inp: Path, out: Path, *extra: str) -> int:
    return run_cli(main, ["--checkpoint", str(checkpoint), "--input", str(inp), "--out", str(out), *FAST, *extra])


def test_geotiff_keeps_crs_transform_and_size(checkpoint, tmp_path):
    tile = tmp_path / "tile.tif"
    _geotiff(tile, _image(3, 1500, 2000))
    assert _predict(checkpoint, tile, tmp_path / "out", "--entropy", "--probs") == 0
    with rasterio.open(tile) as src, rasterio.open(tmp_path / "out" / "tile_classes.tif") as got:
        assert (got.crs, got.transform, got.width, got.height) == (src.crs, src.transform, src.width, src.height)
        assert got.count == 1 and got.dtypes[0] == "uint8"
        classes = got.read(1)
    assert classes.max() < 6
    colour = np.asarray(Image.open(tmp_path / "out" / "tile_color.png").convert("RGB"))
    assert np.array_equal(colour, PALETTE[classes])  # only palette colours, in the class layout
    with rasterio.open(tmp_path / "out" / "tile_probs.tif") as probs, \
            rasterio.open(tmp_path / "out" / "tile_entropy.tif") as entropy:
        assert probs.count == 6 and probs.dtypes[0] == "uint8" and probs.transform == src.transform
        # Rounding to uint8 can tie the two largest probabilities, so the argmax may differ there.
        assert (probs.read().argmax(0) == classes).mean() > 0.99
        e = entropy.read(1)
        assert entropy.dtypes[0] == "float32" and 0 <= e.min() and e.max() <= 1


def test_band_selection_equals_a_file_of_those_bands(checkpoint, tmp_path):
    rgbir = _image(4, 200, 260, seed=1)
    _geotiff(tmp_path / "rgbir.tif", rgbir)
    _geotiff(tmp_path / "irrg.tif", rgbir[[3, 0, 1]])
    assert _predict(checkpoint, tmp_path / "rgbir.tif", tmp_path / "a", "--band-order", "4,1,2") == 0
    assert _predict(checkpoint, tmp_path / "irrg.tif", tmp_path / "b") == 0
    with rasterio.open(tmp_path / "a" / "rgbir_classes.tif") as a, \
            rasterio.open(tmp_path / "b" / "irrg_classes.tif") as b:
        assert np.array_equal(a.read(), b.read())


def test_plain_tiff_world_file_is_carried_over(checkpoint, tmp_path):
    Image.fromarray(_image(3, 120, 140).transpose(1, 2, 0)).save(tmp_path / "plain.tif")
    world = "0.09\n0.0\n0.0\n-0.09\n496000.045\n5420000.955\n"
    (tmp_path / "plain.tfw").write_text(world)
    assert _predict(checkpoint, tmp_path / "plain.tif", tmp_path / "out") == 0
    assert (tmp_path / "out" / "plain_classes.tfw").read_text() == world
    with rasterio.open(tmp_path / "out" / "plain_classes.tif") as got:
        assert got.transform == from_origin(496000.0, 5420001.0, 0.09, 0.09)


def test_unreadable_tile_is_skipped_and_the_others_are_written(checkpoint, tmp_path, capsys):
    folder = tmp_path / "tiles"
    folder.mkdir()
    Image.fromarray(_image(3, 100, 120).transpose(1, 2, 0)).save(folder / "good.png")
    (folder / "broken.tif").write_bytes(b"not a tiff at all")
    assert _predict(checkpoint, folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.tif" in err and err.strip().splitlines()[-1].startswith("error: 1 of 2")
    assert (tmp_path / "out" / "good_classes.tif").is_file() and (tmp_path / "out" / "good_color.png").is_file()
    assert not list((tmp_path / "out").glob("broken*"))


def test_existing_outputs_are_not_overwritten(checkpoint, tmp_path, capsys):
    tile = tmp_path / "t.png"
    Image.fromarray(_image(3, 64, 64).transpose(1, 2, 0)).save(tile)
    out = tmp_path / "out"
    assert _predict(checkpoint, tile, out) == 0
    (out / "t_classes.tif").write_bytes(b"earlier result")
    capsys.readouterr()
    assert _predict(checkpoint, tile, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert (out / "t_classes.tif").read_bytes() == b"earlier result"
    assert _predict(checkpoint, tile, out, "--overwrite") == 0
    assert (out / "t_classes.tif").read_bytes() != b"earlier result"


@pytest.mark.parametrize("flags", [["--band-order", "1,2"], ["--band-order", "1,2,5"], ["--stride", "0"]])
def test_bad_options_end_with_one_line(checkpoint, tmp_path, capsys, flags):
    tile = tmp_path / "t.tif"
    _geotiff(tile, _image(3, 64, 64))
    code = _predict(checkpoint, tile, tmp_path / "out", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("t_*"))


def test_outputs_are_ready_for_a_gis(checkpoint, tmp_path):
    """Colour table, nodata, band names and a QGIS legend; the PNG georeferenced by its world file and CRS."""
    tile = tmp_path / "tile.tif"
    _geotiff(tile, _image(3, 150, 200))
    assert _predict(checkpoint, tile, tmp_path / "out", "--probs", "--entropy") == 0
    out = tmp_path / "out"
    with rasterio.open(out / "tile_classes.tif") as got:
        colormap = got.colormap(1)
        assert all(colormap[i][:3] == tuple(int(v) for v in PALETTE[i]) for i in range(len(CLASS_NAMES)))
        assert got.nodata == IGNORE_INDEX and got.descriptions == ("class",)
        tags = got.tags(1)
        assert [tags[f"class_{i}"] for i in range(len(CLASS_NAMES))] == list(CLASS_NAMES)
    with rasterio.open(out / "tile_probs.tif") as probs:
        assert all(name in text for name, text in zip(CLASS_NAMES, probs.descriptions, strict=True))
    style = ElementTree.parse(out / "tile_classes.qml").getroot()
    entries = style.findall(".//paletteEntry")
    assert [(int(e.get("value")), e.get("label"), e.get("color")) for e in entries] == [
        (i, name, "#" + bytes(PALETTE[i].tolist()).hex()) for i, name in enumerate(CLASS_NAMES)]
    with rasterio.open(tile) as src, rasterio.open(out / "tile_color.png") as png:
        assert png.crs == src.crs
        assert png.transform.almost_equals(src.transform)


def test_a_plain_png_gets_no_world_file(checkpoint, tmp_path):
    Image.fromarray(_image(3, 64, 64).transpose(1, 2, 0)).save(tmp_path / "t.png")
    assert _predict(checkpoint, tmp_path / "t.png", tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t_classes.qml", "t_classes.tif", "t_color.png"]


def test_a_tile_with_more_bands_needs_bands(checkpoint, tmp_path, capsys):
    _geotiff(tmp_path / "rgbir.tif", _image(4, 64, 64))
    assert _predict(checkpoint, tmp_path / "rgbir.tif", tmp_path / "out") == 2
    assert "4 band(s); pass --band-order" in capsys.readouterr().err


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_output_files_follow_the_umask(checkpoint, tmp_path, mask):
    Image.fromarray(_image(3, 64, 64).transpose(1, 2, 0)).save(tmp_path / "t.png")
    old = os.umask(mask)
    try:
        assert _predict(checkpoint, tmp_path / "t.png", tmp_path / "out") == 0
        with publish_dir(tmp_path / "published") as staging:
            (staging / "file").write_text("x")
    finally:
        os.umask(old)
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert stat.S_IMODE((tmp_path / "published").stat().st_mode) == 0o777 & ~mask
