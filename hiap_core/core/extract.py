"""Hardening and physical extraction of a gated ViT, and the one-call structure summary."""

from __future__ import annotations

import torch
from torch import nn

from .cost import layer_cost, spec_macs, unit_costs
from .describe import describe
from .gated_vit import gated_blocks
from .pruned import BiasOnly, LayerScale, PrunedViT, count_params
from .spec import ViTSpec


def copy_linear(dst: nn.Linear, src: nn.Linear, rows=None, cols=None) -> None:
    weight = src.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    dst.weight.copy_(weight)
    if dst.bias is not None:
        dst.bias.copy_(src.bias.detach() if rows is None else src.bias.detach()[rows])


def copy_norm(dst: nn.Module, src: nn.Module) -> None:
    if isinstance(dst, nn.LayerNorm):
        dst.load_state_dict(src.state_dict())


@torch.no_grad()
def pruned_shell(spec: ViTSpec, source: nn.Module) -> PrunedViT:
    """A `PrunedViT` of `spec` on `source`'s device and dtype, with the parts no pruning touches (patch
    embedding, tokens, position embedding, outer norms, classifier) copied from the timm ViT `source`;
    the blocks are left to the caller."""
    ref = next(source.parameters())
    model = PrunedViT(spec).to(device=ref.device, dtype=ref.dtype)
    model.patch_embed.proj.load_state_dict(source.patch_embed.proj.state_dict())
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, name) is not None:
            getattr(model, name).copy_(getattr(source, name))
    for name in ("norm_pre", "norm", "fc_norm"):
        copy_norm(getattr(model, name), getattr(source, name))
    if spec.num_classes:
        model.head.load_state_dict(source.head.state_dict())
    return model


@torch.no_grad()
def extract(gated: nn.Module) -> PrunedViT:
    """Harden the gates (`logit > 0`) and build the smaller plain model; numerically equivalent to
    `gated.eval()`. Dead heads and closed FFN blocks are removed; bias-only adds stay where a branch
    keeps no unit but its bias still reaches the residual stream."""
    blocks = gated_blocks(gated)
    spec = describe(gated)
    model = pruned_shell(spec, gated)

    H, Dh = spec.num_heads, spec.head_dim
    for dst, src, (attn, mlp), layer in zip(model.blocks, gated.blocks, blocks, spec.layers):
        keep = attn.hard_value_mask().cpu()  # indices on the CPU, whatever device the weights are on
        if dst.norm1 is not None:
            copy_norm(dst.norm1, src.norm1)
            heads = torch.tensor(layer.heads)
            qk_rows = (torch.arange(2)[:, None, None] * H * Dh + heads[None, :, None] * Dh + torch.arange(Dh)).reshape(-1)
            v_cols = torch.cat([h * Dh + keep[h].nonzero().flatten() for h in layer.heads])
            copy_linear(dst.attn.qkv, attn.qkv, rows=torch.cat([qk_rows, 2 * H * Dh + v_cols]))
            copy_linear(dst.attn.proj, attn.proj, cols=v_cols)
        elif isinstance(dst.attn, BiasOnly):
            dst.attn.bias.copy_(attn.proj.bias)
        if isinstance(dst.ls1, LayerScale):
            dst.ls1.gamma.copy_(src.ls1.gamma)
        if dst.norm2 is not None:
            copy_norm(dst.norm2, src.norm2)
            neurons = mlp.hard_neuron_mask().nonzero().flatten().cpu()
            copy_linear(dst.mlp.fc1, mlp.fc1, rows=neurons)
            copy_linear(dst.mlp.fc2, mlp.fc2, cols=neurons)
        elif isinstance(dst.mlp, BiasOnly):
            dst.mlp.bias.copy_(mlp.fc2.bias)
        if isinstance(dst.ls2, LayerScale):
            dst.ls2.gamma.copy_(src.ls2.gamma)
    return model.eval()


def structure_summary(model: nn.Module | ViTSpec):
    """Per layer: live heads (`head_ids`, ascending), value dims per head (in that order, as
    `architecture_plot` draws them), FFN on/off, live neurons, MACs (with and without the attention
    matmuls) and params; a last row `total` adds the static parts (patch embedding, head).
    A pandas DataFrame: pandas is imported here, so importing the core stays free of it."""
    import pandas as pd

    spec = model if isinstance(model, ViTSpec) else describe(model)
    with_mm, without_mm = unit_costs(spec, True), unit_costs(spec, False)
    layer_params = _layer_params(spec)
    rows = []
    for i, layer in enumerate(spec.layers):
        heads, dims, hidden = len(layer.heads), sum(layer.value_dims), layer.mlp_hidden or 0
        by_head = sorted(zip(layer.heads, layer.value_dims))
        rows.append(
            {
                "layer": str(i),
                "heads": heads,
                "head_ids": [h for h, _ in by_head],
                "value_dims": [w for _, w in by_head],
                "value_dims_total": dims,
                "ffn_on": layer.mlp_hidden is not None,
                "neurons": hidden,
                "macs": layer_cost(spec, layer, with_mm),
                "macs_no_attn_matmul": layer_cost(spec, layer, without_mm),
                "params": layer_params[i],
            }
        )
    table = pd.DataFrame(rows)
    total = {
        "layer": "total",
        "heads": int(table["heads"].sum()),
        "head_ids": "",
        "value_dims": "",
        "value_dims_total": int(table["value_dims_total"].sum()),
        "ffn_on": int(table["ffn_on"].sum()),
        "neurons": int(table["neurons"].sum()),
        "macs": spec_macs(spec, True),
        "macs_no_attn_matmul": spec_macs(spec, False),
        "params": count_params(spec),
    }
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def _layer_params(spec: ViTSpec) -> list[int]:
    with torch.device("meta"):
        model = PrunedViT(spec)
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks]
