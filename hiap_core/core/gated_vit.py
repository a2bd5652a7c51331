"""Gated drop-ins for timm's `Attention` and `Mlp` (hiap_core/DESIGN.md, "Where the gates act"), and
`check_vit`: which timm ViTs hiap_core can gate, count and extract exactly.

The drop-ins adopt the timm module's own sub-modules (`qkv`, `proj`, `fc1`, `fc2`, ...), so parameter
names do not change and a timm state dict loads into a gated model unchanged. Four gate families per
block: `attn.head_gate` (macro), `attn.value_gate` (micro, heads * head_dim), `mlp.block_gate`
(macro, one unit), `mlp.neuron_gate` (micro).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .gates import GumbelSigmoidGate

SUPPORTED = (
    "a timm VisionTransformer with standard pre-norm `Block`s (timm `Attention` without qk_norm, "
    "scale_norm or attention gate; timm `Mlp` with nn.GELU), a Conv2d patch embedding with learned "
    "absolute position embeddings at a fixed image size, LayerNorm norms and 'token' or 'avg' pooling "
    "(e.g. deit_tiny/small_patch16_224, vit_small/base_patch16_224)"
)


class GatedAttention(nn.Module):
    """`o_h = g[h] * softmax(q_h k_h^T * scale) (v_h * d[h, :])`; Q and K keep the full head dim."""

    def __init__(self, attn: nn.Module, init_logit: float, tau: float):
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim, self.scale, self.fused_attn = attn.attn_dim, attn.scale, attn.fused_attn
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm, self.proj, self.proj_drop = attn.attn_drop, attn.norm, attn.proj, attn.proj_drop
        device = self.qkv.weight.device  # gates live beside the weights they scale (fp32 whatever their dtype)
        self.head_gate = GumbelSigmoidGate(self.num_heads, init_logit, tau).to(device)
        self.value_gate = GumbelSigmoidGate(self.num_heads * self.head_dim, init_logit, tau).to(device)

    def value_mask(self) -> torch.Tensor:
        """(heads, head_dim) multiplier of the value path: sampled in training, hard in eval."""
        return self.head_gate()[:, None] * self.value_gate().view(self.num_heads, self.head_dim)

    def hard_value_mask(self) -> torch.Tensor:
        """Hardened (heads, head_dim) bool mask; a head whose every value dim is closed is dead."""
        return self.head_gate.hard()[:, None] & self.value_gate.hard().view(self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        B, N, _ = x.shape
        # Gating the V rows of the qkv weight equals gating v itself, at a fraction of the cost.
        rows = torch.cat([self.qkv.weight.new_ones(2 * self.attn_dim), self.value_mask().reshape(-1).to(self.qkv.weight.dtype)])
        bias = None if self.qkv.bias is None else self.qkv.bias * rows
        qkv = F.linear(x, self.qkv.weight * rows[:, None], bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


class GatedMlp(nn.Module):
    """`y = b * ((act(x W1 + b1) * c) W2 + b2)`: a closed block gate removes the FFN, bias included."""

    def __init__(self, mlp: nn.Module, init_logit: float, tau: float):
        super().__init__()
        self.fc1, self.act, self.drop1, self.norm = mlp.fc1, mlp.act, mlp.drop1, mlp.norm
        self.fc2, self.drop2 = mlp.fc2, mlp.drop2
        device = self.fc1.weight.device
        self.block_gate = GumbelSigmoidGate(1, init_logit, tau).to(device)
        self.neuron_gate = GumbelSigmoidGate(self.fc1.out_features, init_logit, tau).to(device)

    def hard_block_open(self) -> bool:
        return bool(self.block_gate.hard()[0])

    def hard_neuron_mask(self) -> torch.Tensor:
        return self.neuron_gate.hard()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.drop1(self.act(self.fc1(x))))
        # Gating fc2's weight columns (and its bias by the block gate) equals gating the activations, cheaper.
        block = self.block_gate().to(h.dtype)
        columns = block * self.neuron_gate().to(h.dtype)
        bias = None if self.fc2.bias is None else self.fc2.bias * block
        return self.drop2(F.linear(h, self.fc2.weight * columns, bias))


def _unsupported(what: str) -> TypeError:
    return TypeError(f"unsupported model: {what}. hiap_core supports {SUPPORTED}.")


def _layernorm_eps(module: nn.Module, what: str) -> float | None:
    if isinstance(module, nn.Identity):
        return None
    if type(module).__name__ == "LayerNorm" and isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return module.eps
    raise _unsupported(f"{what} is {type(module).__name__}, expected LayerNorm or Identity")


def check_vit(model: nn.Module) -> None:
    """Raise TypeError unless `model` is a timm ViT (dense or gated) that hiap_core can gate and extract."""
    # timm is imported where it is used, so that the core (load_pruned above all) imports without it
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise _unsupported(f"got {type(model).__name__}")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or not pe.flatten or not isinstance(pe.norm, nn.Identity):
        raise _unsupported("the patch embedding is not a plain timm PatchEmbed (Conv2d, flatten, no norm)")
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False) or not pe.strict_img_size:
        raise _unsupported("dynamic image size is not supported (MACs depend on a fixed token count)")
    if model.pos_embed is None:
        raise _unsupported("the model has no learned absolute position embedding")
    prefix = int(model.cls_token is not None) + (0 if model.reg_token is None else model.reg_token.shape[1])
    if getattr(model, "dist_token", None) is not None or model.num_prefix_tokens != prefix:
        raise _unsupported("a distillation token (or other extra prefix token): its cost and extraction are not modelled")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise _unsupported(f"global_pool={model.global_pool!r}")
    if getattr(model, "pool_include_prefix", False):
        raise _unsupported("pool_include_prefix=True")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise _unsupported(f"the classifier head is {type(model.head).__name__}")
    eps = {_layernorm_eps(m, n) for n, m in (("norm_pre", model.norm_pre), ("norm", model.norm), ("fc_norm", model.fc_norm))}
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise _unsupported(f"block {i} is {type(blk).__name__}, expected timm Block")
        attn, mlp = blk.attn, blk.mlp
        if not isinstance(attn, GatedAttention):
            if type(attn) is not Attention:
                raise _unsupported(f"block {i} attention is {type(attn).__name__}, expected timm Attention")
            if not (
                isinstance(attn.q_norm, nn.Identity)
                and isinstance(attn.k_norm, nn.Identity)
                and isinstance(attn.norm, nn.Identity)
            ):
                raise _unsupported(f"block {i} attention uses qk_norm or scale_norm")
            if getattr(attn, "gate", None) is not None:
                raise _unsupported(f"block {i} attention has an output gate (gated=True)")
        if not isinstance(mlp, GatedMlp):
            if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
                raise _unsupported(f"block {i} MLP is {type(mlp).__name__}, expected timm Mlp with Linear layers")
            if not isinstance(mlp.norm, nn.Identity):
                raise _unsupported(f"block {i} MLP uses scale_mlp_norm")
        if type(mlp.act) is not nn.GELU:
            raise _unsupported(f"block {i} MLP activation is {type(mlp.act).__name__}, expected nn.GELU")
        eps |= {_layernorm_eps(blk.norm1, f"block {i} norm1"), _layernorm_eps(blk.norm2, f"block {i} norm2")}
    eps.discard(None)
    if len(eps) > 1:
        raise _unsupported(f"LayerNorms use different eps values {sorted(eps)}")


@dataclass(frozen=True)
class GateConfig:
    """How gates are created. `init_logit` > 0 starts every unit open (p = sigmoid(init_logit))."""

    init_logit: float = 3.0
    tau: float = 2.0

    def __post_init__(self):
        if not math.isfinite(self.init_logit):
            raise ValueError(f"init_logit must be finite, got {self.init_logit}")
        if not math.isfinite(self.tau) or self.tau <= 0:
            raise ValueError(f"tau (gate temperature) must be a finite number > 0, got {self.tau}")


def gate_vit(model: nn.Module, **cfg) -> nn.Module:
    """Replace every `Attention`/`Mlp` of a timm ViT with gated drop-ins, in place; returns the model.

    Keyword arguments are `GateConfig` fields (`init_logit`, `tau`). Parameters are shared with the
    source modules, not copied: gate a `copy.deepcopy` if the dense model must stay dense (teacher).
    """
    unknown = set(cfg) - set(GateConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"gate_vit got unknown options {sorted(unknown)}; valid: {sorted(GateConfig.__dataclass_fields__)}")
    config = GateConfig(**{k: float(v) for k, v in cfg.items()})
    check_vit(model)
    if is_gated(model):
        raise ValueError("gate_vit: the model is already gated")
    for blk in model.blocks:
        blk.attn = GatedAttention(blk.attn, config.init_logit, config.tau)
        blk.mlp = GatedMlp(blk.mlp, config.init_logit, config.tau)
    return model


def is_gated(model: nn.Module) -> bool:
    return any(isinstance(m, (GatedAttention, GatedMlp)) for m in model.modules())


def gated_blocks(model: nn.Module) -> list[tuple[GatedAttention, GatedMlp]]:
    """(attention, mlp) drop-ins of each block, in depth order; TypeError if the model is not gated."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(b.attn, GatedAttention) and isinstance(b.mlp, GatedMlp) for b in blocks):
        raise TypeError("expected a model returned by hiap_core.gate_vit (every block gated)")
    return [(b.attn, b.mlp) for b in blocks]


def gates(model: nn.Module) -> list[GumbelSigmoidGate]:
    return [m for m in model.modules() if isinstance(m, GumbelSigmoidGate)]


def set_temperature(model: nn.Module, tau: float) -> None:
    for gate in gates(model):
        gate.tau = tau


GATE_FORWARDS = ("hard", "soft")


def set_gate_forward(model: nn.Module, forward: str) -> None:
    """`hard`: the 0/1 sample with a straight-through gradient; `soft`: the relaxed sample itself."""
    if forward not in GATE_FORWARDS:
        raise ValueError(f"gate forward must be one of {', '.join(GATE_FORWARDS)}, got {forward!r}")
    for gate in gates(model):
        gate.soft = forward == "soft"


@torch.no_grad()
def freeze_gates(model: nn.Module, magnitude: float = 10.0) -> None:
    """End the structure search: every gate keeps its hardened state (logits set to +-magnitude, no
    gradient) and acts hard and deterministic in training too."""
    set_gate_state(model, hard_gate_state(model), magnitude)
    for gate in gates(model):
        gate.frozen = True
        gate.logits.requires_grad_(False)


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The gate logits (optimised with their own learning rate and no weight decay)."""
    return [g.logits for g in gates(model)]


def macro_gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The macro gates' logits: each layer's head gate and FFN block gate."""
    return [gate.logits for attn, mlp in gated_blocks(model) for gate in (attn.head_gate, mlp.block_gate)]


@torch.no_grad()
def set_gate_state(model: nn.Module, state: list[dict], magnitude: float = 10.0) -> None:
    """Set logits to +-magnitude so the hardened state equals `state`.

    `state[l]` holds bool tensors `heads` (H,), `values` (H, head_dim), `ffn` (scalar), `neurons` (hidden,);
    a missing key keeps that family fully open. Used by baselines and tests.
    """
    if not math.isfinite(magnitude) or magnitude <= 0:
        raise ValueError(f"magnitude must be a finite number > 0, got {magnitude}")
    blocks = gated_blocks(model)
    if len(state) != len(blocks):
        raise ValueError(f"gate state has {len(state)} layers but the model has {len(blocks)}")
    for i, ((attn, mlp), layer) in enumerate(zip(blocks, state)):
        unknown = set(layer) - {"heads", "values", "ffn", "neurons"}
        if unknown:
            raise ValueError(f"gate state layer {i}: unknown keys {sorted(unknown)}")
        targets = (
            (attn.head_gate, "heads", (attn.num_heads,)),
            (attn.value_gate, "values", (attn.num_heads, attn.head_dim)),
            (mlp.block_gate, "ffn", ()),
            (mlp.neuron_gate, "neurons", (mlp.fc1.out_features,)),
        )
        for gate, key, shape in targets:
            mask = torch.as_tensor(layer.get(key, True), dtype=torch.bool)
            if mask.dim() == 0 and key != "ffn":
                mask = mask.expand(shape)
            if tuple(mask.shape) != shape:
                raise ValueError(f"gate state layer {i} '{key}' has shape {tuple(mask.shape)}, expected {shape}")
            gate.logits.copy_(torch.where(mask.reshape(-1), magnitude, -magnitude))


def hard_gate_state(model: nn.Module) -> list[dict]:
    """The hardened gates per layer (same keys as `set_gate_state`), for logging and tests."""
    return [
        {
            "heads": attn.head_gate.hard().clone(),
            "values": attn.value_gate.hard().view(attn.num_heads, attn.head_dim).clone(),
            "ffn": mlp.block_gate.hard()[0].clone(),
            "neurons": mlp.neuron_gate.hard().clone(),
        }
        for attn, mlp in gated_blocks(model)
    ]
