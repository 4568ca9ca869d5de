"""Two models with two inputs each, and calibration batches for them."""

from __future__ import annotations

import torch
from torch import nn


class ConvWithScale(nn.Module):
    """Two float inputs: an image and a per-sample scale."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x, scale):
        return self.head(self.fc(self.b(self.a(x).relu()).relu().mean((2, 3))).relu()) * scale


class TokensWithMask(nn.Module):
    """Two integer inputs: token ids into an embedding, and an attention mask for the mean over tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids, attention_mask):
        h = self.fc2(self.fc1(self.emb(ids)).relu())
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def image_and_scale(batch=4, count=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.rand(batch, 1, generator=g) + 0.5) for _ in range(count)]


def ids_and_mask(batch=4, count=3, tokens=6):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, tokens - 2 :] = 0
    return [(torch.randint(0, 50, (batch, tokens), generator=g), mask.clone()) for _ in range(count)]
