"""Configuration: one schema for params.yaml, one source of defaults, one-line errors for every bad input."""

import copy
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from hiap_core.train.config import (
    PARAMS_SCHEMA,
    ConfigError,
    DataConfig,
    HiAPConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check_params,
    config_from_params,
    load_params,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def one_line_error(params, method="dense", overrides=None) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_params(params, method, overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_dataclass_defaults_are_the_params_yaml_values():
    groups = [
        (DataConfig(), PARAMS["data"]),
        (ModelConfig(), PARAMS["model"]),
        (OptimConfig(), {**PARAMS["dense"], "gate_lr": PARAMS["hiap"]["gate_lr"]}),  # the default method's stage
        (HiAPConfig(), PARAMS["hiap"]),
        (RunConfig(), {"seed": PARAMS["dense"]["seed"], "target_macs": PARAMS["hiap"]["target_macs"]}),
    ]
    for defaults, group in groups:
        plain = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name in group}
        assert plain == {name: group[name] for name in plain}, type(defaults).__name__
    assert config_from_params({}, "dense") == config_from_params(ROOT / "params.yaml", "dense")  # an empty file: the study's


@pytest.mark.parametrize(
    "group, key, suggestion",
    [
        ("dense", "epochz", "dense.epochs"),
        ("hiap", "lambda_macr", "hiap.lambda_macro"),
        ("baselines", "method", "baselines.methods"),
        ("model", "patchsize", "model.patch_size"),
        ("data", "dataste", "data.dataset"),
        ("sweep", "train_subst", "sweep.train_subset"),
        ("bench", "thread", "bench.threads"),
    ],
)
def test_a_typo_anywhere_in_params_is_refused_with_the_closest_name(group, key, suggestion):
    params = {**PARAMS, group: {**PARAMS[group], key: 1}}
    assert f"unknown key {group}.{key}: did you mean {suggestion}?" in one_line_error(params)


def test_nested_and_top_level_typos_and_groups_that_are_not_mappings():
    ratios = {**PARAMS["sweep"]["ratios"], "r2_1": {"lambda_macro": 0.3, "lambda_micr": 0.1}}
    assert "sweep.ratios.r2_1.lambda_micr: did you mean" in one_line_error(
        {**PARAMS, "sweep": {**PARAMS["sweep"], "ratios": ratios}}
    )
    assert "unknown key baseline: did you mean baselines?" in one_line_error({**PARAMS, "baseline": {}})
    assert "dense must be a mapping" in one_line_error({**PARAMS, "dense": [1, 2]})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data: [1,\nmodel: {}\n", "params.yaml:3:1: malformed YAML"),  # file, line, column
        ("dense:\n  epochs: 1\n   lr: 2\n", "params.yaml:3:"),
        ("- data\n- model\n", "must be a mapping of groups"),
        ("just text\n", "must be a mapping of groups"),
        ("", "is empty: it needs the groups"),
        ("# nothing but a comment\n", "is empty: it needs the groups"),
        # a duplicate silently replaced the first (PyYAML keeps the last; DVC refuses the file)
        ("data: {}\nmodel: {}\ndata: {}\n", "params.yaml:3:1: malformed YAML: duplicate key 'data' (first at line 1)"),
        ("dense:\n  epochs: 1\n  lr: 2\n  epochs: 3\n", "params.yaml:4:3: malformed YAML: duplicate key 'epochs' (first at"),
    ],
)
def test_malformed_params_file_is_one_line_with_its_place(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert expected in one_line_error(path)


def test_every_number_float_parses_is_accepted_in_params_and_overrides():
    params = {**PARAMS, "dense": {**PARAMS["dense"], "lr": "1e-3", "epochs": "3", "batch_size": 64.0}}
    cfg = config_from_params(params, "dense", ["optim.min_lr=1e-6"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.min_lr) == (1e-3, 3, 64, 1e-6)
    assert config_from_params(params, "hiap", ["teacher=t", "hiap.tau0=2E0"]).hiap.tau0 == 2.0
    assert type(cfg.optim.epochs) is int and type(cfg.optim.batch_size) is int
    assert "optim.lr = nan: must be finite" in one_line_error(params, overrides=["optim.lr=nan"])
    assert "optim.epochs = 2.5" in one_line_error(params, overrides=["optim.epochs=2.5"])


def test_stage_group_names_work_on_the_command_line_for_the_runs_own_stage():
    cfg = config_from_params(PARAMS, "dense", ["dense.epochs=1", "dense.train_subset=64"])
    assert cfg.optim.epochs == 1 and cfg.data.train_subset == 64
    hiap = config_from_params(PARAMS, "hiap", ["teacher=t", "hiap.epochs=3", "hiap.lambda_macro=1"])
    assert hiap.optim.epochs == 3 and hiap.hiap.lambda_macro == 1
    assert "method hiap reads the hiap group: set optim.epochs" in one_line_error(PARAMS, "hiap", ["teacher=t", "dense.epochs=1"])
    assert "unknown field 'dense.epochz': did you mean dense.epochs?" in one_line_error(PARAMS, "dense", ["dense.epochz=1"])
    assert "unknown section 'optm.lr': did you mean optim?" in one_line_error(PARAMS, "dense", ["optm.lr=1"])
    assert "not a YAML value" in one_line_error(PARAMS, "dense", ["optim.lr=[1"])


def test_gate_settings_set_on_a_run_that_trains_no_gates_are_refused():
    """`--set hiap.lambda_macro=9` on a uniform run was ignored without a word."""
    for method, override in [
        ("uniform", "hiap.lambda_macro=9"),
        ("dense", "optim.gate_lr=0.5"),
        ("transplant", "hiap.init_logit=1"),
        ("uniform", "optim.macro_gate_lr_scale=0.5"),
    ]:
        message = one_line_error(PARAMS, method, ["teacher=t", "structure=s", override])
        assert f"{override.partition('=')[0]} set on a {method} run, which trains no gates" in message
    kd = config_from_params(PARAMS, "uniform", {"teacher": "t", "target_macs": 0.5, "hiap.kd_alpha": 0.3})
    assert kd.hiap.kd_alpha == 0.3  # the distillation settings are every distilled run's


@pytest.mark.parametrize(
    "field, value",
    [
        ("model.embed_dim", 0),
        ("model.embed_dim", -192),
        ("model.img_size", 0),
        ("model.in_chans", 0),
        ("model.in_chans", 3),  # Fashion-MNIST is grey
        ("model.img_size", 35),  # ... and 28 pixels
    ],
)
def test_model_shapes_below_one_or_unlike_the_data_are_refused(field, value):
    assert f"{field} = {value}" in one_line_error(PARAMS, overrides={field: value})


GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1e-3", "nan", "-inf", "1_000", " 7 ", "0x10", "true", "hub", "custom", "latency", "soft"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
RUN_GROUPS = ("data", "model", "dense", "hiap", "baselines")
FIELDS = [(group, key) for group in RUN_GROUPS for key in PARAMS_SCHEMA[group]]


@settings(max_examples=300)
@given(st.sampled_from(FIELDS), GARBAGE, st.sampled_from(["dense", "hiap", "uniform", "finetune"]))
def test_garbage_in_any_params_field_is_a_one_line_error_or_a_valid_config(field, value, method):
    group, key = field
    params = {**PARAMS, group: {**PARAMS[group], key: value}}
    try:
        cfg = config_from_params(params, method, {"teacher": "t", "target_macs": 0.5})
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("invalid ")
    else:
        assert cfg.validate() is cfg


@pytest.mark.parametrize("module", ["hiap_core.measure.bench", "hiap_core.measure.cost_table"])
def test_measuring_commands_report_a_malformed_params_file_in_one_line(module, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("bench: {threads: [2\n")
    run = subprocess.run([sys.executable, "-m", module, "--params", str(params)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith("error: ") and "params.yaml:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda p: p.update(seeds=[]), "seeds"),
        (lambda p: p.update(seeds=[0, 0]), "seeds"),
        (lambda p: p.update(seeds="abc"), "seeds"),
        (lambda p: p.update(budgets={}), "budgets"),
        (lambda p: p["budgets"].update(light={"target_macs": 1.5}), "budgets"),
        (lambda p: p["ablation"].update(budget="moderat"), "ablation.budget"),
        (lambda p: p["recipe_grid"].update(lr=[]), "recipe_grid.lr"),
        (lambda p: p["recipe_grid"].update(lr=[-1e-4]), "recipe_grid.lr"),
        (lambda p: p["recipe_grid"].update(budgets=["nowhere"]), "recipe_grid.budgets"),
        (lambda p: p["baselines"]["reach"].update(uniform=["nowhere"]), "baselines.reach"),
        (lambda p: p["baselines"]["reach"].pop("l1_ffn"), "baselines.reach"),
        (lambda p: p["comparisons"].update(primary=["uniformm"]), "comparisons.primary"),
        (lambda p: p["recipes"].update(hiap=[{"macs": 0.5, "lr": 0.0, "warmup": 0.0}]), "recipes.hiap"),
    ],
)
def test_the_study_groups_are_checked_before_any_stage_runs(edit, field):
    params = copy.deepcopy(load_params(ROOT / "params.yaml"))
    edit(params)
    with pytest.raises(ConfigError, match=f"invalid params: {re.escape(field)}:"):
        check_params(params)
