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
        if not all(_is_int(h) and h >= 0 for h in self.heads) or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"LayerSpec: heads = {self.heads!r}: must be distinct head indices")
        if len(self.heads) != len(self.value_dims):
            raise ValueError("LayerSpec: heads and value_dims must have the same length")
        if not all(_is_int(w) and w >= 1 for w in self.value_dims):
            raise ValueError("LayerSpec: a live head needs at least one value dim")
        if self.mlp_hidden is not None and not (_is_int(self.mlp_hidden) and self.mlp_hidden >= 0):
            raise ValueError("LayerSpec: mlp_hidden must be >= 0 or None")
        if self.qk_dim is not None and not (_is_int(self.qk_dim) and self.qk_dim >= 1):
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

    def __post_init__(self):
        """Every path (describe, load_pruned, count_macs) shares these checks: a tampered or mistyped spec is
        refused here, naming the field, instead of counting wrong MACs or failing inside forward."""
        rules = self._field_rules()
        if all(holds for _, _, holds, _ in rules):  # the layers are compared with well-typed dense sizes
            rules = self._layer_rules()
        for name, value, holds, rule in rules:
            if not holds:
                raise ValueError(f"ViTSpec: {name} = {value!r}: {rule}")

    def _field_rules(self) -> list[tuple[str, object, bool, str]]:
        """(field, value, holds, rule) of every field but the layers' contents."""
        pairs = all(
            isinstance(p, tuple) and len(p) == 2 and all(_is_int(v) and v >= 1 for v in p)
            for p in (self.img_size, self.patch_size)
        )
        multiple = pairs and not (self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1])
        eps = self.norm_eps
        rules = [
            ("patch_size", self.patch_size, pairs, "img_size and patch_size must be pairs of ints >= 1"),
            ("img_size", self.img_size, multiple, f"must be a multiple of patch_size {self.patch_size}"),
            ("global_pool", self.global_pool, self.global_pool in GLOBAL_POOLS, f"must be one of {', '.join(GLOBAL_POOLS)}"),
            (
                "act_approximate",
                self.act_approximate,
                self.act_approximate in GELU_APPROXIMATIONS,
                f"must be one of {', '.join(GELU_APPROXIMATIONS)}",
            ),
            (
                "norm_eps",
                eps,
                isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1,
                "must be a number in (0, 1)",
            ),
            (
                "layers",
                type(self.layers).__name__,
                isinstance(self.layers, tuple) and all(isinstance(x, LayerSpec) for x in self.layers),
                "must be a tuple of LayerSpec",
            ),
        ]
        for name in ("in_chans", "embed_dim", "num_heads", "head_dim", "mlp_hidden_dense", "num_classes", "reg_tokens"):
            least = 0 if name in ("num_classes", "reg_tokens") else 1
            value = getattr(self, name)
            rules.append((name, value, _is_int(value) and value >= least, f"must be an int >= {least}"))
        for f in dataclasses.fields(self):
            if f.type == "bool":
                rules.append((f.name, getattr(self, f.name), isinstance(getattr(self, f.name), bool), "must be true or false"))
        return rules

    def _layer_rules(self) -> list[tuple[str, object, bool, str]]:
        """Each layer within the dense model: live heads among its heads, widths within the dense ones."""
        rules = []
        for i, layer in enumerate(self.layers):
            rules += [
                (
                    f"layers[{i}].heads",
                    layer.heads,
                    all(h < self.num_heads for h in layer.heads),
                    f"must be < num_heads ({self.num_heads})",
                ),
                (
                    f"layers[{i}].value_dims",
                    layer.value_dims,
                    all(w <= self.head_dim for w in layer.value_dims),
                    f"must be <= head_dim ({self.head_dim})",
                ),
                (
                    f"layers[{i}].qk_dim",
                    layer.qk_dim,
                    (layer.qk_dim or 0) <= self.head_dim,
                    f"must be <= head_dim ({self.head_dim})",
                ),
                (
                    f"layers[{i}].mlp_hidden",
                    layer.mlp_hidden,
                    (layer.mlp_hidden or 0) <= self.mlp_hidden_dense,
                    f"must be <= mlp_hidden_dense ({self.mlp_hidden_dense})",
                ),
            ]
        return rules

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
        return dataclasses.replace(self, img_size=to_pair(img_size))

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
            data[key] = to_pair(data[key])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}: was this saved by a newer hiap_core?")
        return cls(layers=layers, **data)


GLOBAL_POOLS = ("token", "avg")
GELU_APPROXIMATIONS = ("none", "tanh")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def to_pair(value) -> tuple[int, int]:
    """`7` or `(7, 7)` as `(7, 7)`; anything else is refused (ViTSpec checks the range)."""
    if _is_int(value):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return tuple(value)
    raise ValueError(f"image and patch sizes must be an int or a pair of ints, got {value!r}")
