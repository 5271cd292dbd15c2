"""The registry of domains (prepared mmseg-layout folders under a data root) and the benchmark of a run's data."""

from __future__ import annotations

from pathlib import Path

from data.benchmarks import BENCHMARKS, Benchmark, Domain, benchmark_of
from data.files import read_meta
from data.isprs import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from utils.errors import UserError

__all__ = ["CLASS_NAMES", "DOMAINS", "IGNORE_INDEX", "NUM_CLASSES", "Domain", "check_num_classes", "data_benchmark",
           "domain_bands", "get_domain", "resolve_domain", "run_benchmark"]


def data_benchmark(data_root: str | Path | None, *domains: str | None) -> Benchmark:
    """The benchmark of the prepared ``domains`` (their meta.json); they must share one."""
    found = {name: benchmark_of(read_meta(resolve_domain(data_root, name))) for name in domains if name}
    return _one_benchmark(found) or BENCHMARKS["isprs"]


def _one_benchmark(found: dict[str, Benchmark]) -> Benchmark | None:
    """The benchmark that all of ``found`` (domain -> its benchmark) share; None for none."""
    if len({b.name for b in found.values()}) > 1:
        which = ", ".join(f"{n}: {b.name}" for n, b in found.items())
        raise UserError(f"the domains belong to different benchmarks ({which}); adapt between domains of one benchmark")
    return next(iter(found.values()), None)


def run_benchmark(data_root: str | Path | None, *domains: str | None) -> Benchmark | None:
    """The benchmark of a run's ``domains`` before it reads them: each prepared folder's meta.json, else the
    declaration that registers the domain's name; None when no domain says. They must share one."""
    found: dict[str, Benchmark] = {}
    for name in filter(None, domains):
        try:
            found[name] = benchmark_of(read_meta(resolve_domain(data_root, name)))
        except UserError:  # not prepared (yet): its registered name may still say
            if (domain := get_domain(name)) is not None:
                found[name] = _BENCHMARK_OF[domain.name]
    return _one_benchmark(found)


def check_num_classes(num_classes: int, benchmark: Benchmark) -> None:
    """The data's labels are ``benchmark``'s classes: a run must train that many."""
    if num_classes != benchmark.num_classes:
        raise UserError(f"'num_classes' must be {benchmark.num_classes}: the data's labels are the "
                        f"{benchmark.num_classes} {benchmark.name} classes (train ids 0..{benchmark.num_classes - 1}), "
                        f"got {num_classes}")


# Every benchmark's domains, by canonical name (the declarations in data/benchmarks.py own them).
DOMAINS: dict[str, Domain] = {d.name: d for b in BENCHMARKS.values() for d in b.domains}
_BENCHMARK_OF: dict[str, Benchmark] = {d.name: b for b in BENCHMARKS.values() for d in b.domains}
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
