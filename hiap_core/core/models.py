"""The timm ViTs of the paper, built without downloading anything."""

from __future__ import annotations

from torch import nn


def cifar_vit_tiny(num_classes: int = 10) -> nn.Module:
    """The paper's CIFAR-10 ViT-Tiny: img 32, patch 4, embed 192, depth 6, 3 heads, mlp 768."""
    from timm.models.vision_transformer import VisionTransformer  # timm is optional for the core (gated_vit.py)

    return VisionTransformer(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=num_classes
    )
