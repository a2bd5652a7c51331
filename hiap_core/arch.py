"""`ViTSpec`: the one description of a (pruned) ViT's shape that costs, summaries and the saved
architecture JSON are computed from. `describe()` reads it off a dense timm ViT, a gated ViT (its
hardened gates) or an extracted `PrunedViT`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = (
    "a timm VisionTransformer with standard pre-norm `Block`s (timm `Attention` without qk_norm, "
    "scale_norm or attention gate; timm `Mlp` with nn.GELU), a Conv2d patch embedding with learned "
    "absolute position embeddings at a fixed image size, LayerNorm norms and 'token' or 'avg' pooling "
    "(e.g. deit_tiny/small_patch16_224, vit_small/base_patch16_224)"
)


@dataclass(frozen=True)
class LayerSpec:
    heads: tuple[int, ...]  # original indices of the live heads, in stored order
    value_dims: tuple[int, ...]  # value width of each live head (Q/K keep the full head_dim)
    mlp_hidden: int | None  # live FFN neurons; None: the FFN block is removed (no bias either)

    def __post_init__(self):
        if len(self.heads) != len(self.value_dims):
            raise ValueError("LayerSpec: heads and value_dims must have the same length")
        if any(w < 1 for w in self.value_dims):
            raise ValueError("LayerSpec: a live head needs at least one value dim")
        if self.mlp_hidden is not None and self.mlp_hidden < 0:
            raise ValueError("LayerSpec: mlp_hidden must be >= 0 or None")


@dataclass(frozen=True)
class ViTSpec:
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    embed_dim: int
    num_heads: int  # dense heads per layer
    head_dim: int
    mlp_hidden_dense: int
    num_classes: int  # 0: no classifier (head is Identity)
    layers: tuple[LayerSpec, ...]
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    norm_eps: float = 1e-6
    act_approximate: str = "none"  # nn.GELU(approximate=...)
    patch_bias: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    fc1_bias: bool = True
    fc2_bias: bool = True
    layer_scale: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def dense(self) -> ViTSpec:
        """The same model with every unit kept."""
        full = LayerSpec(tuple(range(self.num_heads)), (self.head_dim,) * self.num_heads, self.mlp_hidden_dense)
        return dataclasses.replace(self, layers=(full,) * len(self.layers))

    def with_img_size(self, img_size) -> ViTSpec:
        size = _pair(img_size)
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {size} is not a multiple of the patch size {self.patch_size}")
        return dataclasses.replace(self, img_size=size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTSpec:
        data = dict(data)
        layers = tuple(
            LayerSpec(tuple(layer["heads"]), tuple(layer["value_dims"]), layer["mlp_hidden"]) for layer in data.pop("layers")
        )
        for key in ("img_size", "patch_size"):
            data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}: was this saved by a newer hiap_core?")
        return cls(layers=layers, **data)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


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
    from timm.layers import Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    from .gated_vit import GatedAttention, GatedMlp

    if not isinstance(model, VisionTransformer):
        raise _unsupported(f"got {type(model).__name__}")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or not pe.flatten or not isinstance(pe.norm, nn.Identity):
        raise _unsupported("the patch embedding is not a plain timm PatchEmbed (Conv2d, flatten, no norm)")
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False) or not pe.strict_img_size:
        raise _unsupported("dynamic image size is not supported (MACs depend on a fixed token count)")
    if model.pos_embed is None:
        raise _unsupported("the model has no learned absolute position embedding")
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
            if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity) and isinstance(attn.norm, nn.Identity)):
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


def describe(model: nn.Module) -> ViTSpec:
    """The architecture of a dense timm ViT, a gated ViT in its hardened state, or a `PrunedViT`."""
    from .gated_vit import GatedAttention, GatedMlp
    from .pruned import PrunedViT

    if isinstance(model, PrunedViT):
        return model.spec
    check_vit(model)
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
        img_size=_pair(model.patch_embed.img_size),
        patch_size=_pair(model.patch_embed.patch_size),
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
    """Order live heads by value width so heads of equal width sit next to each other (one matmul each)."""
    order = sorted(range(len(heads)), key=lambda i: (widths[i], heads[i]))
    return tuple(heads[i] for i in order), tuple(widths[i] for i in order)


def count_params(spec: ViTSpec) -> int:
    """Parameters of the plain model this spec describes (built on the meta device: no memory, no copy)."""
    from .pruned import PrunedViT

    with torch.device("meta"):
        return sum(p.numel() for p in PrunedViT(spec).parameters())
