"""Frozen image encoders feeding the CLIP and Face experts of the sequence MoE.

An encoder is any nn.Module mapping images [B, 3, H, W] in [-1, 1] to embeddings [B, D]. Real ones (a CLIP image
tower, a face-recognition network) are passed to UniF2aceModel by the user. Without them the model uses
`BuiltinImageEncoder`: a tiny conv net with *random, fixed* weights (drawn from a fixed seed, so every instance
and every process gets the same weights). Honestly stated: its embeddings are random projections of local image
statistics — deterministic and image-dependent, but with no semantic or identity knowledge. It exists so that the
whole model, including the CLIP/Face experts, runs and trains end to end without external downloads.

Encoders are frozen (requires_grad False, eval mode), excluded from the parameter count, the optimizer and the
checkpoint.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class BuiltinImageEncoder(nn.Module):
    """Conv(3→32, 8×8 stride 8) → GELU → 2×2 average pool → Linear(128 → D) → LayerNorm (no affine)."""

    def __init__(self, embed_dim: int, seed: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.conv = nn.Conv2d(3, 32, kernel_size=8, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(32 * 4, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        if self.conv.weight.is_meta:
            return
        g = torch.Generator(device="cpu").manual_seed(seed)
        for p in self.parameters():  # drawn on the CPU whatever the default device, so every device gets the same
            p.copy_(torch.randn(p.shape, generator=g, device="cpu") / max(1, p[0].numel()) ** 0.5)

    def forward(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.gelu(self.conv(images))
        return self.norm(self.proj(self.pool(x).flatten(1)))


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
