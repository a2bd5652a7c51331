"""`describe`: the `ViTSpec` of a dense timm ViT, a gated ViT (its hardened gates) or an extracted `PrunedViT`."""

from __future__ import annotations

from torch import nn

from .gated_vit import GatedAttention, GatedMlp, check_vit
from .pruned import PrunedViT, check_has_values
from .spec import LayerSpec, ViTSpec, to_pair


def describe(model: nn.Module) -> ViTSpec:
    """The architecture of a dense timm ViT, a gated ViT in its hardened state, or a `PrunedViT`."""
    if isinstance(model, PrunedViT):
        return model.spec
    check_vit(model)
    if any(isinstance(blk.attn, GatedAttention) or isinstance(blk.mlp, GatedMlp) for blk in model.blocks):
        check_has_values(model, "the gated model's structure")  # the hardened structure is read from the gate logits' values
    first = model.blocks[0]
    num_heads, head_dim = first.attn.num_heads, first.attn.head_dim
    layers = []
    for blk in model.blocks:
        if isinstance(blk.attn, GatedAttention):
            keep = blk.attn.hard_value_mask()  # (heads, head_dim), dead heads all False
            live = [h for h in range(num_heads) if keep[h].any()]
            heads, widths = _sort_by_width(live, [int(keep[h].sum()) for h in live])
        else:
            heads, widths = tuple(range(num_heads)), (head_dim,) * num_heads
        if isinstance(blk.mlp, GatedMlp):
            hidden = int(blk.mlp.hard_neuron_mask().sum()) if blk.mlp.hard_block_open() else None
        else:
            hidden = blk.mlp.fc1.out_features
        layers.append(LayerSpec(heads, widths, hidden))
    norms = [m for m in (model.norm, model.norm_pre, model.fc_norm, first.norm1) if isinstance(m, nn.LayerNorm)]
    return ViTSpec(
        img_size=to_pair(model.patch_embed.img_size),
        patch_size=to_pair(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        embed_dim=model.embed_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        mlp_hidden_dense=first.mlp.fc1.out_features,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        layers=tuple(layers),
        class_token=model.cls_token is not None,
        reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        no_embed_class=bool(model.no_embed_class),
        global_pool=model.global_pool,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        norm_eps=norms[0].eps if norms else 1e-6,
        act_approximate=first.mlp.act.approximate,
        patch_bias=model.patch_embed.proj.bias is not None,
        qkv_bias=first.attn.qkv.bias is not None,
        proj_bias=first.attn.proj.bias is not None,
        fc1_bias=first.mlp.fc1.bias is not None,
        fc2_bias=first.mlp.fc2.bias is not None,
        layer_scale=not isinstance(first.ls1, nn.Identity),
    )


def _sort_by_width(heads: list[int], widths: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Order live heads by value width, as saved `architecture.json` files have them: equal structures, equal specs."""
    order = sorted(range(len(heads)), key=lambda i: (widths[i], heads[i]))
    return tuple(heads[i] for i in order), tuple(widths[i] for i in order)
