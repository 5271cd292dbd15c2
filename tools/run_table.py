"""The whole results table in one command: every task x seed through tools/run_pipeline.py, then the table.

    python tools/run_table.py --tasks all --seeds 0 1 2 [--protocol st-dasegnet] [STAGE FLAGS ...]
    python tools/run_table.py --tasks all --seeds 0 1 2 --slurm [--slurm-options "--partition gpu"]
    python tools/run_table.py --tasks loveda --seeds 0 1 2 --protocol official-uda --target-root data_uda

A task is a pair config (``configs/<task>.yaml``); each (task, seed) runs in ``<runs>/<task>_seed<seed>``
with ``--seed <seed>``, one after another, and rerunning the command continues (finished stages are kept,
an interrupted one resumes). Other flags go on to every stage. Then ``tools/collect_results.py`` writes the
table to ``<runs>/table/``. ``all`` is the paper's four ISPRS tasks, ``loveda`` the two LoveDA ones: one table
holds one benchmark (one class list), so tasks of both are refused together. ``--protocol`` checks that every
domain folder of the data was prepared with that protocol of the tasks' benchmark (``prepare_isprs.py`` /
``prepare_loveda.py --protocol``), so that the table is comparable with its published numbers; a target-only
protocol (LoveDA's ``official-uda``, transductive) reads the targets from ``--target-root`` and checks that
the sources have the benchmark's default protocol.

With ``--slurm`` nothing trains here: the tool writes ``<runs>/run_table.sbatch``, one array element per
(task, seed), requeued on preemption (each element reruns its pipeline command, which resumes from
``last.pt``; Slurm's SIGTERM before the kill makes a stage save and stop), and prints how to submit it and
how to collect the table afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shlex
from collections.abc import Sequence

from data.benchmarks import BENCHMARKS, ISPRS, Benchmark, data_protocol_of
from data.domains import resolve_domain, run_benchmark
from data.files import read_meta
from engine.cli import flag_overrides
from engine.config import resolve_config
from tools import collect_results, run_pipeline
from utils.checkpoint import atomic_write_bytes
from utils.config import Config, load_yaml
from utils.errors import UserError, run_cli
from utils.flags import FlagParser

REPO = Path(__file__).resolve().parents[1]
TASKS = ("pot_rgb2vai", "pot_irrg2vai", "vai2pot_irrg", "vai2pot_rgb")  # the paper's four, configs/<task>.yaml
LOVEDA_TASKS = ("loveda_rural2urban", "loveda_urban2rural")
GROUPS = {"all": TASKS, "loveda": LOVEDA_TASKS}  # --tasks shorthands
PROTOCOL_NAMES = sorted({name for b in BENCHMARKS.values() for name in b.protocols})


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0],
                        usage="%(prog)s --tasks all|loveda|TASK,... --seeds S ... [--slurm] [STAGE FLAGS ...]",
                        epilog="Every other flag is a stage option, passed on to every stage of every run.")
    parser.add_argument("--tasks", default="all", help=f"comma-separated pair configs, all ({','.join(TASKS)}) or "
                        f"loveda ({','.join(LOVEDA_TASKS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the run folders and the table")
    parser.add_argument("--protocol", choices=PROTOCOL_NAMES,
                        help="refuse data prepared with another protocol (default: take the data as they are); one "
                             "of the tasks' benchmark: " + "; ".join(f"{b.name}: {', '.join(b.protocols)}"
                                                                      for b in BENCHMARKS.values()))
    parser.add_argument("--target-root", type=Path, help="folder of the target domains (default: the data root); "
                        "e.g. the one prepare_loveda.py --protocol official-uda wrote")
    parser.add_argument("--stages", nargs="+", help="stages of each pipeline (default: run_pipeline's, step0..step3)")
    parser.add_argument("--slurm", action="store_true", help="write an sbatch array script instead of training")
    parser.add_argument("--slurm-options", default="", help="extra #SBATCH options, e.g. '--partition gpu --gres "
                        "gpu:1 --time 24:00:00'")
    return parser


def tasks_of(text: str) -> list[str]:
    tasks = list(GROUPS[text]) if text in GROUPS else [t for t in text.split(",") if t]
    missing = [t for t in tasks if not (REPO / "configs" / f"{t}.yaml").is_file()]
    if missing or not tasks:
        raise UserError(f"--tasks {text}: no config for {', '.join(missing) or '(none)'}; use all, loveda or names "
                        f"of configs/*.yaml such as {','.join(TASKS)}")
    return tasks


def task_configs(tasks: list[str], overrides: dict, target_root: Path | None) -> dict[str, Config]:
    """The step-0 config of each task as its pipeline runs it (its target under ``target_root`` when given)."""
    configs = {}
    for task in tasks:
        yaml_data = load_yaml(REPO / "configs" / f"{task}.yaml")
        cfg = resolve_config("step0", yaml_data, overrides)
        if target_root is not None:
            cfg = resolve_config("step0", yaml_data, {**overrides, "target": str(target_root / cfg.target)})
        configs[task] = cfg
    return configs


def tasks_benchmark(configs: dict[str, Config]) -> Benchmark:
    """The one benchmark of the tasks' data (a table holds one class list)."""
    found = {task: run_benchmark(cfg.data_root, cfg.source, cfg.target) or ISPRS for task, cfg in configs.items()}
    if len({b.name for b in found.values()}) > 1:
        which = ", ".join(f"{task}: {b.name}" for task, b in found.items())
        raise UserError(f"the tasks belong to different benchmarks ({which}); run one table per benchmark "
                        f"(--tasks all, --tasks loveda)")
    return next(iter(found.values()))


def pipeline_args(task: str, seed: int, runs: Path, stages: list[str] | None, extra: list[str],
                  target: list[str]) -> list[str]:
    """The tools/run_pipeline.py arguments of one (task, seed); ``target``: ``--target DIR`` or nothing."""
    return ["--config", str(REPO / "configs" / f"{task}.yaml"), "--work-dir", str(runs / f"{task}_seed{seed}"),
            *(["--stages", *stages] if stages else []), "--seed", str(seed), *target, *extra]


def check_protocol(configs: dict[str, Config], benchmark: Benchmark, protocol: str) -> None:
    """Every domain of every task was prepared with ``protocol`` of ``benchmark`` (its default for folders without
    meta.json's field); the source of a target-only protocol with the default one."""
    if protocol not in benchmark.protocols:
        raise UserError(f"--protocol {protocol} is not a protocol of the tasks' benchmark {benchmark.name}; use "
                        f"{' or '.join(benchmark.protocols)}")
    source = benchmark.default_protocol if protocol in benchmark.target_only else protocol
    for cfg in configs.values():
        for name, wanted in ((cfg.source, source), (cfg.target, protocol)):
            folder = resolve_domain(Path(cfg.data_root), name)
            found = data_protocol_of(read_meta(folder))
            if found != benchmark.protocols[wanted]:
                raise UserError(f"{folder} was prepared with protocol {found}, not {benchmark.protocols[wanted]}; "
                                f"prepare it with {benchmark.prepare} --protocol {wanted} and pass --data-root"
                                + (" (targets: --target-root)" if wanted in benchmark.target_only else ""))


def sbatch_script(commands: list[list[str]], runs: Path, options: str) -> str:
    """An sbatch array script: element i runs commands[i] from the repository root, requeued on preemption."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=napg-table", f"#SBATCH --array=0-{len(commands) - 1}",
             "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120",  # SIGTERM 2 minutes before the time limit
             f"#SBATCH --output={runs}/slurm-%A_%a.out"]
    lines += [f"#SBATCH {option}" for option in shlex.split(options)] if options else []
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(REPO))}", "COMMANDS=("]
    lines += [f"  {shlex.quote(shlex.join(command))}" for command in commands]
    lines += [")",
              "# run_pipeline continues a requeued element where it stopped (finished stages kept, last.pt resumed);",
              "# exec so that Slurm's SIGTERM reaches the training process, which saves and exits.",
              'exec bash -c "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    args.runs = args.runs.resolve()  # the script and the commands work from any folder
    args.target_root = args.target_root.resolve() if args.target_root else None
    tasks = tasks_of(args.tasks)
    # An unknown stage flag fails now, not in the first job.
    configs = task_configs(tasks, flag_overrides(extra), args.target_root)
    benchmark = tasks_benchmark(configs)
    if args.protocol:
        check_protocol(configs, benchmark, args.protocol)
    targets = {task: ["--target", cfg.target] if args.target_root else [] for task, cfg in configs.items()}
    jobs = [(task, seed) for task in tasks for seed in args.seeds]
    folders = [args.runs / f"{task}_seed{seed}" for task, seed in jobs]
    table_args = [*map(str, folders), "--out", str(args.runs / "table"), "--overwrite"]
    collect = [sys.executable, str(REPO / "tools" / "collect_results.py"), *table_args]
    if args.slurm:
        pipeline = [sys.executable, str(REPO / "tools" / "run_pipeline.py")]
        commands = [[*pipeline, *pipeline_args(task, seed, args.runs, args.stages, extra, targets[task])]
                    for task, seed in jobs]
        script = args.runs / "run_table.sbatch"
        atomic_write_bytes(script, sbatch_script(commands, args.runs, args.slurm_options).encode())
        print(f"wrote {script} ({len(commands)} array elements); submit it with: sbatch {script}\n"
              f"then the table: {shlex.join(collect)}")
        return 0
    for task, seed in jobs:
        print(f"=== {task}, seed {seed} ===", flush=True)
        run_pipeline.main(pipeline_args(task, seed, args.runs, args.stages, extra, targets[task]))
    return collect_results.main(table_args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
