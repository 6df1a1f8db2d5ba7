"""Phi-style self-attention (QK-LayerNorm, partial rotary embeddings, biases) and the omni-attention mask."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------------------
# Omni-attention mask
# ----------------------------------------------------------------------------------------------------------
def image_block_ids(input_ids: Tensor, soi_id: int, eoi_id: int) -> Tensor:
    """[B, L] int: k ≥ 1 for the tokens of the k-th image block of the row (<|soi|> … <|eoi|> inclusive),
    0 for everything else."""
    is_soi = (input_ids == soi_id).long()
    is_eoi = (input_ids == eoi_id).long()
    opened = is_soi.cumsum(-1)
    closed_before = is_eoi.cumsum(-1) - is_eoi  # an <|eoi|> still belongs to the block it closes
    inside = opened > closed_before
    return torch.where(inside, opened, torch.zeros_like(opened))


def omni_attention_mask(input_ids: Tensor, padding_mask: Tensor, soi_id: int, eoi_id: int) -> Tensor:
    """Boolean "may attend" mask [B, 1, L, L] (True = attend), built from token ids alone:

    - a real token attends causally to every real token at or before it (text is causal, image tokens see
      all real text before them);
    - tokens of the same image block (<|soi|> … <|eoi|>) also attend to each other in both directions;
    - padding (padding_mask False) is never attended; a padding row attends only to itself, so no row is empty
      (no NaN from the softmax) whatever side the padding is on.
    """
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device)
    causal = pos[None, :] <= pos[:, None]  # [L(q), L(k)]
    block = image_block_ids(input_ids, soi_id, eoi_id)
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    real = padding_mask.bool()
    allowed = (causal[None] | same_block) & real[:, None, :] & real[:, :, None]
    pad_self = (~real)[:, :, None] & torch.eye(L, dtype=torch.bool, device=input_ids.device)[None]
    return (allowed | pad_self)[:, None]


# ----------------------------------------------------------------------------------------------------------
# Partial rotary embeddings (GPT-NeoX "rotate half" on the first rotary_dim dims of each head)
# ----------------------------------------------------------------------------------------------------------
def rotary_cos_sin(positions: Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [L, rotary_dim] for integer positions [L]; computed in fp32, then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, nh, L, hd]: rotate the first cos.shape[-1] dims, pass the rest through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for incremental decoding: lists of [B, nh, T, hd] tensors (post QK-norm
    and rotary), the key padding mask [B, T], and per layer the sequence-MoE context (see model.Block)."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[Tensor]] = [None] * num_layers
        self.values: list[Optional[Tensor]] = [None] * num_layers
        self.seq_context: list[Optional[Tensor]] = [None] * num_layers
        self.key_padding_mask: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, rotary_dim: int, rope_theta: float, qk_layernorm: bool,
                 eps: float, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.rotary_dim = rotary_dim
        self.rope_theta = rope_theta
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        # Show-o's addition to Phi: LayerNorm over head_dim on q and k, before rotary.
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=eps) if qk_layernorm else nn.Identity()
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=eps) if qk_layernorm else nn.Identity()

    def forward(self, h: Tensor, positions: Tensor, mask: Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> Tensor:
        """h [B, L, H]; positions [L]; mask bool [B, 1, L, T] over the keys (cached + new, T = cached + L)."""
        B, L, _ = h.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = self.q_layernorm(split(self.q_proj(h)))
        k = self.k_layernorm(split(self.k_proj(h)))
        v = split(self.v_proj(h))
        cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rope_theta, q.dtype)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        if self.backend == "reference":
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(B, L, -1))
