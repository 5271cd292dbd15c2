"""Run step 0 -> 1 -> 2 -> 3 for one domain pair and print the per-stage target-val and source-val table.

    python tools/run_pipeline.py --config configs/demo.yaml --work-dir runs/demo [--flag value ...]

Extra flags are passed to every stage. Finished stages are kept (``--overwrite`` retrains every stage,
unfinished ones included), an interrupted stage is resumed from its checkpoint and one stopped before
its first checkpoint starts again, so re-running the same command continues the pipeline. Writes
``<work-dir>/results.json``: for each stage the target-val metrics of the classifier branch and its
source-val mIoU, and ``<work-dir>/panels.png``: the first target-val patches, their ground truth and each
finished stage's prediction side by side.
"""

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.benchmarks import benchmark_of
from engine.cli import flag_overrides, train_stage
from engine.config import resolve_config
from engine.pictures import pipeline_panels
from engine.rundir import Action, RunFolder, State
from utils.checkpoint import atomic_write_bytes
from utils.config import load_yaml
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.metrics import current_keys
from utils.paths import check_output_files, check_output_folder
from utils.plots import image_png
from utils.run import read_json, write_json
from utils.stages import PIPELINE, STAGE_NAMES, STAGES


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0],
                        usage="%(prog)s --config YAML [--work-dir DIR] [--stages STAGE ...] [STAGE FLAGS ...]",
                        epilog="Every other flag is a stage option (see python step1-warm-up.py --help) and is "
                               "passed on to every stage run, after the config: e.g. --device cuda --amp bf16.")
    parser.add_argument("--config", required=True, help="YAML config of the pair (configs/*.yaml)")
    parser.add_argument("--work-dir", help="pipeline folder; stages go to <work-dir>/<stage> (default: the "
                        "config's work_dir)")
    parser.add_argument("--stages", nargs="+", default=list(PIPELINE), choices=STAGE_NAMES,
                        help="stages to run, in this order (default: the pipeline step0..step3; a baseline "
                             "such as dacs runs by name, from step 0 with --warm-start)")
    parser.add_argument("--overwrite", action="store_true", help="retrain stages that are already finished")
    parser.add_argument("--warm-start", action="store_true",
                        help="step 1 starts from this pipeline's step 0 (the stand-in for ImageNet weights when "
                             "there are none; step 0 is then also the source-only row of the table)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    yaml_data, overrides = load_yaml(args.config), flag_overrides(extra)
    work_dir = args.work_dir or yaml_data.get("work_dir")
    if not work_dir:
        raise UserError(f"{args.config} sets no work_dir; pass --work-dir DIR")
    work_dir = check_output_folder(work_dir, "--work-dir")
    check_output_files([work_dir / "results.json", work_dir / "panels.png"], "--work-dir")
    for stage in args.stages:
        folder = RunFolder(work_dir, stage)
        action = folder.next_action(overwrite=args.overwrite)
        if action is Action.SKIP:
            print(f"{stage}: finished run found in {folder.path}, kept")
            continue
        options = {**overrides, "work_dir": str(work_dir), "resume": action is Action.RESUME,
                   "overwrite": action is Action.REPLACE}
        warm_start = STAGES[stage].warm_start
        if args.warm_start and warm_start is not None:
            options["init"] = str(work_dir / warm_start)
        cfg = resolve_config(stage, yaml_data, options, yaml_name=args.config)
        print(f"== {stage} ==", flush=True)
        train_stage(cfg)
        if folder.state is not State.FINISHED:
            raise UserError(f"{stage} stopped before the end; run the same command again to continue")
    results = collect_results(work_dir)
    write_json(work_dir / "results.json", results)
    print(results_table(results))
    finished = [folder.path for folder in (RunFolder(work_dir, s) for s in STAGES) if folder.finished]
    if finished and results:
        atomic_write_bytes(work_dir / "panels.png", image_png(pipeline_panels(finished, torch.device("cpu"))))
        print(f"pictures: {work_dir / 'panels.png'} (input, ground truth, then each stage's prediction); "
              f"confusion.png and panels.png in each stage folder")
    return 0


def collect_results(work_dir: Path) -> dict:
    """Target-val classifier metrics of every finished stage under ``work_dir``."""
    results = {}
    for stage in STAGE_NAMES:
        path = work_dir / stage / "eval.json"
        if path.exists():
            ev = read_json(path)
            cls = current_keys(ev["classifier"])
            benchmark = benchmark_of(ev)  # eval.json names it (ISPRS for runs that predate the field)
            results[stage] = {**{k: cls[k] for k in benchmark.summary_columns}, "iou": cls["iou"],
                              "split": ev["split"], "benchmark": benchmark.name,
                              "protocol": ev.get("protocol", benchmark.default_protocol),
                              "prototype_miou": ev.get("prototype", {}).get("miou"),
                              "source_val_miou": ev.get("source_val", {}).get("classifier", {}).get("miou")}
    return results


def results_table(results: dict) -> str:
    first = next(iter(results.values()), {"split": "target-val", "protocol": "mmseg"})
    benchmark = benchmark_of(first)
    columns = benchmark.summary_columns
    lines = [f"{'stage':<24}" + "".join(f"{name:>8}" for name in columns.values()) + f"{'src mIoU':>10}"]
    for stage, m in results.items():
        source = m.get("source_val_miou")
        lines.append(f"{stage + ' ' + STAGES[stage].title:<24}" + "".join(f"{100 * m[k]:>8.2f}" for k in columns)
                     + (f"{100 * source:>10.2f}" if source is not None else f"{'-':>10}"))
    protocols = " / ".join(dict.fromkeys(m["protocol"] for m in results.values())) or first["protocol"]
    lines.append(f"({first['split']}, protocol {protocols}, classifier branch, {benchmark.classes_note}; "
                 f"src = source-val)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
