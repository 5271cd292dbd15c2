"""The parity evidence ships with the repository: every fixture is there, and a missing one fails."""

from __future__ import annotations

import pytest

from tests.helpers import FIXTURES, REAL_SAMPLES, fixture_path

PARITY_FILES = ("entropy_disc.pt", "entropy_disc_128.pt", "gnce.pt", "head_k1.pt", "head_k2.pt", "head_k4.pt",
                "kmeans_groups.pt", "proto_nll.pt", "state_dict_keys.txt")


def test_fixtures_and_real_samples_are_inside_the_repository() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir() if p.name != "README.md") == sorted(PARITY_FILES)
    loveda = [f"loveda/{sub}/{i}.png" for sub in ("ann_dir", "img_dir") for i in range(3)]
    assert sorted(p.relative_to(REAL_SAMPLES).as_posix() for p in REAL_SAMPLES.rglob("*.png")) == [
        *loveda, "potsdam/ann_dir/2_10_0_0_512_512.png", "potsdam/img_dir/2_10_0_0_512_512.png",
        "vaihingen/ann_dir/area1_0_0_512_512.png", "vaihingen/img_dir/area1_0_0_512_512.png"]


def test_a_missing_fixture_fails_instead_of_skipping() -> None:
    with pytest.raises(pytest.fail.Exception, match="is missing"):
        fixture_path("no_such_fixture.pt")
