"""Gather the results of many runs into one table: mean ± std per domain pair and stage.

    python tools/collect_results.py runs/pot_irrg2vai_seed* runs/vai2pot_irrg_seed* --out results/

Each RUN is a pipeline folder (its stage folders are read: steps and baselines) or a finished stage folder. A stage's
numbers are the target-val classifier metrics of its ``eval.json``; its pair and stage come from its
``manifest.json``, the data's protocol (``prepare_isprs.py``/``prepare_loveda.py --protocol``) and benchmark from
``eval.json`` (the benchmark's declaration names the classes and the summary means it has). Runs of the same
pair, stage and label are averaged (the seeds of one experiment): the standard deviation is the sample one (n
- 1), "-" for a single run. The label is ``--label`` when given, else a hash of the run's ``config.yaml``
without its seeds and run-folder options, plus the kind of checkpoint it started from, so that runs of
different settings are never averaged together; the table lists which folders each row averages. Writes
``OUT/results.md`` (also printed), ``OUT/results.csv`` and ``OUT/results.png``; existing files are replaced
only with ``--overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import csv
import hashlib
import io
import json
from collections.abc import Sequence

import numpy as np

from data.benchmarks import Benchmark, benchmark_of
from utils.checkpoint import atomic_write_bytes
from utils.config import load_yaml
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.metrics import current_keys
from utils.paths import check_output_files, check_output_folder
from utils.plots import can_draw, image_png, results_rgb
from utils.run import read_json
from utils.stages import STAGE_NAMES

# Summary metrics (eval.json's keys) in the table's order; a benchmark shows those it declares
# (``Benchmark.summary_columns``).
METRIC_ORDER = ("miou", "miou_5", "mf1", "mf1_5", "oa")
OUTPUTS = ("results.md", "results.csv", "results.png")


def stage_folders(run: Path) -> list[Path]:
    """The finished stage folders of a pipeline folder, or ``run`` itself when it is one."""
    if (run / "manifest.json").is_file():
        return [run]
    found = [run / s for s in STAGE_NAMES if (run / s / "manifest.json").is_file()]
    if not found:
        raise UserError(f"{run} holds no finished stage (no manifest.json in it or in a stage folder of it: "
                        f"{', '.join(STAGE_NAMES)})")
    return found


# Options that differ between the seeds of one experiment, or only say where and how it ran.
NOT_IN_LABEL = ("seed", "kmeans_seed", "work_dir", "init", "resume", "overwrite", "device", "num_workers",
                "progress", "log_every", "checkpoint_every", "stop_after", "deterministic")
Group = tuple[str, str, str]  # pair, stage, label


def run_label(folder: Path) -> str:
    """``cfg <hash>`` of the stage folder's config.yaml (without NOT_IN_LABEL), plus what it started from."""
    config = folder / "config.yaml"
    if not config.is_file():
        return "no config.yaml"
    options = {k: v for k, v in load_yaml(config).items() if k not in NOT_IN_LABEL}
    label = "cfg " + hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
    env = read_json(folder / "env.json") if (folder / "env.json").is_file() else {}
    init = env.get("init")
    return label + (f", init {init.get('stage', 'checkpoint')}" if isinstance(init, dict) else "")


def gather(runs: Sequence[Path], label: str | None = None) -> tuple[dict[Group, list[tuple[Path, dict]]], Benchmark]:
    """(pair, stage, label) -> (folder, target-val classifier metrics) of every run of it, and the runs' benchmark
    (eval.json's; ISPRS for runs that predate the field), which must be the same for all."""
    groups: dict[Group, list[tuple[Path, dict]]] = {}
    benchmarks: dict[str, tuple[Benchmark, Path]] = {}
    for run in runs:
        for folder in stage_folders(run):
            manifest = read_json(folder / "manifest.json")
            evaluation = read_json(folder / "eval.json")
            if "classifier" not in evaluation:
                raise UserError(f"{folder / 'eval.json'} has no target-val metrics (the run had no target)")
            benchmark = benchmark_of(evaluation)
            protocol = evaluation.get("protocol", benchmark.default_protocol)
            pair = f"{manifest['source']} -> {manifest['target']} ({protocol})"
            key = (pair, manifest["stage"], label or run_label(folder))
            groups.setdefault(key, []).append((folder, current_keys(evaluation["classifier"])))
            benchmarks.setdefault(benchmark.name, (benchmark, folder))
    if len(benchmarks) > 1:
        raise UserError(f"the runs segment different class lists ({', '.join(str(f) for _, f in benchmarks.values())} "
                        f"differ); "
                        f"collect the runs of each benchmark separately")
    ordered = dict(sorted(groups.items(), key=lambda kv: (kv[0][0], STAGE_NAMES.index(kv[0][1]), kv[0][2])))
    return ordered, next(iter(benchmarks.values()))[0]  # stage_folders found at least one


def metric_columns(benchmark: Benchmark) -> dict[str, str]:
    """The summary metrics of ``benchmark``'s table: eval.json's key -> column name."""
    return {key: benchmark.summary_columns[key] for key in METRIC_ORDER if key in benchmark.summary_columns}


def summarise(runs: list[dict], benchmark: Benchmark) -> dict[str, tuple[float, float]]:
    """Mean and sample std of each metric and each class's IoU (``iou_<class>``) over ``runs``; NaN std for one."""
    values = {key: [r[key] for r in runs] for key in metric_columns(benchmark)}
    values.update({f"iou_{name}": [r["iou"][i] for r in runs] for i, name in enumerate(benchmark.classes)})
    out = {}
    for key, vals in values.items():
        arr = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        out[key] = (float(np.mean(arr)), float(np.std(arr, ddof=1)) if len(arr) > 1 else float("nan"))
    return out


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "-"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if not np.isnan(std) else "")


def paper_table(groups: dict[Group, list[tuple[Path, dict]]], stats: dict[Group, dict]) -> list[str]:
    """The table as papers print it: a row per stage (and label), a column per pair, target-val mIoU."""
    pairs = list(dict.fromkeys(pair for pair, _, _ in groups))
    rows = list(dict.fromkeys((stage, label) for _, stage, label in groups))
    lines = ["| stage | label | " + " | ".join(pairs) + " |", "|" + "---|" * (len(pairs) + 2)]
    for stage, label in rows:
        cells = [_pm(*stats[(pair, stage, label)]["miou"]) if (pair, stage, label) in stats else "" for pair in pairs]
        lines.append(f"| {stage} | {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(groups: dict[Group, list[tuple[Path, dict]]], stats: dict[Group, dict], benchmark: Benchmark) -> str:
    metrics, classes = metric_columns(benchmark), benchmark.classes
    head = ["pair", "stage", "label", "runs", *metrics.values()]
    lines = ["Target-val mIoU (%), mean ± sample std over runs:", "", *paper_table(groups, stats),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, runs in groups.items():
        lines.append(f"| {' | '.join(key)} | {len(runs)} | " + " | ".join(_pm(*stats[key][k]) for k in metrics) + " |")
    head = ["pair", "stage", "label", *classes]
    lines += ["", "IoU per class:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in groups:
        lines.append(f"| {' | '.join(key)} | " + " | ".join(_pm(*stats[key][f"iou_{n}"]) for n in classes) + " |")
    lines += ["", f"Target-val, classifier branch, percent; mean ± sample std over runs; {benchmark.classes_note}. "
                  "Rows average the runs of one pair, stage and label:", ""]
    lines += [f"- {' / '.join(key)}: {', '.join(str(folder) for folder, _ in runs)}" for key, runs in groups.items()]
    return "\n".join(lines) + "\n"


def csv_text(groups: dict[Group, list[tuple[Path, dict]]], stats: dict[Group, dict], benchmark: Benchmark) -> str:
    keys = [*metric_columns(benchmark), *(f"iou_{n}" for n in benchmark.classes)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pair", "stage", "label", "runs", *(f"{k}_{part}" for k in keys for part in ("mean", "std"))])
    for key, runs in groups.items():
        writer.writerow([*key, len(runs), *(f"{v:.6f}" for k in keys for v in stats[key][k])])
    return buffer.getvalue()


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pipeline or stage folders")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.md, .csv and .png")
    parser.add_argument("--label", help="one label for every run given, so that they are averaged together "
                        "(default: per run, its config hash and what it started from)")
    parser.add_argument("--overwrite", action="store_true", help="replace results written before")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_folder(args.out, "--out")
    check_output_files([args.out / name for name in OUTPUTS], "--out", args.overwrite)
    groups, benchmark = gather(args.runs, args.label)
    stats = {key: summarise([metrics for _, metrics in runs], benchmark) for key, runs in groups.items()}
    table = markdown(groups, stats, benchmark)
    atomic_write_bytes(args.out / "results.md", table.encode())
    atomic_write_bytes(args.out / "results.csv", csv_text(groups, stats, benchmark).encode())
    metrics, classes = metric_columns(benchmark), benchmark.classes
    written = OUTPUTS[:2]
    if can_draw("results.png"):
        labels = [" ".join(key) for key in groups]
        chart = results_rgb(
            labels, {name: ([stats[g][k][0] for g in groups], [stats[g][k][1] for g in groups])
                     for k, name in metrics.items()},
            classes, tuple(np.array([[stats[g][f"iou_{n}"][i] for n in classes] for g in groups])
                               for i in (0, 1)))
        atomic_write_bytes(args.out / "results.png", image_png(chart))
        written = OUTPUTS
    print(table, end="")
    print(f"wrote {', '.join(str(args.out / n) for n in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
