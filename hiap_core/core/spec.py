"""`ViTSpec`: the one description of a (pruned) ViT's shape that costs, summaries and the saved
architecture JSON are computed from (`describe.describe` reads it off a model). Plain data: no torch
modules, so every other core module can stand on it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSpec:
    heads: tuple[int, ...]  # original indices of the live heads, in stored order
    value_dims: tuple[int, ...]  # value width of each live head (Q/K keep the full head_dim)
    mlp_hidden: int | None  # live FFN neurons; None: the FFN block is removed (no bias either)
    qk_dim: int | None = None  # Q/K width of every head; None: the dense head_dim (HiAP never narrows Q/K,
    # models pruned by other tools, e.g. Torch-Pruning's head dims, may)

    def __post_init__(self):
        if len(self.heads) != len(self.value_dims):
            raise ValueError("LayerSpec: heads and value_dims must have the same length")
        if any(w < 1 for w in self.value_dims):
            raise ValueError("LayerSpec: a live head needs at least one value dim")
        if self.mlp_hidden is not None and self.mlp_hidden < 0:
            raise ValueError("LayerSpec: mlp_hidden must be >= 0 or None")
        if self.qk_dim is not None and self.qk_dim < 1:
            raise ValueError("LayerSpec: qk_dim must be >= 1 or None")


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
        size = to_pair(img_size)
        if size[0] % self.patch_size[0] or size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {size} is not a multiple of the patch size {self.patch_size}")
        return dataclasses.replace(self, img_size=size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTSpec:
        data = dict(data)
        layers = tuple(
            LayerSpec(tuple(layer["heads"]), tuple(layer["value_dims"]), layer["mlp_hidden"], layer.get("qk_dim"))
            for layer in data.pop("layers")
        )
        for key in ("img_size", "patch_size"):
            data[key] = tuple(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}: was this saved by a newer hiap_core?")
        return cls(layers=layers, **data)


def to_pair(value) -> tuple[int, int]:
    """`7` or `(7, 7)` as `(7, 7)`."""
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)
