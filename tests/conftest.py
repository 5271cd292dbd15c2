"""Shared fixtures: the small prepared synthetic data set and its raw zips."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding potsdam_rgb/, potsdam_irrg/ and vaihingen_irrg/ (small synthetic set, built once)."""
    # Imported here so that a broken data module fails these fixtures' users, not every test's collection.
    from data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, mode="prepared", seed=0, size="small")
    return root


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fake official ISPRS zips of the small synthetic set: {"potsdam": folder, "vaihingen": folder}."""
    from data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic-raw"), mode="raw", seed=0, size="small")
