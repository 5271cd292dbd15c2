"""Synthetic ISPRS-like data: a Potsdam-like source and a Vaihingen-like target (spec section 3.5).

Each tile is a scene built in metres (street grid, buildings, trees, low vegetation, cars, clutter;
``scene.py``) and rasterised at its domain's GSD (source 0.05 m, target 0.09 m). Four virtual bands
(B, G, R, NIR) are rendered from per-material reflectances with per-instance jitter, heavy-tailed
textures, patchy (lush to dry) low vegetation and cast shadows, then passed through a per-domain sensor
model (white balance, gamma, contrast, blur, noise) whose gain, white balance and offset vary between
tiles and flight strips (``render.py``). Classes share colours as in the real data (flat roofs of the
ground's material, grass overlapping trees), so shape and context matter; the labels carry some noise
(mislabelled instances, wandering borders). ``colour_baseline.py`` measures how far colour alone goes.
The source is written as RGB and IRRG, the target as IRRG, with ISPRS colour labels and
eroded noBoundary labels, in zips that carry the official names (``downloads.py``). The knobs of the
domain gap are the two ``Look`` constants of ``pair.py`` and ``DOMAIN_GAP``, which blends the target's
look from the source's (0) to its own (1).

Calibration (targets and their sources in ``calibration.py``): the layouts give each domain the class
shares of the real data set (Potsdam: dense perimeter blocks with green courtyards; Vaihingen: detached
houses on lots, more trees), and the reflectances were fitted once so that each class's mean colour
matches the real labelled patches (Potsdam's near-infrared is its own response, anchored to Vaihingen's
only within the tests' tolerance). The gap is therefore in GSD, sensor response (white balance, gamma,
contrast, blur, noise, near-infrared), roof mix and layout, not in what colour a class has.

Only the tools and the tests use this package; training never imports it (tests/test_structure.py).
"""

from data.synthetic.downloads import MODES, SIZES, make_synthetic
from data.synthetic.pair import DOMAIN_GAP

__all__ = ["DOMAIN_GAP", "MODES", "SIZES", "make_synthetic"]
