import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from hypothesis import given, settings, strategies as st

import hiap_core
from conftest import TINY_VARIANTS, cifar_vit_tiny, gate_states, gated_copy, make_vit


@settings(max_examples=60)
@given(data=st.data())
def test_extracted_model_equals_hardened_gated_model_and_survives_save_load(data, tmp_path_factory):
    variant = data.draw(st.sampled_from(sorted(TINY_VARIANTS)))
    fused, padded = data.draw(st.booleans()), data.draw(st.booleans())
    gated = gated_copy(make_vit(**TINY_VARIANTS[variant]))
    hiap_core.set_gate_state(gated, data.draw(gate_states(depth=2, heads=3, head_dim=8, hidden=48)))
    pruned = hiap_core.extract(gated)
    hiap_core.set_fused_attention(pruned, fused)
    hiap_core.set_padded_attention(pruned, padded)  # the padded layout (one attention call per layer) agrees too
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        reference = gated(x)
        out = pruned(x)
        assert (out - reference).abs().max() <= 1e-5
        loaded = hiap_core.load_pruned(hiap_core.save_pruned(pruned, tmp_path_factory.mktemp("pruned")))
        hiap_core.set_fused_attention(loaded, fused)
        hiap_core.set_padded_attention(loaded, padded)
        assert torch.equal(loaded(x), out)
    assert not any(p.requires_grad is False for p in pruned.parameters())
    assert sum(p.numel() for p in pruned.parameters()) == hiap_core.count_params(hiap_core.describe(gated))


def test_extraction_of_cifar_vit_tiny_with_heterogeneous_widths():
    torch.manual_seed(0)
    gated = gated_copy(cifar_vit_tiny())
    state = [
        {
            "heads": torch.tensor([True, True, True]),
            "values": torch.rand(3, 64) < torch.tensor([[0.2], [0.5], [0.9]]),
            "neurons": torch.rand(768) < 0.4,
            "ffn": torch.tensor(layer != 5),
        }
        for layer in range(6)
    ]
    hiap_core.set_gate_state(gated, state)
    pruned = hiap_core.extract(gated)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (pruned(x) - gated(x)).abs().max() <= 1e-5
    assert pruned.blocks[5].mlp is None  # closed FFN block removed, bias included
    widths = [end - start for start, end in pruned.blocks[0].attn.value_columns]
    assert widths == sorted(widths) == list(pruned.spec.layers[0].value_dims)


def test_structure_summary_per_layer_and_totals():
    gated = gated_copy(cifar_vit_tiny())
    state = [{} for _ in range(6)]
    state[1] = {"heads": torch.tensor([True, False, True])}
    state[2] = {"ffn": torch.tensor(False)}
    state[3] = {"neurons": torch.arange(768) < 100}
    state[4] = {"values": torch.arange(64).expand(3, 64) < 16}
    hiap_core.set_gate_state(gated, state)
    table = hiap_core.structure_summary(gated)
    layers, total = table.iloc[:-1], table.iloc[-1]
    assert list(layers["heads"]) == [3, 2, 3, 3, 3, 3]
    assert list(layers["ffn_on"]) == [True, True, False, True, True, True]
    assert list(layers["neurons"]) == [768, 768, 0, 100, 768, 768]
    assert layers["value_dims"][4] == [16, 16, 16]
    pruned = hiap_core.extract(gated)
    assert total["layer"] == "total"
    assert total["macs"] == hiap_core.count_macs(pruned)
    assert total["macs_no_attn_matmul"] == hiap_core.count_macs(pruned, attention_matmuls=False)
    assert total["params"] == sum(p.numel() for p in pruned.parameters())
    assert layers["params"].sum() == sum(p.numel() for p in pruned.blocks.parameters())
    assert hiap_core.structure_summary(pruned).equals(table)
    dense = hiap_core.structure_summary(cifar_vit_tiny()).iloc[-1]
    assert dense["macs"] == 182_849_664 and dense["params"] == sum(p.numel() for p in cifar_vit_tiny().parameters())


def test_extract_keeps_dtype_and_device():
    gated = gated_copy(make_vit()).double()
    pruned = hiap_core.extract(gated)
    assert {p.dtype for p in pruned.parameters()} == {torch.float64}


def test_save_is_atomic_and_load_errors_are_clear(tmp_path):
    pruned = hiap_core.extract(gated_copy(make_vit()))
    folder = hiap_core.save_pruned(pruned, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["architecture.json", "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="save_pruned"):
        hiap_core.load_pruned(tmp_path / "missing")
    arch = json.loads((folder / "architecture.json").read_text())
    arch["spec"]["embed_dim"] = 32
    (folder / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="not the architecture .*model.safetensors was saved with"):
        hiap_core.load_pruned(folder)
    (folder / "architecture.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        hiap_core.load_pruned(folder)
    with pytest.raises(TypeError, match="PrunedViT"):
        hiap_core.save_pruned(make_vit(), tmp_path / "dense")


def test_load_pruned_needs_no_training_code(tmp_path):
    import subprocess
    import sys

    folder = hiap_core.save_pruned(hiap_core.extract(gated_copy(make_vit())), tmp_path / "m")
    code = (
        "import sys, torch; sys.modules['timm'] = None\n"  # any timm import would now fail
        "from hiap_core.core.pruned import load_pruned\n"
        f"m = load_pruned({str(folder)!r}); print(m(torch.zeros(1, 3, 16, 16)).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 5])" in result.stdout


def test_a_model_saved_by_the_first_format_loads_and_gives_its_saved_outputs():
    """tests/data/pruned_v1 was written by save_pruned at commit 2b2a6c8 (bias-only attention and FFN, value
    widths 3, 5, 5): however the forward is rewritten, saved models keep loading and computing the same."""
    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "pruned_v1"
    model = hiap_core.load_pruned(folder)
    saved = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(saved["images"]), saved["logits"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda spec: spec["layers"][0]["value_dims"].reverse(),  # same tensor shapes, other per-head widths
        lambda spec: spec.update(norm_eps=1e-5),
        lambda spec: spec.update(global_pool="avg" if spec["global_pool"] != "avg" else "token"),
    ],
    ids=["value_dims permuted", "norm_eps", "global_pool"],
)
def test_an_architecture_edited_to_the_same_shapes_is_refused(tmp_path, edit):
    """The weights' metadata hold the hash of the architecture they were saved with: an edit that keeps every
    tensor shape (and so loads) but changes the outputs is one line, not a silently different model."""
    gated = gated_copy(make_vit())
    attn = gated.blocks[0].attn
    attn.value_gate.logits.data[: attn.head_dim // 2] = -10.0  # head 0 keeps half its value dims, the others all
    folder = hiap_core.save_pruned(hiap_core.extract(gated), tmp_path / "m")
    arch = json.loads((folder / "architecture.json").read_text())
    assert len(set(arch["spec"]["layers"][0]["value_dims"])) > 1
    edit(arch["spec"])
    (folder / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="not the architecture") as err:
        hiap_core.load_pruned(folder)
    assert "\n" not in str(err.value)


def test_a_model_whose_weights_hash_entry_was_removed_is_refused(tmp_path):
    """Deleting `weights_sha256` from architecture.json and changing the weights loaded silently: the weights'
    metadata show the file was written with the entry, so its absence is refused (files older than both load)."""
    from safetensors.torch import load_file, save_file

    folder = hiap_core.save_pruned(hiap_core.extract(gated_copy(make_vit())), tmp_path / "m")
    arch = json.loads((folder / "architecture.json").read_text())
    del arch["weights_sha256"]
    (folder / "architecture.json").write_text(json.dumps(arch))
    weights = folder / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    tensors["head.bias"] = tensors["head.bias"] + 1.0
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match="has no weights_sha256 entry.*restore it or save the model again") as err:
        hiap_core.load_pruned(folder)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine loads onto cuda")
def test_loading_onto_cuda_without_a_gpu_says_so(tmp_path):
    folder = hiap_core.save_pruned(hiap_core.extract(gated_copy(make_vit())), tmp_path / "m")
    with pytest.raises(ValueError, match="no CUDA device; load on 'cpu'"):
        hiap_core.load_pruned(folder, map_location="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        hiap_core.load_pruned(folder, map_location="gpu0")


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 20, 20), (2, 3, 12, 12), (2, 1, 16, 16), (3, 16, 16), (2, 3, 16, 20)],
    ids=["larger", "smaller", "channels", "rank 3", "not square"],
)
def test_an_input_other_than_the_specs_is_refused_in_one_line(shape):
    """As timm's ViT: a larger image was accepted and its edge pixels dropped without a word; a 3-D input or an
    image the patches do not tile failed deep inside torch."""
    pruned = hiap_core.extract(gated_copy(make_vit()))
    with pytest.raises(ValueError, match=r"input of shape .*takes images of shape \(batch, 3, 16, 16\)") as err:
        pruned(torch.randn(*shape))
    assert "\n" not in str(err.value)
    assert pruned(torch.randn(2, 3, 16, 16)).shape == (2, 5)
