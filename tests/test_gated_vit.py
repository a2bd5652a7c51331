import pytest
import timm
import torch
from torch import nn

import hiap_core
from conftest import cifar_vit_tiny, gated_copy, make_vit

PAPER_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def test_all_open_gated_model_equals_source(tiny_variant):
    name, model = tiny_variant
    gated = gated_copy(model)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (gated(x) - model(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("name", PAPER_MODELS + ["cifar_vit_tiny"])
def test_all_open_equals_source_for_paper_models(name):
    torch.manual_seed(0)
    model = cifar_vit_tiny() if name == "cifar_vit_tiny" else timm.create_model(name, pretrained=False).eval()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        reference = model(x)
        assert (hiap_core.gate_vit(model).eval()(x) - reference).abs().max() <= 1e-6


def test_timm_state_dict_loads_unchanged_into_gated_model():
    source = make_vit(seed=1)
    gated = hiap_core.gate_vit(make_vit(seed=2)).eval()
    gated.load_state_dict(source.state_dict())  # strict: gate logits absent from a timm checkpoint
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(gated(x), source(x))
    # timm's parameter names are kept, and the gate logits are the only new ones
    extra = set(gated.state_dict()) - set(source.state_dict())
    assert extra and all(k.endswith("_gate.logits") for k in extra)
    assert set(source.state_dict()) <= set(gated.state_dict())


def test_gated_checkpoint_round_trip_keeps_gate_logits():
    gated = gated_copy(make_vit())
    with torch.no_grad():
        gated.blocks[0].attn.head_gate.logits.copy_(torch.tensor([1.0, -2.0, 3.0]))
    other = gated_copy(make_vit(seed=5))
    other.load_state_dict(gated.state_dict())
    assert other.blocks[0].attn.head_gate.logits.tolist() == [1.0, -2.0, 3.0]


def test_gradients_reach_every_gate_logit_and_every_weight():
    torch.manual_seed(0)
    gated = hiap_core.gate_vit(make_vit(), init_logit=3.0).train()
    out = gated(torch.randn(8, 3, 16, 16))
    nn.functional.cross_entropy(out, torch.randint(0, 5, (8,))).backward()
    missing = [n for n, p in gated.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_training_forward_samples_gates_and_eval_is_deterministic():
    torch.manual_seed(0)
    gated = hiap_core.gate_vit(make_vit(), init_logit=0.0).train()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(gated(x), gated(x))
        gated.eval()
        assert torch.equal(gated(x), gated(x))


def test_set_temperature_reaches_every_gate():
    gated = gated_copy(make_vit())
    hiap_core.set_temperature(gated, 0.7)
    taus = {g.tau for g in gated.modules() if isinstance(g, hiap_core.GumbelSigmoidGate)}
    assert taus == {0.7}
    with pytest.raises(ValueError, match="temperature"):
        hiap_core.set_temperature(gated, -1.0)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _ConvNet(),
        lambda: timm.create_model("resnet18", pretrained=False),
        lambda: make_vit(qk_norm=True),
        lambda: make_vit(global_pool="map"),
        lambda: make_vit(dynamic_img_size=True),
        lambda: make_vit(block_fn=timm.models.vision_transformer.ResPostBlock),
        lambda: make_vit(mlp_layer=timm.layers.SwiGLUPacked),
    ],
    ids=["plain_cnn", "resnet", "qk_norm", "map_pool", "dynamic_img_size", "res_post_block", "glu_mlp"],
)
def test_unsupported_models_raise_type_error_naming_what_is_supported(build):
    model = build()
    with pytest.raises(TypeError, match="hiap_core supports"):
        hiap_core.gate_vit(model)
    with pytest.raises(TypeError, match="hiap_core supports"):
        hiap_core.count_macs(model)


def test_inconsistent_gate_configuration_raises():
    with pytest.raises(ValueError, match="tau"):
        hiap_core.gate_vit(make_vit(), tau=-1.0)
    with pytest.raises(TypeError, match="unknown options"):
        hiap_core.gate_vit(make_vit(), temperature=1.0)
    gated = hiap_core.gate_vit(make_vit())
    with pytest.raises(ValueError, match="already gated"):
        hiap_core.gate_vit(gated)
    with pytest.raises(ValueError, match="layers"):
        hiap_core.set_gate_state(gated, [{}])
    with pytest.raises(ValueError, match="shape"):
        hiap_core.set_gate_state(gated, [{"heads": torch.ones(4, dtype=torch.bool)}, {}])
    with pytest.raises(ValueError, match="unknown keys"):
        hiap_core.set_gate_state(gated, [{"head": True}, {}])
    with pytest.raises(TypeError, match="gate_vit"):
        hiap_core.expected_macs(make_vit())
    with pytest.raises(TypeError, match="gate_vit"):
        hiap_core.extract(make_vit())


def test_set_and_read_hard_gate_state_round_trip():
    gated = gated_copy(make_vit())
    state = [
        {
            "heads": torch.tensor([True, False, True]),
            "values": torch.rand(3, 8) > 0.5,
            "ffn": torch.tensor(True),
            "neurons": torch.rand(48) > 0.5,
        },
        {
            "heads": torch.tensor([False, False, False]),
            "values": torch.ones(3, 8, dtype=torch.bool),
            "ffn": torch.tensor(False),
            "neurons": torch.ones(48, dtype=torch.bool),
        },
    ]
    hiap_core.set_gate_state(gated, state)
    for got, want in zip(hiap_core.hard_gate_state(gated), state):
        for key in want:
            assert torch.equal(got[key], want[key]), key
