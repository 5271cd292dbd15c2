"""Class list and the registry of ISPRS domains (prepared mmseg-layout folders under a data root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.benchmarks import BENCHMARKS, Benchmark, benchmark_of
from data.files import read_meta
from data.isprs import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from utils.errors import UserError

__all__ = ["CLASS_NAMES", "DOMAINS", "IGNORE_INDEX", "NUM_CLASSES", "Domain", "check_num_classes", "data_benchmark",
           "domain_bands", "get_domain", "resolve_domain"]


def data_benchmark(data_root: str | Path | None, *domains: str | None) -> Benchmark:
    """The benchmark of the prepared ``domains`` (their meta.json); they must share one."""
    found = {name: benchmark_of(read_meta(resolve_domain(data_root, name))) for name in domains if name}
    kinds = {b.name for b in found.values()}
    if len(kinds) > 1:
        which = ", ".join(f"{n}: {b.name}" for n, b in found.items())
        raise UserError(f"the domains belong to different benchmarks ({which}); adapt between domains of one benchmark")
    return next(iter(found.values()), BENCHMARKS["isprs"])


def check_num_classes(num_classes: int, benchmark: Benchmark) -> None:
    """The data's labels are ``benchmark``'s classes: a run must train that many."""
    if num_classes != benchmark.num_classes:
        raise UserError(f"'num_classes' must be {benchmark.num_classes}: the data's labels are the "
                        f"{benchmark.num_classes} {benchmark.name} classes (train ids 0..{benchmark.num_classes - 1}), "
                        f"got {num_classes}")


@dataclass(frozen=True)
class Domain:
    """A registered domain: folder name, the bands held in the PNG's R,G,B slots, ground sampling distance."""

    name: str
    dataset: str
    bands: tuple[str, str, str]
    gsd_m: float
    aliases: tuple[str, ...] = ()


# The aliases are the folder names of the original NAPG code ("vailhingen6" is its spelling).
DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("potsdam_rgb", "potsdam", ("R", "G", "B"), 0.05, ("potsdamRGB6",)),
        Domain("potsdam_irrg", "potsdam", ("NIR", "R", "G"), 0.05, ("potsdamIRRG6",)),
        Domain("vaihingen_irrg", "vaihingen", ("NIR", "R", "G"), 0.09, ("vailhingen6",)),
        # Potsdam resampled to Vaihingen's 9 cm before cropping (prepare tool, --target-gsd 0.09).
        Domain("potsdam_rgb_9cm", "potsdam", ("R", "G", "B"), 0.09),
        Domain("potsdam_irrg_9cm", "potsdam", ("NIR", "R", "G"), 0.09),
        Domain("loveda_urban", "loveda", ("R", "G", "B"), 0.3),
        Domain("loveda_rural", "loveda", ("R", "G", "B"), 0.3),
    )
}
_ALIASES: dict[str, str] = {alias: d.name for d in DOMAINS.values() for alias in d.aliases}


def get_domain(name: str) -> Domain | None:
    """The registered domain for a canonical name or an alias, else None."""
    return DOMAINS.get(_ALIASES.get(name, name))


def resolve_domain(data_root: str | Path | None, name: str | Path) -> Path:
    """Find a prepared domain folder (one that holds ``img_dir/``).

    ``name`` is a registered name or alias (looked up as ``<data_root>/<canonical>``, then
    ``<data_root>/<alias>``), an unregistered folder name under ``data_root``, or a path.
    Raises UserError listing every place looked at.
    """
    root = Path(data_root).expanduser() if data_root is not None else None
    text = str(name)
    domain = get_domain(text)
    candidates: list[Path] = []
    if domain is not None and root is not None:
        candidates += [root / n for n in (domain.name, *domain.aliases)]
    elif domain is None:
        path = Path(text).expanduser()
        if root is not None and not path.is_absolute():
            candidates.append(root / path)
        candidates.append(path)
    for cand in candidates:
        if (cand / "img_dir").is_dir():
            return cand
    if not candidates:
        raise UserError(f"domain {text!r} is a registered name but no data root was given; pass --data-root")
    looked = ", ".join(f"{c} ({'exists but has no img_dir/' if c.is_dir() else 'missing'})" for c in candidates)
    raise UserError(
        f"domain {text!r} not found; looked for {looked}. A domain folder holds img_dir/{{train,val}} and "
        f"ann_dir/{{train,val}}: prepare one with tools/prepare_isprs.py, or fix --data-root / the domain name "
        f"(registered: {', '.join(DOMAINS)}; aliases: {', '.join(_ALIASES)})"
    )


def domain_bands(folder: Path) -> list[str] | None:
    """The bands in the R, G, B slots of a prepared folder's images (``meta.json``, else the registered
    domain of the folder's name), e.g. ["NIR", "R", "G"]; None when neither says."""
    bands = read_meta(folder).get("bands")
    if bands is None and (domain := get_domain(folder.name)) is not None:
        bands = domain.bands
    return list(bands) if bands is not None else None
