"""A small Vision Transformer for 1x28x28 Fashion-MNIST images, and its shipped checkpoint.

Architecture: a 4x4/stride-4 Conv2d patch embedding (7x7 = 49 tokens of width ``dim``), a learnable class token
concatenated in front (50 tokens), a learnable position embedding added, ``depth`` pre-norm blocks
(LayerNorm -> multi-head self-attention -> residual add; LayerNorm -> Linear-GELU-Linear MLP -> residual add),
a final LayerNorm, class-token pooling and a Linear head. Attention is written like timm's: one fused ``qkv``
Linear, ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, ``unbind``, ``F.scaled_dot_product_attention`` and a
``proj`` Linear. Defaults: dim 96, depth 4, 4 heads of 24, MLP hidden 192.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from grailc.models import load_checkpoint

CHECKPOINT = Path(__file__).parent.parent / "data" / "fashion_vit.safetensors"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as in timm."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FashionViT(nn.Module):
    """Conv patch embedding, class token, position embedding, pre-norm blocks, LayerNorm and a linear head."""

    def __init__(
        self,
        dim: int = 96,
        depth: int = 4,
        num_heads: int = 4,
        mlp_hidden: int = 192,
        patch_size: int = 4,
        image_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, 49, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def load_fashion_vit() -> FashionViT:
    """The FashionViT trained by ``examples/train_fashion_vit.py``, in eval mode."""
    return load_checkpoint(FashionViT(), CHECKPOINT, "Fashion-MNIST ViT", "examples/train_fashion_vit.py")
