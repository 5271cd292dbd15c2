"""The stages: the four of the NAPG pipeline and the baselines it is compared with, one definition each
(docs/method.md §5, "Baselines").

Everything that differs between stages is a field here: the trainer, the command line, the hand-off
checks and the tools read this table instead of testing stage names, and ``method`` names the class whose
``train_step`` is the stage's iteration. Adding a stage means adding one entry; adding a method, one class
in ``engine/methods/`` and the entry that names it (README, "Add a method"). A pipeline step has a step
script at the repository root; every other stage runs through the generic runner ``tools/train.py STAGE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ORIGINAL = "original"  # meta["stage"] of a checkpoint converted from the released code


@dataclass(frozen=True)
class Stage:
    name: str  # "step0".."step3", "minent", ...: the run folder and the config section
    title: str  # a short human name for tables
    # What runs it after `python`, from the repository root: its step script, or `tools/train.py <name>`.
    script: str
    description: str  # its --help text
    # The stage whose run folder under --work-dir starts this one when no --init is given (None: afresh).
    previous: str | None
    # meta["stage"] of the checkpoints that --init accepts.
    accepts_init: frozenset[str]
    # The training iteration: the import path of its class (engine/methods/), a string so that utils imports
    # no engine module.
    # Its discriminators and whether it trains on target images are attributes of that class.
    method: str
    epoch_role: str  # whose training data set the length of an epoch: "source" or "target"
    target_view: str  # transform of the target training batches: "plain" or "weak_strong"
    # The BatchNorm statistics mode every run of this stage uses whatever --bn-stats says (None: the flag).
    bn_stats: str | None
    # The stage whose finished run starts this one under `tools/run_pipeline.py --warm-start` (None: none).
    warm_start: str | None = None
    # The original's schedules for this stage, over OPTIONS's defaults (stage-local epochs). The per-class lists
    # (K per class, GNCE windows) are the benchmark's: data/benchmarks.py.
    defaults: dict[str, Any] = field(default_factory=dict)
    # One of the NAPG pipeline's steps, which `tools/run_pipeline.py` runs in order by default (False: a
    # baseline, run by name).
    pipeline: bool = True

    @property
    def command(self) -> tuple[str, ...]:
        """``script`` as the arguments after the Python interpreter."""
        return tuple(self.script.split())


# The baselines (docs/method.md, "Baselines") train from a step-0 run, as step 1 does, and train, score and
# hand off the classifier; they use no prototype refresh (``Method.refreshes_prototypes``).
_BASELINE = {"previous": None, "accepts_init": frozenset({"step0"}), "epoch_role": "source", "target_view": "plain",
             "bn_stats": None, "warm_start": "step0", "pipeline": False}


STAGE_LIST: tuple[Stage, ...] = (
    Stage("step0", "source only", "step0-source-only.py",
          "Source-only baseline: classifier CE + prototype NLL on the source, no adaptation.",
          previous=None, accepts_init=frozenset({"step0"}),
          method="engine.methods.source_only.SourceOnly",
          epoch_role="source", target_view="plain", bn_stats="shared",  # never sees a target image
          defaults={"epochs": 30, "tgt_proto_start": 0, "w_adv_d1": 0.0, "w_adv_d2": 0.0}),
    Stage("step1", "warm-up", "step1-warm-up.py",
          "Warm-up: single-prototype groups (K=1), GNCE on the source, entropy adversarial training.",
          previous=None, accepts_init=frozenset({"step0", ORIGINAL}),
          method="engine.methods.napg.NAPG",
          epoch_role="source", target_view="plain", bn_stats=None, warm_start="step0",
          defaults={"epochs": 30, "tgt_proto_start": 20, "tau_start": 0.89, "w_gnce": 0.1, "gnce_start_epoch": 2}),
    Stage("step2", "MPG UDA", "step2-UDA-training.py",
          "UDA with multi-prototype groups (K_c per class) from source + confident target features.",
          previous="step1", accepts_init=frozenset({"step1", ORIGINAL}),
          method="engine.methods.napg.NAPG",
          epoch_role="source", target_view="plain", bn_stats=None,
          defaults={"epochs": 31, "tau_start": 0.90, "tau_min": 0.80, "w_gnce": 0.1, "gnce_target_weight": 0.5}),
    Stage("step3", "teacher-student", "step3-teacher-student.py",
          "Teacher-student: frozen step-2 teacher, weak/strong target views, masked feature distillation.",
          previous="step2", accepts_init=frozenset({"step2", ORIGINAL}),
          method="engine.methods.teacher_student.TeacherStudent",
          epoch_role="target", target_view="weak_strong", bn_stats=None,
          defaults={"epochs": 16, "tau_start": 0.80, "lr": 2e-5, "w_ce": 0.0, "w_proto": 0.0}),
    # The baselines' epochs are step 1's: the same budget from the same step-0 start. Options they do not
    # read are zeroed so that config.yaml says what trained.
    Stage("minent", "MinEnt", "tools/train.py minent",
          "MinEnt baseline (Vu et al., CVPR 2019): source CE + entropy minimisation of the target predictions.",
          method="engine.methods.minent.MinEnt", **_BASELINE,
          defaults={"epochs": 30, "tgt_proto_start": 0, "w_proto": 0.0, "w_adv_d1": 0.0, "w_adv_d2": 0.0}),
    Stage("advent", "AdvEnt", "tools/train.py advent",
          "AdvEnt baseline (Vu et al., CVPR 2019): source CE + adversarial alignment of the target entropy maps "
          "through one discriminator (D1, weight --w-adv-d1).",
          method="engine.methods.advent.AdvEnt", **_BASELINE,
          defaults={"epochs": 30, "tgt_proto_start": 0, "w_proto": 0.0, "w_adv_d2": 0.0}),
    Stage("dacs", "DACS", "tools/train.py dacs",
          "DACS baseline (Tranheden et al., WACV 2021): EMA-teacher pseudo-labels, ClassMix of source into "
          "target, confidence-weighted self-training + source CE.",
          method="engine.methods.dacs.DACS", **_BASELINE,
          defaults={"epochs": 30, "tgt_proto_start": 0, "w_proto": 0.0, "w_adv_d1": 0.0, "w_adv_d2": 0.0,
                    "ema_momentum": 0.99}),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in STAGE_LIST}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
PIPELINE: tuple[str, ...] = tuple(stage.name for stage in STAGE_LIST if stage.pipeline)  # step0..step3

