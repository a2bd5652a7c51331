"""What notebooks read from params.yaml (`hiap_core.train.params`): None is filled from the file, a value
papermill injected wins, and a key the file lacks is named, not read as an empty group."""

import pytest

from hiap_core.train.params import read_params, study_params


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
