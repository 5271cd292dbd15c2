"""Config resolution: defaults < stage defaults < benchmark defaults < preset < YAML < YAML stage section < flags."""

import json

import pytest

from data.benchmarks import ISPRS, LOVEDA
from engine.cli import build_parser
from engine.config import config_from_args, resolve_config
from tests.helpers import REPO
from utils.config import OPTIONS, PRESETS, load_yaml
from utils.errors import UserError
from utils.stages import STAGES


def test_precedence_of_every_layer():
    yaml_data = {"lr": 3e-4, "epochs": 7, "step2": {"epochs": 9}}
    cfg = resolve_config("step2", yaml_data, {"lr": "5e-4"})
    assert cfg.lr == 5e-4  # flag beats YAML
    assert cfg.epochs == 9  # stage section beats the top level
    assert cfg.clusters == ISPRS.defaults("step2")["clusters"] == (2, 2, 2, 2, 4, 4)
    assert resolve_config("step1", yaml_data).epochs == 7


def test_unknown_keys_and_wrong_types_are_user_errors():
    with pytest.raises(UserError, match="unknown key 'lrr'"):
        resolve_config("step1", {"lrr": 1})
    with pytest.raises(UserError, match="unknown key 'bogus'"):
        resolve_config("step1", {"step1": {"bogus": 1}})
    with pytest.raises(UserError, match="'epochs' must be int"):
        resolve_config("step1", {"epochs": "many"})
    with pytest.raises(UserError, match="must be one of"):
        resolve_config("step1", {"backbone": "vgg16"})
    with pytest.raises(UserError, match="unknown preset"):
        resolve_config("step1", {"preset": "fast"})


def test_the_class_count_and_the_per_class_lists_come_from_the_datas_benchmark(tmp_path):
    # Folders of unregistered names: only their meta.json says LoveDA.
    for name in ("rural", "urban"):
        (tmp_path / name / "img_dir").mkdir(parents=True)
        (tmp_path / name / "meta.json").write_text(json.dumps({"benchmark": "loveda"}))
    data = {"data_root": str(tmp_path), "source": "rural", "target": "urban"}
    for stage, clusters, windows in (("step0", (1,) * 7, (1,) * 7), ("step2", (2,) * 7, (2,) * 7),
                                     ("step3", (1,) * 7, (1,) * 7)):
        cfg = resolve_config(stage, data)
        assert (cfg.num_classes, cfg.clusters, cfg.gnce_windows) == (7, clusters, windows), stage
    assert resolve_config("step2", data, {"clusters": "1 1 1 1 1 1 2"}).clusters == (1,) * 6 + (2,)  # flags win
    registered = {"source": "loveda_rural", "target": "loveda_urban"}  # not prepared: their registered names say
    assert resolve_config("step2", registered).clusters == LOVEDA.defaults("step2")["clusters"] == (2,) * 7
    assert resolve_config("step3").clusters == (1, 1, 1, 2, 2, 2) and resolve_config("step3").num_classes == 6
    with pytest.raises(UserError, match="'num_classes' must be 7: the data's labels are the 7 loveda classes"):
        resolve_config("step0", {**data, "num_classes": 6})
    (tmp_path / "urban" / "meta.json").write_text("{}")  # ISPRS (no benchmark field)
    with pytest.raises(UserError, match="different benchmarks"):
        resolve_config("step0", data)


def test_cross_option_checks():
    with pytest.raises(UserError, match="must divide"):
        resolve_config("step2", {"clusters": [3, 2, 2, 2, 4, 4]})
    with pytest.raises(UserError, match="one per class"):
        resolve_config("step2", {"clusters": [2, 2]})
    with pytest.raises(UserError, match="multiples of 32"):
        resolve_config("step1", {"img_size": 100})


def test_presets_only_set_flags_and_flags_still_win():
    paper = resolve_config("step1", {})
    legacy = resolve_config("step1", {}, preset="legacy")
    assert not paper.legacy_d2_gen and legacy.legacy_d2_gen
    assert legacy.legacy_d2_step1 and not resolve_config("step2", {}, preset="legacy").legacy_d2_step1
    assert resolve_config("step2", {}).w_gnce == 0.1
    assert resolve_config("step2", {}, preset="legacy").w_gnce == 0.0
    assert not resolve_config("step1", {}, {"legacy_d2_gen": "false"}, preset="legacy").legacy_d2_gen
    for preset in PRESETS.values():
        assert set(preset.values) <= set(OPTIONS) and set(preset.stages) <= set(STAGES)
        assert all(set(values) <= set(OPTIONS) for values in preset.stages.values())
    # legacy k-means is the released code's: sklearn, random_state 0, sklearn's default n_init ("auto")
    keys = ("kmeans_backend", "kmeans_n_init", "kmeans_seed", "legacy_epoch_length")
    assert {k: getattr(legacy, k) for k in keys} == {
        "kmeans_backend": "sklearn", "kmeans_n_init": "auto", "kmeans_seed": 0, "legacy_epoch_length": True}
    assert (paper.kmeans_backend, paper.kmeans_n_init, paper.legacy_epoch_length) == ("torch", 10, False)


def test_kmeans_n_init_takes_a_count_or_auto():
    assert resolve_config("step2", {}, {"kmeans_n_init": "AUTO"}).kmeans_n_init == "auto"
    assert resolve_config("step2", {"kmeans_n_init": 3}).kmeans_n_init == 3
    assert resolve_config("step2", {}, {"kmeans_n_init": "4"}).kmeans_n_init == 4
    for bad in ("0", "many", 2.5, True):
        with pytest.raises(UserError, match="'kmeans_n_init' must be int_or_auto") as err:
            resolve_config("step2", {"kmeans_n_init": bad})
        assert "\n" not in str(err.value)


def test_tau_schedules_match_the_original():
    s1, s2, s3 = (resolve_config(s, {}) for s in ("step1", "step2", "step3"))
    # step 1: target prototypes from epoch 20 with 1 - (e - 9)/100
    assert s1.tau_at(19) is None
    assert [round(s1.tau_at(e), 6) for e in (20, 30)] == [round(1 - (e - 9) / 100, 6) for e in (20, 30)]
    # step 2: original epochs 10..40 -> local 1..31, max(0.80, 1 - e/100)
    for local in range(1, 32):
        assert s2.tau_at(local) == pytest.approx(max(0.80, 1 - (local + 9) / 100))
    # step 3: original epochs 20..35 -> local 1..16, 1 - e/100
    for local in range(1, 17):
        assert s3.tau_at(local) == pytest.approx(1 - (local + 19) / 100)
    assert resolve_config("step0", {}).tau_at(5) is None


def test_every_option_is_a_flag(tmp_path):
    cfg_file = tmp_path / "pair.yaml"
    cfg_file.write_text("source: potsdam_rgb\nstep1:\n  epochs: 3\n")
    args = build_parser("step1").parse_args(["--config", str(cfg_file), "--gnce-windows", "2", "2", "2", "2",
                                             "1", "0", "--legacy-d2-gen", "--iters-per-epoch", "4"])
    cfg = config_from_args("step1", args)
    assert cfg.source == "potsdam_rgb" and cfg.epochs == 3 and cfg.iters_per_epoch == 4
    assert cfg.gnce_windows == (2, 2, 2, 2, 1, 0) and cfg.legacy_d2_gen is True
    unset = config_from_args("step1", build_parser("step1").parse_args(["--config", str(cfg_file), "--pretrained",
                                                                         "null", "--iters-per-epoch", "none"]))
    assert unset.pretrained is None and unset.iters_per_epoch is None
    flags = {a.dest for a in build_parser("step1")._actions}
    assert set(OPTIONS) <= flags


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_keeps_the_papers_step3_to_step2_learning_rate_ratio(config):
    """A top-level lr applies to every stage; step 3's own must then keep the paper's fifth of step 2's."""
    yaml = load_yaml(REPO / "configs" / config)
    paper = STAGES["step3"].defaults["lr"] / resolve_config("step2", {}).lr
    ratio = resolve_config("step3", yaml).lr / resolve_config("step2", yaml).lr
    assert ratio == pytest.approx(paper), (config, ratio)


@pytest.mark.parametrize("values", [{"window": 48, "img_size": 96, "resize": 96},
                                    {"window": 64, "img_size": 128, "resize": 96},
                                    {"window": 128, "img_size": 64, "resize": 128}])
def test_a_window_must_divide_the_crop_and_the_resized_patch(values):
    with pytest.raises(UserError, match="'window' must be a multiple of 32 that divides img_size and resize"):
        resolve_config("step0", values)
    resolve_config("step0", {"window": 64, "img_size": 128, "resize": 256})
