"""A ViT-tiny-style classifier for small images (Dosovitskiy et al. 2021, CIFAR-sized).

Patch embedding (a strided conv), a learned position embedding, pre-norm transformer
blocks with hand-written softmax attention (``q @ k.transpose(-2, -1)``, as timm and
nanoGPT write it), and the mean over tokens into a linear head (no class token): Linear,
LayerNorm, GELU and attention, what small edge transformers are made of.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError
from .registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, softmax(q k^T / sqrt(d)) v, projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise UsageError(f"width {dim} is not a multiple of heads {heads}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, d]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches of ``patch`` x ``patch`` pixels -> ``depth`` blocks of width ``dim`` -> mean
    over tokens -> LayerNorm -> linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 patch: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if image_size % patch:
            raise UsageError(f"image size {image_size} is not a multiple of patch {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, dim]
        x = self.blocks(x)
        return self.head(self.norm(x.mean(dim=1)))  # [B, classes]


@register_model
def vit_tiny(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, dim: int = 128,
             depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0) -> ViT:
    """ViT-tiny-style, patch 4 on 32x32 images: 64 tokens, 4 blocks of width 128, 4 heads
    (0.55 M parameters; sized to train on a CPU)."""
    return ViT(num_classes, in_channels, image_size, 4, dim, depth, heads, mlp_ratio)
