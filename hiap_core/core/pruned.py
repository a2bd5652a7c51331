"""`PrunedViT`: a plain ViT with per-layer head counts, per-head value widths and FFN widths.

No gates, no masks, no timm: it depends on torch and `spec.ViTSpec` only, so a saved model loads
without the training code. Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`,
`blocks.{i}.attn.qkv`, `blocks.{i}.mlp.fc1`, ...).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from .spec import LayerSpec, ViTSpec
from .files import atomic_write, file_sha256

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
ARCH_FILE = "architecture.json"
SPEC_HASH_KEY = "hiap_spec_sha256"  # in the weights' metadata: the weights vouch for the architecture they fit


class BiasOnly(nn.Module):
    """A branch whose every unit was pruned but whose output bias survives: adds a constant."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand_as(x)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PrunedAttention(nn.Module):
    """Heads of one layer may keep different value widths. Two layouts compute the same outputs:

    - per head (the default, `pad_values = False`): the Q/K products of all heads run as one batched matmul,
      then each head's attention weights multiply its own V columns; no padding, so the executed MACs are
      the analytic count.
    - padded (`pad_values = True`, `set_padded_attention`): each head's V is padded with zero columns to a
      common width inside the attention product only, so one fused `scaled_dot_product_attention` serves the
      layer (one kernel instead of one per head: what a launch-bound GPU wants); `qkv` and `proj` stay narrow.

    `qkv` produces [Q of all heads | K of all heads | V of all heads, head after head].
    """

    def __init__(
        self, dim: int, head_dim: int, value_dims: tuple[int, ...], qkv_bias: bool, proj_bias: bool, qk_dim: int | None = None
    ):
        super().__init__()
        self.num_heads, self.head_dim = len(value_dims), qk_dim or head_dim  # head_dim: the Q/K width here
        self.scale = head_dim**-0.5  # the dense model's: narrower Q/K (qk_dim) keep the scaling they trained with
        self.sdpa_scale = None if self.head_dim == head_dim else self.scale  # None: SDPA's own 1/sqrt(width), the same
        self.qk_width, self.v_dim = 2 * self.num_heads * self.head_dim, sum(value_dims)
        self.fused_attn = True
        self.values_as_wide_as_qk = all(width == self.head_dim for width in value_dims)
        ends = list(itertools.accumulate(value_dims))
        self.value_columns = list(zip([0] + ends[:-1], ends))  # each head's [start, end) in V
        self.pad_values = False
        # at least as wide as Q/K (CPU's fused kernel wants them equal), wider only if a value head is wider
        self.padded_width = max(self.head_dim, *value_dims)
        padded, kept = padded_value_columns(value_dims, self.padded_width)
        # Not in the state dict (saved files stay as they are); buffers so that .to(device) moves them.
        self.register_buffer("padded_columns", torch.tensor(padded, dtype=torch.long), persistent=False)
        self.register_buffer("kept_columns", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.qkv = nn.Linear(dim, self.qk_width + self.v_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.v_dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qk, v = self.qkv(x).split([self.qk_width, self.v_dim], dim=-1)
        q, k = qk.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        if self.fused_attn and self.values_as_wide_as_qk:
            # torch's fused kernel applies only here: on CPU it needs V as wide as Q and K.
            v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.sdpa_scale)
            return self.proj(out.transpose(1, 2).reshape(B, N, self.v_dim))
        if self.pad_values:
            return self.proj(self._padded_attention(q, k, v))
        # Scaling the scores in place, rather than q, saves an allocation (A/B: faster at batch 64, within noise at batch 1).
        attn = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # (B, H, N, N)
        # Per head (B, N, N) @ (B, N, width) on strided views: no reshapes, no copies, no grouping by width.
        outs = [attn[:, h] @ v[..., start:end] for h, (start, end) in enumerate(self.value_columns)]
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1))

    def _padded_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, _ = v.shape
        # One gather builds the padded V: column v_dim of the padded input is the zero column.
        v = F.pad(v, (0, 1)).index_select(-1, self.padded_columns).view(B, N, self.num_heads, self.padded_width)
        v = v.transpose(1, 2)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(B, N, -1).index_select(-1, self.kept_columns)


def padded_value_columns(value_dims: tuple[int, ...], width: int) -> tuple[list[int], list[int]]:
    """For V padded to `width` per head: the V column each padded slot reads (sum(value_dims): a zero
    column), and the padded output slots that hold real columns, in V's order."""
    padded, kept, start, zero_column = [], [], 0, sum(value_dims)
    for head, value_dim in enumerate(value_dims):
        padded += [start + i if i < value_dim else zero_column for i in range(width)]
        kept += [head * width + i for i in range(value_dim)]
        start += value_dim
    return padded, kept


class PrunedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_approximate: str, fc1_bias: bool, fc2_bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=fc1_bias)
        self.act = nn.GELU(approximate=act_approximate)
        self.fc2 = nn.Linear(hidden, dim, bias=fc2_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PrunedBlock(nn.Module):
    """Pre-norm residual block whose attention/FFN branch is a real module, a bias-only add, or absent."""

    def __init__(self, spec: ViTSpec, layer: LayerSpec):
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = self.attn = self.ls1 = self.norm2 = self.mlp = self.ls2 = None
        if layer.heads:
            self.norm1 = nn.LayerNorm(dim, eps=spec.norm_eps)
            self.attn = PrunedAttention(dim, spec.head_dim, layer.value_dims, spec.qkv_bias, spec.proj_bias, layer.qk_dim)
        elif spec.proj_bias:
            self.attn = BiasOnly(dim)
        if self.attn is not None and spec.layer_scale:
            self.ls1 = LayerScale(dim)
        if layer.mlp_hidden:
            self.norm2 = nn.LayerNorm(dim, eps=spec.norm_eps)
            self.mlp = PrunedMlp(dim, layer.mlp_hidden, spec.act_approximate, spec.fc1_bias, spec.fc2_bias)
        elif layer.mlp_hidden == 0 and spec.fc2_bias:
            self.mlp = BiasOnly(dim)
        if self.mlp is not None and spec.layer_scale:
            self.ls2 = LayerScale(dim)

    @staticmethod
    def _residual(x, norm, branch, scale):
        if branch is None:
            return x
        y = branch.bias if norm is None else branch(norm(x))
        return x + (y if scale is None else scale(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(x, self.norm1, self.attn, self.ls1)
        return self._residual(x, self.norm2, self.mlp, self.ls2)


def _norm(spec: ViTSpec, enabled: bool) -> nn.Module:
    return nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps) if enabled else nn.Identity()


class PrunedViT(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        dim = spec.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(
            spec.in_chans, dim, kernel_size=spec.patch_size, stride=spec.patch_size, bias=spec.patch_bias
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if spec.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, dim)) if spec.reg_tokens else None
        pos_len = spec.num_patches + (0 if spec.no_embed_class else spec.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, dim))
        self.norm_pre = _norm(spec, spec.pre_norm)
        self.blocks = nn.Sequential(*(PrunedBlock(spec, layer) for layer in spec.layers))
        self.norm = _norm(spec, spec.final_norm)
        self.fc_norm = _norm(spec, spec.fc_norm)
        self.head = nn.Linear(dim, spec.num_classes) if spec.num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if x.ndim != 4 or x.shape[1] != spec.in_chans or tuple(x.shape[-2:]) != tuple(spec.img_size):
            # as timm's ViT: a 32x32 image in a 28x28 model would lose its edge pixels without a word
            raise ValueError(
                f"input of shape {tuple(x.shape)}: this model takes images of shape (batch, {spec.in_chans}, "
                f"{spec.img_size[0]}, {spec.img_size[1]}) (its spec); resize, crop or pad them to that size"
            )
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.spec.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm(self.blocks(self.norm_pre(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.spec.num_prefix_tokens :].mean(dim=1) if self.spec.global_pool == "avg" else x[:, 0]
        return self.head(self.fc_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_params(spec: ViTSpec) -> int:
    """Parameters of the plain model this spec describes (built on the meta device: no memory, no copy)."""
    with torch.device("meta"):
        return sum(p.numel() for p in PrunedViT(spec).parameters())


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch every attention of a model (timm, gated or pruned) between SDPA and explicit matmuls."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def set_padded_attention(model: nn.Module, enabled: bool) -> None:
    """Switch every attention of an extracted model between the per-head and the padded layout
    (`PrunedAttention`); both give the same outputs, the padded one executes more MACs in fewer kernels."""
    for module in model.modules():
        if isinstance(module, PrunedAttention):
            module.pad_values = enabled


def check_has_values(model: nn.Module, what: str) -> None:
    """Refuse a model with weights on the meta device (shapes without values) before `what` reads them."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            f"{what}: the model's weights are on the meta device (shapes without values); give it weights first "
            "(model.to_empty(device='cpu'), then load_state_dict)"
        )


def save_pruned(model: PrunedViT, path: str | os.PathLike) -> Path:
    """Write `path/model.safetensors` and `path/architecture.json` (each atomically); returns `path`."""
    if not isinstance(model, PrunedViT):
        raise TypeError(f"save_pruned expects a PrunedViT (from hiap_core.extract), got {type(model).__name__}")
    check_has_values(model, "save_pruned")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors' save_file recreates the file with mode 0600; writing its bytes keeps atomic_write's 0644
    weights = save(tensors, metadata={SPEC_HASH_KEY: spec_sha256(model.spec)})
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: tmp.write_bytes(weights))
    arch = {"format": "hiap-pruned-vit", "format_version": FORMAT_VERSION, "spec": model.spec.to_dict()}
    arch["weights_sha256"] = file_sha256(folder / WEIGHTS_FILE)  # load_pruned refuses weights changed since
    atomic_write(folder / ARCH_FILE, lambda tmp: tmp.write_text(json.dumps(arch, indent=1)))
    return folder


def spec_sha256(spec: ViTSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()


def _device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"map_location = {map_location!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location = {map_location!r}: this machine has no CUDA device; load on 'cpu', then move the model")
    if device.type == "meta":
        raise ValueError(f"map_location = {map_location!r} holds no weights; load_spec reads the architecture alone")
    return torch.device("cpu") if device.type == "cpu" else device  # safetensors knows no 'cpu:0'


def _recorded_spec_hash(weights: Path) -> str | None:
    """The sha256 of the architecture the weights were saved with, from their metadata (None in files written
    before it was recorded)."""
    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get(SPEC_HASH_KEY)
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{weights} is not a readable safetensors file (corrupt or truncated): {err}") from err


def _check_files_vouch(weights: Path, arch_file: Path, arch: dict, spec: ViTSpec) -> None:
    """The weights are the file the JSON was saved with (its sha256), and the architecture the JSON describes is
    the one the weights were saved with (same shapes are not enough: permuted value widths or another norm eps
    load silently and give other logits). Files older than either record load as they did."""
    recorded = arch.get("weights_sha256")
    if recorded is not None and file_sha256(weights) != recorded:
        raise ValueError(
            f"{weights} is not the file {arch_file} was saved with (its sha256 differs): changed or replaced since; "
            "restore it or save the model again"
        )
    spec_hash = _recorded_spec_hash(weights)
    if recorded is None and spec_hash is not None:  # save_pruned has written both since the weights record the spec
        raise ValueError(
            f"{arch_file} has no weights_sha256 entry, which save_pruned writes beside weights that record their "
            f"architecture (as {weights} does): removed since, so the weights cannot be checked; restore it or save "
            "the model again"
        )
    if spec_hash is not None and spec_hash != spec_sha256(spec):
        raise ValueError(
            f"{arch_file} is not the architecture {weights} was saved with (edited since: value_dims, global_pool, "
            "norm_eps, ...); restore it or save the model again"
        )


def _read_architecture(arch_file: Path) -> tuple[dict, ViTSpec]:
    try:
        arch = json.loads(arch_file.read_text())
        if arch.get("format") != "hiap-pruned-vit" or arch.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {arch.get('format')!r} v{arch.get('format_version')}")
        return arch, ViTSpec.from_dict(arch["spec"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{arch_file} is not a valid hiap-pruned-vit v{FORMAT_VERSION} architecture: {err}") from err


def load_spec(path: str | os.PathLike) -> ViTSpec:
    """The architecture of a model written by `save_pruned`, without its weights: `path` is the model's folder
    or its `architecture.json` (or a copy of it, as the study commits in reports/metrics)."""
    arch_file = Path(path) / ARCH_FILE if Path(path).is_dir() else Path(path)
    if not arch_file.is_file():
        raise FileNotFoundError(f"{arch_file} not found: expected a folder written by hiap_core.save_pruned, or its {ARCH_FILE}")
    return _read_architecture(arch_file)[1]


def load_pruned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PrunedViT:
    """Load a model written by `save_pruned` (eval mode)."""
    device = _device(map_location)
    folder = Path(path)
    weights, arch_file = folder / WEIGHTS_FILE, folder / ARCH_FILE
    for f in (weights, arch_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a folder written by hiap_core.save_pruned")
    arch, spec = _read_architecture(arch_file)
    _check_files_vouch(weights, arch_file, arch, spec)
    model = PrunedViT(spec)
    try:
        state = load_file(str(weights), device=str(device))
        model.load_state_dict(state)
    except Exception as err:
        raise ValueError(f"{weights} does not match {arch_file} (corrupt or mixed-up files): {err}") from err
    return model.eval()
