"""The whole results table in one command: every task x seed through tools/run_pipeline.py, then the table.

    python tools/run_table.py --tasks all --seeds 0 1 2 [--protocol st-dasegnet] [STAGE FLAGS ...]
    python tools/run_table.py --tasks all --seeds 0 1 2 --slurm [--slurm-options "--partition gpu"]

A task is a pair config (``configs/<task>.yaml``); each (task, seed) runs in ``<runs>/<task>_seed<seed>``
with ``--seed <seed>``, one after another, and rerunning the command continues (finished stages are kept,
an interrupted one resumes). Other flags go on to every stage. Then ``tools/collect_results.py`` writes the
table to ``<runs>/table/``. ``--protocol`` checks that every domain folder of the data was prepared with
that protocol (``prepare_isprs.py --protocol``), so that the table is comparable with its published numbers.

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

from data.domains import resolve_domain
from data.files import read_meta
from data.isprs import PROTOCOLS
from engine.cli import flag_overrides
from tools import collect_results, run_pipeline
from utils.checkpoint import atomic_write_bytes
from utils.config import load_yaml, resolve_config
from utils.errors import UserError, run_cli
from utils.flags import FlagParser

REPO = Path(__file__).resolve().parents[1]
TASKS = ("pot_rgb2vai", "pot_irrg2vai", "vai2pot_irrg", "vai2pot_rgb")  # the paper's four, configs/<task>.yaml


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0],
                        usage="%(prog)s --tasks all|TASK,... --seeds S ... [--slurm] [STAGE FLAGS ...]",
                        epilog="Every other flag is a stage option, passed on to every stage of every run.")
    parser.add_argument("--tasks", default="all", help=f"comma-separated pair configs, or all ({','.join(TASKS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of the run folders and the table")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS),
                        help="refuse data prepared with another protocol (default: take the data as they are)")
    parser.add_argument("--stages", nargs="+", help="stages of each pipeline (default: run_pipeline's, step0..step3)")
    parser.add_argument("--slurm", action="store_true", help="write an sbatch array script instead of training")
    parser.add_argument("--slurm-options", default="", help="extra #SBATCH options, e.g. '--partition gpu --gres "
                        "gpu:1 --time 24:00:00'")
    return parser


def tasks_of(text: str) -> list[str]:
    tasks = list(TASKS) if text == "all" else [t for t in text.split(",") if t]
    missing = [t for t in tasks if not (REPO / "configs" / f"{t}.yaml").is_file()]
    if missing or not tasks:
        raise UserError(f"--tasks {text}: no config for {', '.join(missing) or '(none)'}; use all or names of "
                        f"configs/*.yaml such as {','.join(TASKS)}")
    return tasks


def pipeline_args(task: str, seed: int, runs: Path, stages: list[str] | None, extra: list[str]) -> list[str]:
    """The tools/run_pipeline.py arguments of one (task, seed)."""
    return ["--config", str(REPO / "configs" / f"{task}.yaml"), "--work-dir", str(runs / f"{task}_seed{seed}"),
            *(["--stages", *stages] if stages else []), "--seed", str(seed), *extra]


def check_protocol(tasks: list[str], protocol: str, extra: list[str]) -> None:
    """Every domain of every task was prepared with ``protocol`` (mmseg for folders without meta.json's field)."""
    overrides = flag_overrides(extra)
    for task in tasks:
        cfg = resolve_config("step0", load_yaml(REPO / "configs" / f"{task}.yaml"), overrides)
        for name in (cfg.source, cfg.target):
            folder = resolve_domain(Path(cfg.data_root), name)
            found = read_meta(folder).get("protocol", "mmseg")
            if found != protocol:
                raise UserError(f"{folder} was prepared with protocol {found}, not {protocol}; prepare it with "
                                f"tools/prepare_isprs.py --protocol {protocol} and pass --data-root")


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
    tasks = tasks_of(args.tasks)
    flag_overrides(extra)  # an unknown stage flag fails now, not in the first job
    if args.protocol:
        check_protocol(tasks, args.protocol, extra)
    jobs = [(task, seed) for task in tasks for seed in args.seeds]
    folders = [args.runs / f"{task}_seed{seed}" for task, seed in jobs]
    table_args = [*map(str, folders), "--out", str(args.runs / "table"), "--overwrite"]
    collect = [sys.executable, str(REPO / "tools" / "collect_results.py"), *table_args]
    if args.slurm:
        pipeline = [sys.executable, str(REPO / "tools" / "run_pipeline.py")]
        commands = [[*pipeline, *pipeline_args(task, seed, args.runs, args.stages, extra)] for task, seed in jobs]
        script = args.runs / "run_table.sbatch"
        atomic_write_bytes(script, sbatch_script(commands, args.runs, args.slurm_options).encode())
        print(f"wrote {script} ({len(commands)} array elements); submit it with: sbatch {script}\n"
              f"then the table: {shlex.join(collect)}")
        return 0
    for task, seed in jobs:
        print(f"=== {task}, seed {seed} ===", flush=True)
        run_pipeline.main(pipeline_args(task, seed, args.runs, args.stages, extra))
    return collect_results.main(table_args)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
