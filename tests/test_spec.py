"""ViTSpec checks its own types and ranges, so loading, extracting and counting refuse the same bad inputs."""

import json

import pytest
import timm

import hiap_core
from conftest import make_vit


@pytest.fixture
def saved(tmp_path):
    folder = hiap_core.save_pruned(hiap_core.extract(hiap_core.gate_vit(make_vit())), tmp_path / "model")
    return folder, json.loads((folder / "architecture.json").read_text())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 6, None),  # with the heads below: repeated indices
        ("global_pool", "max", "global_pool = 'max': must be one of token, avg"),
        ("act_approximate", "relu", "act_approximate = 'relu'"),
        ("norm_eps", "x", "norm_eps = 'x'"),
        ("embed_dim", 0, "embed_dim = 0: must be an int >= 1"),
        ("class_token", "yes", "class_token = 'yes': must be true or false"),
        ("img_size", [16, 10], "img_size = (16, 10): must be a multiple of patch_size"),
        ("patch_size", "4", "image and patch sizes must be an int or a pair of ints"),
    ],
)
def test_tampered_architecture_json_is_refused_in_one_line(saved, field, value, message):
    folder, arch = saved
    arch["spec"][field] = value
    if field == "num_heads":
        arch["spec"]["layers"][0]["heads"] = [0, 0, 0]
        message = "heads = (0, 0, 0): must be distinct head indices"
    (folder / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError) as err:
        hiap_core.load_pruned(folder)
    assert "\n" not in str(err.value) and "architecture.json is not a valid" in str(err.value) and message in str(err.value)


def test_layers_wider_than_the_dense_model_are_refused(saved):
    folder, arch = saved
    arch["spec"]["layers"][1]["value_dims"][0] = 99
    (folder / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match=r"layers\[1\].value_dims = .*must be <= head_dim \(8\)"):
        hiap_core.load_pruned(folder)


@pytest.mark.parametrize("img_size", [0, -16, 18, (16, 0), "big", 2.5])
def test_count_macs_refuses_an_image_size_that_is_not_a_positive_multiple_of_the_patch(img_size):
    with pytest.raises(ValueError) as err:
        hiap_core.count_macs(make_vit(), img_size=img_size)
    assert "\n" not in str(err.value)


def test_a_distilled_deit_is_refused_by_gate_vit_and_count_macs():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1)
    for call in (hiap_core.gate_vit, hiap_core.count_macs):
        with pytest.raises(TypeError, match="unsupported model: a distillation token"):
            call(model)
