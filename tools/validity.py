"""The validity study: does NAPG adapt, compared with the baselines users pick instead?

    python tools/validity.py --data-seed 1 --seeds 0 1 2 --out runs/validity_d1 [--methods M,...] [--ablate]
                             [--amp bf16|off] [any stage flag, passed on to every stage]
    python tools/validity.py --collect DIR [DIR ...] --out DIR     # one study from studies of other seeds

On a synthetic pair made with ``--data-seed`` (``tools/make_synthetic.py --size study`` by default), each
training seed first trains its own **warm start** (a source-only run: the stand-in for ImageNet weights,
so the spread over seeds includes it). From it, at an equal budget of iterations (those of NAPG's
steps 1 + 2 in ``--config``):

* ``source_only``    -- step 0 trained on;  ``source_only_bn``: the same model with its BatchNorm
  statistics re-estimated on the target's train images (AdaBN, Li et al. 2018; no labels);
* ``minent``, ``advent`` -- entropy minimisation and adversarial entropy alignment (Vu et al., CVPR 2019);
* ``dacs``           -- self-training with an EMA teacher and ClassMix (Tranheden et al., WACV 2021);
* ``napg_step1``, ``napg``, ``napg_step3`` -- NAPG's warm-up, its multi-prototype UDA stage (step 2) and
  the teacher-student stage after it, at its share of the schedule;
* ``oracle``         -- step 0 trained on the *target's* train labels, the upper bound UDA papers report;
* with ``--ablate``: ``napg_no_<term>``, NAPG with one component off (D1, D2, prototype NLL, GNCE).

Every method is scored at its last iterate (never the best point of a curve) on target val and source
val, with the BatchNorm statistics it trained with (``target_val``) and after one recalibration pass over
the target's train images at the evaluation size (``target_val_recalibrated``, the same pass for all);
every stage also evaluates both val splits every ``--eval-every`` iterations (``curve``). The study prints
the table, and writes ``validity.json``, ``validity.md`` (the table), ``validity.png`` (bars), ``curves.png``
(mean +- std over seeds) and every run folder under ``--out``; finished runs are kept, so rerunning a
command continues it and adding methods adds runs. The training seeds are independent (each has its own
warm start), so they can run as separate jobs, each with its own ``--out``; ``--collect`` then joins their
``validity.json`` files (same data, config and budget; each seed once) into one study with its table and
pictures. Nothing here reads a label of the target's train split except the oracle, and nothing is
selected by target-val labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.domains import resolve_domain
from data.synthetic import SIZES, make_synthetic
from data.synthetic.colour_baseline import colour_classifier_scores
from engine.ceiling import resolution_ceiling_scores
from engine.cli import flag_overrides, train_stage
from engine.config import resolve_config
from engine.evaluate import evaluate_checkpoint
from engine.rundir import Action, RunFolder
from models.napg import FEATURE_STRIDE
from utils.checkpoint import atomic_write_bytes
from utils.config import Config, load_yaml
from utils.errors import UserError, run_cli
from utils.flags import FlagParser
from utils.paths import check_output_files, check_output_folder
from utils.plots import can_draw
from utils.run import read_json, write_json

# NAPG with one component switched off (in steps 1 and 2): the option that does it.
ABLATIONS = {"no_d1": {"w_adv_d1": 0.0}, "no_d2": {"w_adv_d2": 0.0}, "no_proto": {"w_proto": 0.0},
             "no_gnce": {"w_gnce": 0.0}}
BASELINES = ("minent", "advent", "dacs")  # each the stage of the same name (utils/stages.py)
METHODS = ("source_only", "source_only_bn", *BASELINES, "napg_step1", "napg", "napg_step3", "oracle")
OUTPUTS = ("validity.json", "validity.md", "validity.png", "curves.png")  # in --out
REPORT_ORDER = (*METHODS, *(f"napg_{k}" for k in ABLATIONS))  # the methods with the ablations
LABELS = {"source_only": "source only", "source_only_bn": "source only + AdaBN", "minent": "MinEnt",
          "advent": "AdvEnt", "dacs": "DACS (EMA self-training)", "napg_step1": "NAPG step 1 (warm-up)",
          "napg": "NAPG step 2", "napg_step3": "NAPG step 3", "oracle": "oracle (target labels)",
          **{f"napg_{k}": f"NAPG without {k[3:]}" for k in ABLATIONS}}


@dataclass(frozen=True)
class Recipe:
    """How a method's model is made: the stages run in one folder, the last one scored."""

    folder: str  # under seed<S>/
    stages: tuple[str, ...]  # each one after the other; the first starts from the warm start
    options: dict[str, Any] = field(default_factory=dict)  # for every stage of the chain
    on_target: bool = False  # trained on the target's labels (the oracle)


def recipe(method: str, epochs: int, oracle_epochs: int) -> Recipe:
    """The recipe of ``method`` at a budget of ``epochs`` source epochs (``oracle_epochs`` target epochs)."""
    napg = ("step1", "step2")
    if method in ("source_only", "source_only_bn"):  # AdaBN recalibrates source only's model
        return Recipe("source_only", ("step0",), {"epochs": epochs})
    if method in BASELINES:
        return Recipe(method, (method,), {"epochs": epochs})
    if method == "napg_step1":
        return Recipe("napg", napg[:1])
    if method == "napg":
        return Recipe("napg", napg)
    if method == "napg_step3":
        return Recipe("napg", (*napg, "step3"))
    if method == "oracle":
        return Recipe("oracle", ("step0",), {"epochs": oracle_epochs}, on_target=True)
    return Recipe(method, napg, ABLATIONS[method.removeprefix("napg_")])


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-seed", type=int, help="seed of the synthetic data set (required unless --collect)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (required unless --collect)")
    parser.add_argument("--collect", type=Path, nargs="+", metavar="DIR",
                        help="instead of training: join the validity.json of these study folders (other seeds of "
                             "one study) into --out")
    parser.add_argument("--out", required=True, type=Path, help="study folder (data, runs, validity.json)")
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--ablate", action="store_true", help="add NAPG runs with one component off")
    parser.add_argument("--config", default="configs/validity.yaml", help="stage config of every run")
    parser.add_argument("--size", default="study", choices=sorted(SIZES), help="synthetic data set size")
    parser.add_argument("--warm-epochs", type=int, default=10, help="source epochs of each seed's warm start")
    parser.add_argument("--warm-lr", type=float, default=5e-4, help="learning rate of the warm starts")
    parser.add_argument("--init", "--warm-start", dest="warm_start", type=Path,
                        help="one finished step-0 run folder that every seed starts from instead of its own warm "
                             "start (the spread over seeds is then conditional on it; --warm-start: old spelling)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.collect:
        if extra or args.seeds or args.data_seed is not None:
            raise UserError("--collect joins finished studies: give it only the study folders and --out")
    elif args.data_seed is None or not args.seeds:
        raise UserError("--data-seed and --seeds are required (or --collect DIR ... to join finished studies)")
    elif len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds has repeats: {args.seeds}")
    out = check_output_folder(args.out, "--out")
    check_output_files([out / name for name in OUTPUTS], "--out")
    results = collect([read_study(d) for d in args.collect]) if args.collect else Study(args, extra).run()
    write_json(args.out / "validity.json", results)
    atomic_write_bytes(args.out / "validity.md", markdown_table(results).encode())
    print(summary_table(results))
    if can_draw("validity.png and curves.png"):
        plot_bars(results, args.out / "validity.png")
        plot_curves(results, args.out / "curves.png")
    print(f"wrote {args.out / 'validity.json'}, validity.md and the pictures beside them")
    return 0


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {','.join(METHODS)}")
    return tuple(m for m in METHODS if m in names)  # report order


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
        self.window = step1.window
        self.eval_batch_size, self.eval_every = step1.eval_batch_size, step1.eval_every
        # Equal budgets: every method trains as many iterations as steps 1 + 2 together.
        self.napg_epochs = step1.epochs + step2.epochs
        self.methods = args.methods + tuple(f"napg_{k}" for k in ABLATIONS if args.ablate)
        self.scored: dict[Path, dict[str, Any]] = {}  # a run folder's scores, evaluated once

    # ------------------------------------------------------------------ runs
    def run(self) -> dict[str, Any]:
        self._data()
        n_src, n_tgt = (self._batches(d) for d in (self.source, self.target))
        budget = self.napg_epochs * n_src
        oracle_epochs = max(1, round(budget / n_tgt))
        results: dict[str, Any] = {
            "data_seed": self.args.data_seed, "size": self.args.size, "config": str(self.args.config),
            "extra_flags": self.extra, "resize": self.resize, "window": self.window, "methods": list(self.methods),
            "warm_start": {}, "runs": {}, "seconds": {},
            "budget": {"iterations": budget, "source_epochs": self.napg_epochs, "oracle_epochs": oracle_epochs,
                       "eval_every": self.eval_every, "warm_start_epochs": self.args.warm_epochs,
                       "warm_start_lr": self.args.warm_lr}}
        results["colour_classifier"] = self._colour_classifier()
        results["resolution_ceiling"] = self._resolution_ceiling()
        self._keep_earlier(results)
        for seed in self.args.seeds:
            warm = self._warm_start(seed)
            results["warm_start"][str(seed)] = {"run": str(warm), **self._scores(warm, recalibrate=False)}
            folder = self.out / f"seed{seed}"
            run, seconds = results["runs"].setdefault(str(seed), {}), results["seconds"].setdefault(str(seed), {})
            for method in self.methods:
                how = recipe(method, self.napg_epochs, oracle_epochs)
                scored = self._train(how, folder / how.folder, seed, warm)
                run[method] = self._method_scores(method, how, folder / how.folder, scored)
                seconds[method] = self._train_seconds(folder / how.folder, how)
                write_json(self.out / "validity.json", results)  # partial results survive an interruption
        return results

    def _keep_earlier(self, results: dict[str, Any]) -> None:
        """Add the methods and seeds of the folder's earlier ``validity.json`` that this invocation does not
        run, if it is of the same study (``SAME_STUDY``): a study folder gathers what its invocations ran."""
        path = self.out / "validity.json"
        if not path.is_file():
            return
        earlier = read_json(path)
        if any(earlier.get(key) != results.get(key) for key in SAME_STUDY):
            print(f"{path} is of another study (config, flags, data or budget differ): replaced", flush=True)
            return
        rerun = {str(seed) for seed in self.args.seeds}
        for seed, runs in earlier["runs"].items():
            redone = self.methods if seed in rerun else ()
            results["runs"][seed] = {m: v for m, v in runs.items() if m not in redone}
            results["seconds"][seed] = {m: v for m, v in earlier["seconds"].get(seed, {}).items() if m not in redone}
            results["warm_start"][seed] = earlier["warm_start"][seed]
        kept = set(self.methods) | set(earlier["methods"])
        results["methods"] = [m for m in REPORT_ORDER if m in kept]

    def _colour_classifier(self) -> dict[str, float]:
        """mIoU (%) of the per-pixel colour classifier fit on source train, on source val and on target val:
        what a CNN must beat to show it uses shape and context."""
        scores = {split: colour_classifier_scores(self.data_root, self.source, eval_domain=domain,
                                                  resize=self.resize)["miou"]
                  for split, domain in (("source_val", self.source), ("target_val", self.target))}
        print(f"colour-only classifier (fit on source train), mIoU %: source val {scores['source_val']:.1f}, "
              f"target val {scores['target_val']:.1f}", flush=True)
        return scores

    def _resolution_ceiling(self) -> dict[str, dict[str, Any]]:
        """mIoU (%) and per-class IoU of the cell-averaged ground truth at the classifier's output stride
        (engine/ceiling.py), on source val and target val at the study's size and window: about the best a
        method can score here."""
        scores = {split: resolution_ceiling_scores(resolve_domain(self.data_root, domain), "val", FEATURE_STRIDE,
                                                   self.resize, self.window)
                  for split, domain in (("source_val", self.source), ("target_val", self.target))}
        windows = f" in {self.window}-px windows" if self.window else ""
        print(f"resolution ceiling (output stride {FEATURE_STRIDE} at {self.resize or 'full'} px{windows}), mIoU %: "
              f"source val {scores['source_val']['miou']:.1f}, target val {scores['target_val']['miou']:.1f}",
              flush=True)
        return scores

    def _warm_start(self, seed: int) -> Path:
        if self.args.warm_start is not None:
            if not (self.args.warm_start / "manifest.json").exists():
                raise UserError(f"--init {self.args.warm_start}: not a finished run folder (no manifest.json)")
            return self.args.warm_start
        work_dir = self.out / "warm_start" / f"seed{seed}"
        self._stage("step0", work_dir, {"seed": seed, "epochs": self.args.warm_epochs, "lr": self.args.warm_lr})
        return work_dir / "step0"

    def _train(self, how: Recipe, work_dir: Path, seed: int, warm: Path) -> Path:
        """Run the recipe's stages into ``work_dir`` (finished ones kept); returns the scored run folder."""
        domains = {"source": self.target, "target": self.target} if how.on_target else {}
        for i, stage in enumerate(how.stages):
            start = {"init": str(warm)} if i == 0 else {}  # later stages start from the previous one's folder
            self._stage(stage, work_dir, {"seed": seed, **start, **domains, **how.options})
        return work_dir / how.stages[-1]

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
        started = time.time()
        make_synthetic(self.data_root, "prepared", seed=self.args.data_seed, size=self.args.size)
        write_json(stamp, wanted)
        print(f"made the {self.args.size} data set of data seed {self.args.data_seed} in {time.time() - started:.0f} s")

    def _config(self, stage: str, work_dir: Path, options: dict[str, Any]) -> Config:
        """``stage``'s config in ``work_dir``: the study's YAML, then ``options``, then the user's extra flags."""
        return resolve_config(stage, self.yaml_data, {"data_root": str(self.data_root), "work_dir": str(work_dir),
                                                      **options, **self.overrides}, yaml_name=str(self.args.config))

    def _stage(self, stage: str, work_dir: Path, options: dict[str, Any]) -> None:
        """Run ``stage`` into ``work_dir/stage`` unless it is finished there."""
        folder = RunFolder(work_dir, stage)
        action = folder.next_action()  # an interrupted run continues, one without a checkpoint starts again
        if action is Action.SKIP:
            print(f"{folder.path}: finished, kept", flush=True)
            return
        cfg = dataclasses.replace(self._config(stage, work_dir, options), resume=action is Action.RESUME)
        print(f"== {folder.path} ==", flush=True)
        train_stage(cfg)

    def _batches(self, domain: str) -> int:
        n = len(list((resolve_domain(self.data_root, domain) / "img_dir" / "train").glob("*.png")))
        batches = max(1, n // self.batch_size)  # training streams drop the last partial batch
        return min(batches, self.iters_cap) if self.iters_cap else batches

    # ------------------------------------------------------------------ scores
    def _method_scores(self, method: str, how: Recipe, work_dir: Path, scored: Path) -> dict[str, Any]:
        if scored not in self.scored:  # AdaBN shares source only's model
            self.scored[scored] = self._scores(scored, recalibrate=True)
        own = self.scored[scored]
        if method == "source_only_bn":  # AdaBN: source only's model with recalibrated target statistics
            return {**own, "target_val": own["target_val_recalibrated"], "curve": []}
        return {**own, "curve": stage_curve(work_dir, how.stages, source_val=not how.on_target)}

    def _scores(self, run_dir: Path, recalibrate: bool) -> dict[str, Any]:
        """Float32 scores of ``run_dir``'s final model: target val with its own BatchNorm statistics, source val,
        and (``recalibrate``) target val after the recalibration pass over the target's train images."""
        scores = {"target_val": self._evaluate(run_dir, self.target, False),
                  "source_val": self._evaluate(run_dir, self.source, False)}
        if recalibrate:
            scores["target_val_recalibrated"] = self._evaluate(run_dir, self.target, True)
        return scores

    def _evaluate(self, run_dir: Path, domain: str, recalibrate: bool) -> dict[str, Any]:
        scores = evaluate_checkpoint(run_dir, self.data_root, domain, batch_size=self.eval_batch_size,
                                     num_workers=0, resize=self.resize, recalibrate=recalibrate)
        return _summary(scores.results)

    def _train_seconds(self, work_dir: Path, how: Recipe) -> float:
        """Training time of the recipe's stages as their manifests record it (evaluations during training
        included)."""
        return round(sum(read_json(work_dir / s / "manifest.json")["train_seconds"] for s in how.stages), 1)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """Classifier-branch mIoU, mF1 and per-class IoU (fractions) of an eval.json-like dict."""
    m = results["classifier"]
    return {"miou": m["miou"], "mf1": m["mf1"], "iou": m["iou"]}


def stage_curve(work_dir: Path, stages: Sequence[str], source_val: bool = True) -> list[dict[str, Any]]:
    """The evaluations of a chain of stages, one point per evaluation: iterations counted from the chain's
    start, target-val and (``source_val``) source-val classifier mIoU; the last point is each stage's final
    evaluation (``eval.json``)."""
    curve, offset = [], 0
    for stage in stages:
        records = [json.loads(line) for line in (work_dir / stage / "metrics.jsonl").read_text().splitlines()]
        last_step = max(r["step"] for r in records if r.get("kind") == "train")
        points: dict[int, dict[str, Any]] = {}  # a resumed stage may repeat a step: its last record counts
        for r in records:
            if r.get("kind") == "eval" and "eval/classifier/miou" in r:
                points.setdefault(r["step"], {})["target_val_miou"] = r["eval/classifier/miou"]
            if r.get("kind") == "eval" and "eval_source/classifier/miou" in r:
                points.setdefault(r["step"], {})["source_val_miou"] = r["eval_source/classifier/miou"]
        final = read_json(work_dir / stage / "eval.json")
        points[last_step] = {"target_val_miou": final["classifier"]["miou"],
                             "source_val_miou": final["source_val"]["classifier"]["miou"]}
        for step in sorted(points):
            point = {"iteration": offset + step, "target_val_miou": points[step].get("target_val_miou"),
                     "source_val_miou": points[step].get("source_val_miou") if source_val else None}
            curve.append(point)
        offset += last_step
    return curve


# ---------------------------------------------------------------------------------------------- collect
# What must agree for studies of other seeds to be one study (the data, what was trained, how long); a key
# that an older validity.json lacks counts as None.
SAME_STUDY = ("data_seed", "size", "config", "extra_flags", "resize", "window", "budget", "colour_classifier",
              "resolution_ceiling")


def read_study(folder: Path) -> dict[str, Any]:
    """The ``validity.json`` of a study folder."""
    path = folder / "validity.json"
    if not path.is_file():
        raise UserError(f"--collect {folder}: no validity.json there; give the --out folder of a study")
    return read_json(path)


def collect(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One study from studies of other training seeds: their runs, warm starts and times side by side, the
    methods in report order."""
    first = studies[0]
    joined = {**{key: first[key] for key in SAME_STUDY if key in first}, "methods": [], "warm_start": {}, "runs": {},
              "seconds": {}}
    for study in studies:
        differ = [key for key in SAME_STUDY if study.get(key) != first.get(key)]
        if differ:
            raise UserError(f"--collect: the studies differ in {', '.join(differ)}; only other seeds of one study "
                            f"can be joined")
        again = sorted(set(study["runs"]) & set(joined["runs"]), key=int)
        if again:
            raise UserError(f"--collect: training seed {', '.join(again)} is in more than one study")
        for key in ("warm_start", "runs", "seconds"):
            joined[key].update(study[key])
    names = {m for study in studies for m in study["methods"]}
    joined["methods"] = [m for m in REPORT_ORDER if m in names]
    joined["runs"] = dict(sorted(joined["runs"].items(), key=lambda item: int(item[0])))
    return joined


# ---------------------------------------------------------------------------------------------- report
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def methods_of(results: dict[str, Any]) -> list[str]:
    """The methods every seed has, in report order."""
    runs = list(results["runs"].values())
    return [m for m in REPORT_ORDER if runs and all(m in r for r in runs)]


def _miou(results: dict[str, Any], seed: str, method: str, split: str) -> float:
    return 100 * results["runs"][seed][method][split]["miou"]


COLUMNS = ("method", "target val", "recalibrated", "per seed", "vs source only", "vs AdaBN", "source val")
NOTE = ("classifier branch, 6 classes incl. clutter, last iterate, float32 evaluation, mIoU %; mean ± std over "
        "training seeds; 'target val' with the BatchNorm statistics the method trained with, 'recalibrated' after "
        "one BatchNorm pass over target train at the evaluation size; 'vs ...': mean ± std of the per-seed "
        "differences of 'target val'")


def heading(results: dict[str, Any]) -> str:
    """What the table is of: data seed, training seeds, budget, warm starts, the colour-only classifier and
    the resolution ceiling."""
    seeds = list(results["runs"])
    warm = [results["warm_start"][s] for s in seeds]
    colour, ceiling = results["colour_classifier"], results.get("resolution_ceiling")
    return (f"validity study, data seed {results['data_seed']}, training seeds {', '.join(seeds)}; budget "
            f"{results['budget']['iterations']} iterations; warm starts: source-val mIoU "
            + " ".join(f"{100 * w['source_val']['miou']:.1f}" for w in warm) + ", target-val "
            + " ".join(f"{100 * w['target_val']['miou']:.1f}" for w in warm)
            + f"; colour-only classifier: source val {colour['source_val']:.1f}, target val {colour['target_val']:.1f}"
            + (f"; resolution ceiling: source val {ceiling['source_val']['miou']:.1f}, target val "
               f"{ceiling['target_val']['miou']:.1f}" if ceiling else ""))


def summary_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of :data:`COLUMNS` per method: target val with the method's own BatchNorm statistics and after
    the common recalibration, per seed, paired differences to source only and to AdaBN, and source val."""
    seeds, methods = list(results["runs"]), methods_of(results)
    rows = []
    for m in methods:
        tgt = [_miou(results, s, m, "target_val") for s in seeds]
        recal = [_miou(results, s, m, "target_val_recalibrated") for s in seeds]
        src = [_miou(results, s, m, "source_val") for s in seeds]
        paired = [_cell([t - _miou(results, s, ref, "target_val") for s, t in zip(seeds, tgt)], "+")
                  if ref in methods and m != ref else "" for ref in ("source_only", "source_only_bn")]
        rows.append((LABELS[m], _cell(tgt), _cell(recal), " ".join(f"{v:.1f}" for v in tgt), *paired, _cell(src)))
    return rows


def _cell(values: list[float], sign: str = "") -> str:
    """Mean ± sample std of ``values``; the mean alone for one value (one seed has no spread)."""
    mean, std = _mean_std(values)
    return f"{mean:{sign}.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:{sign}.2f}"


def summary_table(results: dict[str, Any]) -> str:
    """The rows of :func:`summary_rows` as printed text."""
    widths = (28, 15, 15, 18, 16, 15, 15)
    lines = [heading(results), "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                                       for i, (c, w) in enumerate(zip(COLUMNS, widths)))]
    for row in summary_rows(results):
        lines.append("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join([*lines, f"({NOTE})"])


def markdown_table(results: dict[str, Any]) -> str:
    """The rows of :func:`summary_rows` as a Markdown table (``validity.md``)."""
    lines = [heading(results), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(results)]
    return "\n".join([*lines, "", NOTE[0].upper() + NOTE[1:] + "."]) + "\n"


def plot_bars(results: dict[str, Any], path: Path) -> None:
    """Bar chart of target-val (own and recalibrated statistics) and source-val mIoU per method (mean +- std,
    seeds as dots)."""
    import matplotlib.pyplot as plt

    methods, seeds = methods_of(results), list(results["runs"])
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 4))
    bars = (("target_val", "tab:blue", "target val"),
            ("target_val_recalibrated", "tab:cyan", "target val, recalibrated BN"),
            ("source_val", "tab:grey", "source val"))
    for offset, (split, colour, label) in zip((-0.27, 0.0, 0.27), bars):
        for i, m in enumerate(methods):
            values = [_miou(results, s, m, split) for s in seeds]
            mean, std = _mean_std(values)
            ax.bar(i + offset, mean, 0.26, yerr=std, color=colour, capsize=3, label=label if i == 0 else None)
            ax.scatter([i + offset] * len(values), values, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"Validity study, synthetic data seed {results['data_seed']} ({len(seeds)} training seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Target-val and source-val mIoU against iterations: per method the mean over seeds with a +- std band."""
    import matplotlib.pyplot as plt

    seeds = list(results["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for ax, key, title in zip(axes, ("target_val_miou", "source_val_miou"), ("target val", "source val")):
        for m in methods_of(results):
            curves = [results["runs"][s][m]["curve"] for s in seeds]
            steps = sorted(set.intersection(*({p["iteration"] for p in c if p[key] is not None} for c in curves)))
            if not steps:
                continue
            values = [[100 * next(p[key] for p in c if p["iteration"] == i) for c in curves] for i in steps]
            mean, std = zip(*(_mean_std(v) for v in values))
            line, = ax.plot(steps, mean, label=LABELS[m], linewidth=1.2)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"{title} mIoU (%), mean ± std over {len(seeds)} seeds")
        ax.set_xlabel("iterations from the warm start")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Learning curves, synthetic data seed {results['data_seed']} (reported: the last point)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
