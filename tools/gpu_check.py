"""A few iterations of every stage on CUDA, with assertions: the CUDA-only code paths in one command.

    make gpu-check          (or: python tools/gpu_check.py [--amp bf16] [--work-dir DIR])

Builds the small synthetic set, runs step 0 -> 3 on one GPU (bf16 autocast, channels-last), checks that
every logged loss is finite, and with two or more GPUs runs steps 1 and 2 under torchrun (NCCL) and
checks that all ranks end with identical parameters and prototypes.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.synthetic import make_synthetic
from utils.config import OPTIONS
from utils.errors import UserError, run_cli
from utils.paths import check_output_folder
from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", default="bf16", choices=OPTIONS["amp"].choices)
    parser.add_argument("--work-dir", help="where to write the data and runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.work_dir:
        check_output_folder(args.work_dir, "--work-dir")
    if not torch.cuda.is_available():
        raise UserError("no CUDA device visible; gpu-check needs a GPU")
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="napg-gpu-check-"))
    data = root / "data"
    if not data.exists():
        make_synthetic(data, mode="prepared", size="small")
    common = ["--data-root", str(data), "--backbone", "resnet18", "--img-size", "256", "--batch-size", "4",
              "--epochs", "2", "--iters-per-epoch", "3", "--device", "cuda", "--amp", args.amp,
              "--channels-last", "--tgt-proto-start", "1", "--log-every", "1", "--num-workers", "2",
              "--progress", "false"]
    _run_chain([sys.executable], root / "single", common)
    n_gpu = torch.cuda.device_count()
    if n_gpu >= 2:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={min(n_gpu, 4)}"]
        _run_chain(launcher, root / "ddp", common, stages=("step1", "step2"))
    print(f"gpu-check passed ({n_gpu} GPU(s), amp {args.amp}); runs in {root}")
    return 0


def _run_chain(launcher: list[str], work: Path, common: list[str],
               stages: Sequence[str] = tuple(STAGES)) -> None:
    for stage in stages:
        proc = subprocess.run([*launcher, STAGES[stage].script, *common, "--work-dir", str(work), "--overwrite"],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"{stage} failed ({' '.join(launcher[-1:])}): {proc.stderr.strip().splitlines()[-1:]}")
        for line in (work / stage / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            bad = [k for k, v in record.items() if k.startswith("train/loss") and not math.isfinite(v)]
            if bad:
                raise UserError(f"{stage}: non-finite {', '.join(bad)} at step {record['step']}")
        ranks = json.loads((work / stage / "manifest.json").read_text())["ranks"]
        if ranks["world_size"] > 1 and not (ranks["identical_parameters"] and ranks["identical_prototypes"]):
            raise UserError(f"{stage}: ranks diverged: {ranks}")
        print(f"{stage}: ok ({ranks['world_size']} process(es))")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
