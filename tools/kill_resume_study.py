"""Kill a step-1 run with SIGKILL at random moments, resume it each time, compare with an uninterrupted run.

    python tools/kill_resume_study.py [--kills 10] [--seed 0] [--work-dir DIR] [--data-root DIR]

The run is an uncapped 3-epoch step 1 on the small synthetic set (CPU, ``--deterministic``, a
checkpoint every iteration, no workers). Each kill lands at a random iteration of the run plus a
random fraction of a second, so some land mid-iteration and some mid-write of ``last.pt``. After the
last kill the run is resumed to the end; the tool prints whether every tensor of ``model.pt`` equals
the uninterrupted run's and exits 0 only then.
"""

import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.paths import check_output_folder
from utils.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--source", "potsdam_irrg", "--target", "vaihingen_irrg", "--backbone", "resnet18", "--resize", "64",
             "--img-size", "64", "--batch-size", "2", "--eval-batch-size", "4", "--epochs", "3",
             "--refresh-max-batches", "2", "--eval-max-batches", "2", "--num-workers", "0", "--device", "cpu",
             "--log-every", "1", "--tgt-proto-start", "1", "--checkpoint-every", "1", "--deterministic",
             "--progress", "false"]


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs at random moments of the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work-dir", help="folder for the data and both runs (default: a temporary folder)")
    parser.add_argument("--data-root", help="prepared data (default: the small synthetic set, made here)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kills < 1:
        raise UserError(f"--kills must be >= 1, got {args.kills}")
    if args.work_dir:
        check_output_folder(args.work_dir, "--work-dir")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kill-study-"))
    data = Path(args.data_root) if args.data_root else work / "data"
    if not args.data_root and not data.exists():
        from data.synthetic import make_synthetic

        make_synthetic(data, mode="prepared", seed=0, size="small")
    flags = ["--data-root", str(data), *RUN_FLAGS]

    reference = _command(work / "reference", flags)
    subprocess.run(reference, cwd=REPO, check=True, capture_output=True)
    records = len((work / "reference" / "step1" / "metrics.jsonl").read_text().splitlines())
    rng = random.Random(args.seed)
    moments = sorted(rng.sample(range(1, records), min(args.kills, records - 1)))
    run_dir = work / "killed" / "step1"
    for k, moment in enumerate(moments, 1):
        command = _command(work / "killed", flags, resume=(run_dir / "last.pt").exists())
        delay = rng.uniform(0.0, 0.5)
        reached = _kill_at(command, run_dir / "metrics.jsonl", moment, delay)
        temps = sorted(p.name for p in run_dir.glob(".*.tmp"))
        print(f"kill {k}: SIGKILL at record {reached} + {delay:.2f} s; temporaries left: {temps or 'none'}")
    subprocess.run(_command(work / "killed", flags, resume=True), cwd=REPO, check=True, capture_output=True)
    differing = _differing(work / "reference" / "step1" / "model.pt", run_dir / "model.pt")
    if differing:
        print(f"DIFFERENT after {len(moments)} kills: {', '.join(differing[:5])}")
        return 1
    print(f"identical: after {len(moments)} kills and resumes every tensor of model.pt equals the uninterrupted run's")
    return 0


def _command(work: Path, flags: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, STAGES["step1"].script, "--work-dir", str(work), *flags, *(["--resume"] if resume else [])]


def _kill_at(command: list[str], metrics: Path, moment: int, delay: float) -> int:
    """Start ``command``, SIGKILL it ``delay`` s after ``metrics`` holds ``moment`` records; the count reached."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    count = 0
    while proc.poll() is None:
        count = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if count >= moment:
            time.sleep(delay)
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return count


def _differing(a: Path, b: Path) -> list[str]:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    out = []
    for key in ("model", "d1", "d2", "prototypes"):
        for name, tensor in sa[key].items():
            if isinstance(tensor, torch.Tensor) and not torch.equal(tensor, sb[key][name]):
                out.append(f"{key}.{name}")
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
