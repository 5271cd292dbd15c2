"""Target statistics of the real ISPRS data sets that the synthetic pair (data/synthetic/) imitates.

Numbers only: the generator does not read them (its scene and look constants were fitted to them once),
tests/test_synthetic.py checks the generated data against them. Nothing here reads /work/shared or any
other real data at run time. Classes are in raw-id order 1..6: impervious, building, low vegetation,
tree, car, clutter. Colours are per-class mean/std of the 8-bit PNG values, keyed by band name.
"""

from __future__ import annotations

CLASSES = ("impervious", "building", "low_vegetation", "tree", "car", "clutter")

# Class shares in percent of the labelled pixels, by data set.
# Potsdam: ground-truth pixel counts of the five foreground classes on the validation scenes of the
# Raster Vision Potsdam example (azavea/raster-vision pull request #373, eval.json "gt_count":
# impervious 27141209, building 27351432, low vegetation 27837580, tree 15629888, car 1324321). The
# clutter count is not in that record; clutter is set to 5 % (Potsdam has clearly more clutter than
# Vaihingen) and the five counts are scaled into the remaining 95 %.
# Vaihingen: the commonly quoted shares of the 16 labelled tiles (roughly: impervious 28, building 26,
# low vegetation 21, tree 23, car 1.2, clutter 1). No table giving them was located when this file was
# written, so treat them as approximate; the test tolerances are wider than their uncertainty.
CLASS_SHARES: dict[str, tuple[float, ...]] = {
    "potsdam": (26.0, 26.2, 26.6, 15.0, 1.3, 5.0),
    "vaihingen": (28.0, 26.0, 21.0, 23.0, 1.2, 1.0),
}
SHARE_SOURCES = {
    "potsdam": "azavea/raster-vision PR #373 (Potsdam example eval.json gt_count), clutter assumed 5 %",
    "vaihingen": "commonly quoted shares of the 16 labelled Vaihingen tiles (approximate, see above)",
}

# Per-class colour mean and std of the real labelled patches in MMSegmentation's test data
# (tests/data/pseudo_potsdam_dataset and pseudo_vaihingen_dataset), computed once over the pixels of
# each class (label 0, the eroded boundary, excluded):
#   Potsdam 2_10_0_0_512_512.png, RGB, 5 cm;  Vaihingen area1_0_0_512_512.png, IRRG, 9 cm.
# Neither patch contains clutter (None). Single 512 px crops: one street's worth of each class, so the
# means are a calibration anchor, not the data sets' true averages.
Colour = dict[str, tuple[float, float]]  # band -> (mean, std)
REAL_PATCH_COLOURS: dict[str, tuple[Colour | None, ...]] = {
    "potsdam_rgb": (
        {"R": (73.0, 14.8), "G": (84.8, 14.5), "B": (82.0, 14.6)},
        {"R": (127.4, 63.0), "G": (95.8, 42.1), "B": (78.1, 33.1)},
        {"R": (49.6, 11.3), "G": (54.0, 11.1), "B": (47.9, 10.3)},
        {"R": (63.3, 12.2), "G": (69.3, 14.1), "B": (61.4, 14.4)},
        {"R": (65.1, 26.6), "G": (63.6, 16.4), "B": (64.4, 19.6)},
        None,
    ),
    "vaihingen_irrg": (
        {"NIR": (67.4, 40.3), "R": (71.3, 35.7), "G": (72.1, 37.6)},
        {"NIR": (100.9, 36.9), "R": (89.1, 30.3), "G": (84.1, 26.7)},
        {"NIR": (81.9, 55.2), "R": (48.5, 14.1), "G": (49.4, 17.5)},
        {"NIR": (76.2, 36.6), "R": (47.7, 13.9), "G": (48.4, 16.0)},
        {"NIR": (61.2, 39.3), "R": (65.7, 34.8), "G": (68.4, 37.2)},
        None,
    ),
}
# The band order of each prepared domain's PNG slots.
DOMAIN_BANDS = {"potsdam_rgb": ("R", "G", "B"), "potsdam_irrg": ("NIR", "R", "G"), "vaihingen_irrg": ("NIR", "R", "G")}


def target_colour_means(domain: str) -> tuple[tuple[float, ...] | None, ...]:
    """Per-class mean colour, in ``domain``'s PNG slot order, that the synthetic domain is fitted to.

    None where the patches have no such class. Potsdam IRRG has no real sample: its R and G are Potsdam
    RGB's (the same pixels in the real data set) and its NIR is Vaihingen's (the same materials seen
    through a similar near-infrared band). That NIR anchor is a rough one: the synthetic source has its
    own near-infrared response (vegetation brighter, built surfaces darker than Vaihingen's), which stays
    within the tests' tolerance of it.
    """
    if domain == "potsdam_irrg":
        sources = (REAL_PATCH_COLOURS["potsdam_rgb"], REAL_PATCH_COLOURS["vaihingen_irrg"])
    else:
        sources = (REAL_PATCH_COLOURS[domain],)
    means: list[tuple[float, ...] | None] = []
    for per_class in zip(*sources):
        if None in per_class:
            means.append(None)
            continue
        bands: Colour = {}
        for colour in reversed(per_class):  # the first source wins where two give a band
            bands.update(colour)
        means.append(tuple(bands[band][0] for band in DOMAIN_BANDS[domain]))
    return tuple(means)
