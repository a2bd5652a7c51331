import copy
import os

import hiap_core  # noqa: I001  (first: makes torchvision, hence timm, importable)

import pytest
import timm
import torch
from hypothesis import settings, strategies as st

# `make test` runs pytest-xdist workers side by side: each takes its share of the cores, not all of them
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The longest files, longest first (measured: pytest --durations): xdist hands each worker whole files in this
# order (`--no-loadscope-reorder`: by default it queues files by their number of tests), so one worker starts
# the smoke `dvc repro` (about 6 min) at once and the others take the long files while it runs. A long file
# queued behind the smoke run would run after it, on the critical path.
LONGEST_FILES = ("test_pipeline.py", "test_train.py", "test_dvc.py", "test_gpu_bench.py", "test_inference.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("ci")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Small ViTs covering every supported variant: class token / avg pooling, register tokens,
# no_embed_class, layer scale, fc_norm, pre-norm, biases off.
TINY_VARIANTS = {
    "cls_token": dict(),
    "avg_pool_no_cls": dict(class_token=False, global_pool="avg"),
    "reg_tokens_layerscale_fcnorm": dict(reg_tokens=2, no_embed_class=True, init_values=0.5, global_pool="avg", fc_norm=True),
    "pre_norm_no_qkv_bias": dict(pre_norm=True, qkv_bias=False),
}


# The model section of the tiny Fashion-MNIST runs' params (a 2-layer ViT on 28x28 images).
TINY_FASHION_MODEL = {
    "name": "custom",
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "num_classes": 10,
}


def make_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A small randomly initialised timm ViT with non-trivial biases, norms and embeddings."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def cifar_vit_tiny() -> torch.nn.Module:
    return hiap_core.cifar_vit_tiny().eval()


def gated_copy(model, **cfg):
    return hiap_core.gate_vit(copy.deepcopy(model), **cfg).eval()


@st.composite
def gate_states(draw, depth: int, heads: int, head_dim: int, hidden: int):
    """Hardened gate states mixing the edge cases: every head closed, a head with one value dim, a head
    with every value dim closed, FFN block closed, FFN open with every neuron closed, all open."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def mask(shape, p_open):
        return torch.rand(shape, generator=gen) < p_open

    state = []
    for _ in range(depth):
        head_mode = draw(st.sampled_from(["random", "all_open", "all_closed"]))
        head_mask = {
            "random": mask(heads, 0.6),
            "all_open": torch.ones(heads, dtype=torch.bool),
            "all_closed": torch.zeros(heads, dtype=torch.bool),
        }[head_mode]
        values = torch.zeros(heads, head_dim, dtype=torch.bool)
        for h in range(heads):
            mode = draw(st.sampled_from(["random", "one", "none", "all"]))
            if mode == "random":
                values[h] = mask(head_dim, draw(st.floats(0.1, 0.9)))
            elif mode == "one":
                values[h, draw(st.integers(0, head_dim - 1))] = True
            elif mode == "all":
                values[h] = True
        ffn_mode = draw(st.sampled_from(["random", "all_open", "closed", "open_no_neurons"]))
        neurons = {"random": mask(hidden, draw(st.floats(0.05, 0.95))), "all_open": torch.ones(hidden, dtype=torch.bool)}.get(
            ffn_mode, torch.zeros(hidden, dtype=torch.bool)
        )
        state.append({"heads": head_mask, "values": values, "ffn": torch.tensor(ffn_mode != "closed"), "neurons": neurons})
    return state


def flop_counter_macs(model, img_size, in_chans=3) -> int:
    """Independent count: FlopCounterMode total / 2 on one image, explicit attention matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    hiap_core.set_fused_attention(model, False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, in_chans, *img_size))
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_variant(request):
    return request.param, make_vit(**TINY_VARIANTS[request.param])
