"""A few iterations of every stage on CUDA, with assertions: the CUDA-only code paths in one command.

    make gpu-check          (or: python tools/gpu_check.py [--amp bf16] [--work-dir DIR] [--record FILE])

Builds the small synthetic set (once per ``--work-dir``: the bf16 and fp32 checks of ``tools/gpu_report.py``
share it), runs every stage on one GPU (step 0 -> 3, then the baselines; ``--amp``, channels-last), checks
that every stage finishes and that every logged loss is finite, and with two or more GPUs runs steps 1 and 2
under torchrun (NCCL) and checks that all ranks end with identical parameters and prototypes. Each stage runs
under ``--stage-timeout-s`` and is killed with all its processes (loader workers, torchrun's ranks) when it
overruns. ``--record`` keeps a JSON of the stages checked so far, rewritten as each one finishes; each stage's
full output goes to ``--log-dir`` (default: ``logs/`` in the work folder).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.synthetic import make_synthetic
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.paths import check_output_folder
from utils.process import run_group
from utils.publish import publish_dir
from utils.run import write_json
from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
DDP_STAGES = ("step1", "step2")


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", default="bf16", choices=OPTIONS["amp"].choices, help=OPTIONS["amp"].help)
    parser.add_argument("--work-dir", help="where to write the data and runs (default: a temporary folder)")
    parser.add_argument("--stage-timeout-s", type=float, default=600.0, help="seconds each stage may take")
    parser.add_argument("--record", type=Path, help="JSON of the stages checked so far, rewritten after each")
    parser.add_argument("--log-dir", type=Path, help="folder for each stage's full output (default: "
                        "<work-dir>/logs)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.work_dir:
        check_output_folder(args.work_dir, "--work-dir")
    if not torch.cuda.is_available():
        raise UserError("no CUDA device visible; gpu-check needs a GPU")
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="napg-gpu-check-"))
    n_gpu = torch.cuda.device_count()
    record: dict[str, Any] = {"amp": args.amp, "gpus": n_gpu, "passed": None, "stages": []}
    save = (lambda: write_json(args.record, record)) if args.record is not None else (lambda: None)
    save()
    data = shared_data(root)
    common = ["--data-root", str(data), "--backbone", "resnet18", "--img-size", "256", "--batch-size", "4",
              "--epochs", "2", "--iters-per-epoch", "3", "--device", "cuda", "--amp", args.amp,
              "--channels-last", "--tgt-proto-start", "1", "--log-every", "1", "--num-workers", "2",
              "--progress", "false"]
    chains = [("single", [sys.executable], tuple(STAGES))]
    if n_gpu >= 2:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={min(n_gpu, 4)}"]
        chains.append(("ddp", launcher, DDP_STAGES))
    logs = args.log_dir or root / "logs"
    for chain, launcher, stages in chains:
        work = root / args.amp / chain
        for stage in stages:
            cmd = [*launcher, *STAGES[stage].command, *common, "--work-dir", str(work), "--overwrite"]
            log = logs / f"{chain}-{stage}.log"
            run = run_group(cmd, timeout_s=args.stage_timeout_s, log=log, cwd=REPO)
            entry = {"stage": stage, "chain": chain, "seconds": run.seconds, "log": str(log), "ok": False}
            record["stages"].append(entry)
            try:
                entry["world_size"] = _check_stage(stage, chain, run.returncode, args.stage_timeout_s, work, log)
            except UserError as err:
                entry["error"] = str(err)
                record["passed"] = False
                save()
                raise
            entry["ok"] = True
            save()
            print(f"{stage}: ok ({entry['world_size']} process(es), {run.seconds:.0f} s)", flush=True)
    record["passed"] = True
    save()
    print(f"gpu-check passed ({n_gpu} GPU(s), amp {args.amp}); runs in {root}")
    return 0


def shared_data(root: Path) -> Path:
    """The small synthetic set under ``root/data``, made once and published whole (``utils/publish.py``), so a
    check killed while writing it leaves no half-written set for the next one."""
    data = root / "data"
    if not data.exists():
        with publish_dir(data) as staging:
            make_synthetic(staging, mode="prepared", size="small")
    return data


def _check_stage(stage: str, chain: str, returncode: int | None, timeout_s: float, work: Path, log: Path) -> int:
    """The stage's process count, once its exit, its completion and its losses are checked."""
    if returncode is None:
        raise UserError(f"{stage} ({chain}) stopped at its time limit of {timeout_s:.0f} s (--stage-timeout-s); "
                        f"its output: {log}")
    if returncode != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise UserError(f"{stage} ({chain}) failed with exit code {returncode}: {lines[-1] if lines else ''}")
    run_dir = work / stage
    missing = [name for name in ("manifest.json", "eval.json") if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{stage} ({chain}) exited without {', '.join(missing)} in {run_dir}")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        bad = [k for k, v in record.items() if k.startswith("train/loss") and not math.isfinite(v)]
        if bad:
            raise UserError(f"{stage} ({chain}): non-finite {', '.join(bad)} at step {record['step']}")
    ranks = json.loads((run_dir / "manifest.json").read_text())["ranks"]
    if ranks["world_size"] > 1 and not (ranks["identical_parameters"] and ranks["identical_prototypes"]):
        raise UserError(f"{stage} ({chain}): ranks diverged: {ranks}")
    return ranks["world_size"]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
