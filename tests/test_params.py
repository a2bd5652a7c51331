"""What notebooks read from params.yaml (`hiap_core.train.params`): None is filled from the file, a value
papermill injected wins, and a key the file lacks is named, not read as an empty group."""

import pytest

from hiap_core.train.config import config_from_params
from hiap_core.train.models import build_dense_model
from hiap_core.train.pruning import make_pruner
from hiap_core.train.params import read_params, study_params
from hiap_core.train.profiles import PROFILES, merge
from hiap_core.train.runs import sweep_overrides


def test_none_is_read_from_params_yaml_and_an_injected_value_wins(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: {dataset: fashion_mnist}\nseeds: [0, 1]\nmodel: {depth: 6}\n")
    data, seeds, model = study_params(path, data=None, seeds=None, model={"depth": 2})
    assert data == {"dataset": "fashion_mnist"} and seeds == [0, 1] and model == {"depth": 2}


def test_a_group_the_file_lacks_is_an_error_naming_it(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: {}\n")
    with pytest.raises(KeyError, match="no sweep"):
        study_params(path, data=None, sweep=None)


def test_the_project_params_yaml_has_every_group_the_notebooks_read():
    from test_dvc import notebook_groups
    from test_pipeline import ROOT

    params = read_params()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert notebook_groups(notebook) <= set(params), notebook.name


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_every_sweep_ratio_can_reach_its_target(profile):
    """A ratio whose penalised gates cannot reach the sweep's target names its own (macro-only: heads alone
    stop at about 0.77 of dense); the pruner refuses the rest before training, so this catches it first."""
    params = read_params()
    if profile:
        merge(params, PROFILES[profile])
    for ratio in params["sweep"]["ratios"]:
        cfg = config_from_params(params, "hiap", {"teacher": "dense", **sweep_overrides(params, ratio)})
        model = build_dense_model(cfg)
        pruner = make_pruner(cfg, model, total_steps=10)
        assert pruner.budget.target == cfg.target_macs


def test_an_unknown_sweep_ratio_names_the_ones_there_are():
    with pytest.raises(KeyError, match="r2_1"):
        sweep_overrides(read_params(), "r3_1")
