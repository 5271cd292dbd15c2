"""The validity study: does NAPG adapt, compared with source-only, AdaBN and a target oracle?

    python tools/validity.py --data-seed 1 --seeds 0 1 2 --out runs/validity_d1 [--with-step3] [--ablate]

On a synthetic pair made with ``--data-seed`` (``tools/make_synthetic.py``), one **warm start** (a
source-only run trained to convergence: the stand-in for ImageNet weights, trained once per data set
and reused) starts every run. For each training seed, at equal iteration budgets:

* ``source_only``    -- step 0 trained on from the warm start for as many iterations as steps 1 + 2;
* ``source_only_bn`` -- the same model with its BatchNorm statistics re-estimated on the target's
  train images for the target (AdaBN; no labels);
* ``napg``           -- step 1 -> step 2 from the warm start (the ``paper`` preset, or what the config
  and extra flags set); ``napg_step3`` with ``--with-step3``;
* ``oracle``         -- step 0 trained on from the warm start on the *target's* train labels, the
  upper bound UDA papers report;
* with ``--ablate``: ``napg_no_<term>``, NAPG with one component off (D1, D2, prototype NLL, GNCE).

Each model is evaluated on target val and source val. The study prints the table (mean +- std over
seeds, per-seed values, paired differences to source-only), and writes ``validity.json``,
``validity.png`` and every run folder under ``--out``; finished runs are kept, so rerunning the same
command continues. Extra flags are passed to every stage (e.g. ``--bn-stats shared``). Nothing here
reads a label of the target's train split except the oracle; nothing is selected by target-val labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.domains import resolve_domain
from data.synthetic import SIZES, make_synthetic
from engine.cli import flag_overrides, train_stage
from engine.evaluate import evaluate_checkpoint
from engine.rundir import Action, RunFolder
from utils.config import Config, load_yaml, resolve_config
from utils.errors import UserError, run_cli
from utils.paths import check_output_files, check_output_folder
from utils.run import read_json, write_json

# NAPG with one component switched off (in steps 1 and 2): the option that does it.
ABLATIONS = {"no_d1": {"w_adv_d1": 0.0}, "no_d2": {"w_adv_d2": 0.0}, "no_proto": {"w_proto": 0.0},
             "no_gnce": {"w_gnce": 0.0}}
METHODS = ("source_only", "source_only_bn", "napg", "napg_step3", "oracle")
LABELS = {"source_only": "source only", "source_only_bn": "source only + target BN (AdaBN)",
          "napg": "NAPG step 2", "napg_step3": "NAPG step 3", "oracle": "oracle (target labels)",
          **{f"napg_{k}": f"NAPG without {k[3:]}" for k in ABLATIONS}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-seed", type=int, required=True, help="seed of the synthetic data set")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds")
    parser.add_argument("--out", required=True, type=Path, help="study folder (data, runs, validity.json)")
    parser.add_argument("--config", default="configs/validity.yaml", help="stage config of every run")
    parser.add_argument("--size", default="demo", choices=sorted(SIZES), help="synthetic data set size")
    parser.add_argument("--warm-epochs", type=int, default=160, help="epochs of the warm start")
    parser.add_argument("--warm-lr", type=float, default=5e-4, help="learning rate of the warm start")
    parser.add_argument("--warm-start", type=Path,
                        help="a finished step-0 run folder to start from instead of training one (e.g. the "
                             "warm_start/step0 of another study on the same --data-seed)")
    parser.add_argument("--with-step3", action="store_true", help="also run and report step 3")
    parser.add_argument("--ablate", action="store_true", help="add NAPG runs with one component off")
    args, extra = parser.parse_known_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds has repeats: {args.seeds}")
    out = check_output_folder(args.out, "--out")
    check_output_files([out / "validity.json", out / "validity.png"], "--out")
    study = Study(args, extra)
    results = study.run()
    write_json(args.out / "validity.json", results)
    print(summary_table(results))
    plot(results, args.out / "validity.png")
    print(f"wrote {args.out / 'validity.json'} and {args.out / 'validity.png'}")
    return 0


class Study:
    """The runs of one study folder; every run is skipped when its folder is already finished."""

    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.extra, self.out = args, extra, args.out
        self.data_root = self.out / "data"
        self.yaml_data = load_yaml(args.config)
        self.overrides = flag_overrides(extra)  # the user's extra flags, parsed once
        step1, step2 = (self._config(stage, self.out, {}) for stage in ("step1", "step2"))
        self.source, self.target = step1.source, step1.target
        self.batch_size, self.resize, self.iters_cap = step1.batch_size, step1.resize, step1.iters_per_epoch
        # Equal budgets: the source-only and oracle runs train as many iterations as steps 1 + 2 together.
        self.napg_epochs = step1.epochs + step2.epochs

    # ------------------------------------------------------------------ runs
    def run(self) -> dict[str, Any]:
        self._data()
        if self.args.warm_start is not None:
            warm_run = self.args.warm_start
            if not (warm_run / "manifest.json").exists():
                raise UserError(f"--warm-start {warm_run}: not a finished run folder (no manifest.json)")
        else:
            warm_run = self._stage("step0", self.out / "warm_start", {
                "seed": 0, "epochs": self.args.warm_epochs, "lr": self.args.warm_lr}) / "step0"
        results: dict[str, Any] = {"data_seed": self.args.data_seed, "size": self.args.size,
                                   "config": str(self.args.config), "extra_flags": self.extra,
                                   "warm_start": {"run": str(warm_run), **self._scores(warm_run)}, "runs": {}}
        n_src, n_tgt = (self._batches(d) for d in (self.source, self.target))
        oracle_epochs = max(1, round(self.napg_epochs * n_src / n_tgt))
        results["budget"] = {"iterations": self.napg_epochs * n_src, "source_only_epochs": self.napg_epochs,
                             "oracle_epochs": oracle_epochs, "warm_start_epochs": self.args.warm_epochs,
                             "warm_start_lr": self.args.warm_lr}
        for seed in self.args.seeds:
            folder, s = self.out / f"seed{seed}", {"seed": seed, "init": str(warm_run)}
            run: dict[str, Any] = {}
            src_only = self._stage("step0", folder / "source_only", {**s, "epochs": self.napg_epochs})
            run["source_only"] = self._scores(src_only / "step0")
            run["source_only_bn"] = {"target_val": self._evaluate(src_only / "step0", self.target, recalibrate=True),
                                     "source_val": run["source_only"]["source_val"]}
            variants = {"napg": {}} | ({f"napg_{k}": v for k, v in ABLATIONS.items()} if self.args.ablate else {})
            for name, ablation in variants.items():
                napg = self._stage("step1", folder / name, {**s, **ablation})
                self._stage("step2", folder / name, {"seed": seed, **ablation})
                run[name] = self._scores(napg / "step2")
                if self.args.with_step3 and name == "napg":
                    self._stage("step3", folder / name, {"seed": seed})
                    run["napg_step3"] = self._scores(napg / "step3")
            oracle = self._stage("step0", folder / "oracle", {**s, "epochs": oracle_epochs,
                                                              "source": self.target, "target": self.target})
            run["oracle"] = {"target_val": _summary(read_json(oracle / "step0" / "eval.json")),
                             "source_val": self._evaluate(oracle / "step0", self.source, recalibrate=False)}
            results["runs"][str(seed)] = run
            write_json(self.out / "validity.json", results)  # partial results survive an interruption
        return results

    def _data(self) -> None:
        """The synthetic pair of ``--data-seed`` under ``<out>/data`` (made once, then checked)."""
        stamp = self.data_root / "study.json"
        wanted = {"data_seed": self.args.data_seed, "size": self.args.size}
        if stamp.exists():
            if read_json(stamp) != wanted:
                raise UserError(f"{self.out} holds a study of {read_json(stamp)}, not {wanted}; choose another --out")
            return
        if self.data_root.exists():
            shutil.rmtree(self.data_root)  # an interrupted generation: no stamp, so never used
        make_synthetic(self.data_root, "prepared", seed=self.args.data_seed, size=self.args.size)
        write_json(stamp, wanted)

    def _config(self, stage: str, work_dir: Path, options: dict[str, Any]) -> Config:
        """``stage``'s config in ``work_dir``: the study's YAML, then ``options``, then the user's extra flags."""
        return resolve_config(stage, self.yaml_data, {"data_root": str(self.data_root), "work_dir": str(work_dir),
                                                      **options, **self.overrides}, yaml_name=str(self.args.config))

    def _stage(self, stage: str, work_dir: Path, options: dict[str, Any]) -> Path:
        """Run ``stage`` into ``work_dir/stage`` unless it is finished there; returns ``work_dir``."""
        folder = RunFolder(work_dir, stage)
        action = folder.next_action()  # an interrupted run continues, one without a checkpoint starts again
        if action is Action.SKIP:
            print(f"{folder.path}: finished, kept", flush=True)
            return work_dir
        cfg = dataclasses.replace(self._config(stage, work_dir, options), resume=action is Action.RESUME)
        print(f"== {folder.path} ==", flush=True)
        train_stage(cfg)
        return work_dir

    def _batches(self, domain: str) -> int:
        n = len(list((resolve_domain(self.data_root, domain) / "img_dir" / "train").glob("*.png")))
        batches = max(1, n // self.batch_size)  # training streams drop the last partial batch
        return min(batches, self.iters_cap) if self.iters_cap else batches

    def _scores(self, run_dir: Path) -> dict[str, Any]:
        ev = read_json(run_dir / "eval.json")
        return {"target_val": _summary(ev), "source_val": _summary(ev["source_val"])}

    def _evaluate(self, run_dir: Path, domain: str, recalibrate: bool) -> dict[str, Any]:
        scores = evaluate_checkpoint(run_dir, self.data_root, domain, batch_size=self.batch_size, num_workers=0,
                                     resize=self.resize, recalibrate=recalibrate)
        return _summary(scores.results)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """Classifier-branch mIoU, mF1 and per-class IoU (fractions) of an eval.json-like dict."""
    m = results["classifier"]
    return {"miou": m["miou"], "mf1": m["mf1"], "iou": m["iou"]}


# ---------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def methods_of(results: dict[str, Any]) -> list[str]:
    """The methods every seed has, in report order."""
    runs = list(results["runs"].values())
    names = [m for m in (*METHODS, *(f"napg_{k}" for k in ABLATIONS)) if runs and all(m in r for r in runs)]
    return names


def summary_table(results: dict[str, Any]) -> str:
    """mIoU (%) on target val and source val: mean +- std over seeds, per seed, and paired to source-only."""
    seeds = list(results["runs"])
    lines = [f"validity study, data seed {results['data_seed']}, training seeds {', '.join(seeds)}; "
             f"warm start source-val mIoU {100 * results['warm_start']['source_val']['miou']:.2f}, "
             f"target-val {100 * results['warm_start']['target_val']['miou']:.2f}",
             f"{'method':<34}{'target-val mIoU':>18}{'per seed':>24}{'vs source only':>18}{'source-val mIoU':>18}"]
    for m in methods_of(results):
        tgt = [100 * results["runs"][s][m]["target_val"]["miou"] for s in seeds]
        src = [100 * results["runs"][s][m]["source_val"]["miou"] for s in seeds]
        diff = [t - 100 * results["runs"][s]["source_only"]["target_val"]["miou"] for s, t in zip(seeds, tgt)]
        (tm, ts), (sm, ss), (dm, ds) = _mean_std(tgt), _mean_std(src), _mean_std(diff)
        per_seed = " ".join(f"{v:.1f}" for v in tgt)
        paired = "" if m == "source_only" else f"{dm:+.2f} ± {ds:.2f}"
        target, source = f"{tm:.2f} ± {ts:.2f}", f"{sm:.2f} ± {ss:.2f}"
        lines.append(f"{LABELS[m]:<34}{target:>18}{per_seed:>24}{paired:>18}{source:>18}")
    lines.append("(classifier branch, 6 classes incl. clutter; std over seeds; 'vs source only' is the paired "
                 "difference per seed)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart of target-val and source-val mIoU per method (mean +- std, seeds as dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, seeds = methods_of(results), list(results["runs"])
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 4))
    for offset, (split, colour) in zip((-0.2, 0.2), (("target_val", "tab:blue"), ("source_val", "tab:grey"))):
        for i, m in enumerate(methods):
            values = [100 * results["runs"][s][m][split]["miou"] for s in seeds]
            mean, std = _mean_std(values)
            ax.bar(i + offset, mean, 0.38, yerr=std, color=colour, capsize=3,
                   label=split.replace("_", " ") if i == 0 else None)
            ax.scatter([i + offset] * len(values), values, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"Validity study, synthetic data seed {results['data_seed']} ({len(seeds)} training seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
