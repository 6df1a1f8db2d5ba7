"""Phi-style self-attention (QK-LayerNorm, partial rotary embeddings, biases) and the omni-attention mask."""
from __future__ import annotations

import math
import warnings
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
# The omni-attention mask as a flex_attention block mask
# ----------------------------------------------------------------------------------------------------------
def omni_mask_mod(block: Tensor, real: Tensor):
    """The rule of omni_attention_mask as a flex_attention mask_mod(b, h, q, kv), from the image-block ids [B, L]
    (image_block_ids) and the padding mask [B, L] of the sequence."""

    def mask_mod(b, h, q, kv):
        blk_q, real_q, real_kv = block[b, q], real[b, q], real[b, kv]
        allowed = ((kv <= q) | ((blk_q == block[b, kv]) & (blk_q > 0))) & real_q & real_kv
        return allowed | (~real_q & (q == kv))

    return mask_mod


def omni_block_mask(input_ids: Tensor, padding_mask: Tensor, soi_id: int, eoi_id: int):
    """omni_attention_mask as a flex_attention BlockMask: tiles of 128 × 128 that the rule masks entirely are
    skipped, tiles it allows entirely are computed without evaluating the mask, and only tiles on the diagonal or
    the image block's edges evaluate it per element. Built once per forward (per MaskGIT loop) from the sequence
    layout."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = input_ids.shape
    mod = omni_mask_mod(image_block_ids(input_ids, soi_id, eoi_id), padding_mask.bool())
    return create_block_mask(mod, B, None, L, L, device=input_ids.device)


_compiled_flex = None
_flex_checked: dict = {}


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """flex_attention compiled into fused kernels on CUDA (compiled once per process, with dynamic shapes so that
    new sequence lengths do not recompile it); on the CPU the unfused eager implementation, which evaluates the same
    mask (slow: for tests and checks)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():  # inside compiled blocks: the enclosing compilation fuses it
        return flex_attention(q, k, v, block_mask=block_mask)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask)


def flex_available(device: torch.device, backward: bool = True) -> bool:
    """Whether compiled flex_attention works on `device` (checked once per process: the model's own path, the
    omni block mask on a small batch, against SDPA; with `backward`, its gradient too). False, with a warning, where
    it fails (no Triton, an unsupported GPU), so that attention="auto" falls back to SDPA instead of failing. A
    forward-only check (generation) compiles what generation then reuses."""
    key = (str(device), backward)
    if key not in _flex_checked:
        try:
            with torch.inference_mode(False), torch.set_grad_enabled(backward):
                ok = _check_flex(device, backward)
            if not ok:
                warnings.warn("flex_attention disagrees with SDPA on this device; attention='auto' uses SDPA")
        except Exception as e:  # any failure of the compiler stack means: do not use it
            warnings.warn(f"flex_attention is not usable on {device} ({type(e).__name__}: {e}); "
                          "attention='auto' uses SDPA")
            ok = False
        _flex_checked[key] = ok
    return _flex_checked[key]


def _check_flex(device: torch.device, backward: bool) -> bool:
    L, soi, eoi = 200, 1, 2
    ids = torch.full((2, L), 5, dtype=torch.long, device=device)
    ids[0, 50], ids[0, 120], ids[1, 100], ids[1, 180] = soi, eoi, soi, eoi
    real = torch.ones(2, L, dtype=torch.bool, device=device)
    real[1, :30] = False
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 64, device=device, generator=g, dtype=torch.bfloat16).requires_grad_(backward)
               for _ in range(3))
    out = _flex_attention(q, k, v, omni_block_mask(ids, real, soi, eoi))
    if backward:
        out.float().sum().backward()
    ref = F.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                                         attn_mask=omni_attention_mask(ids, real, soi, eoi))
    close = bool(torch.allclose(out.detach().float(), ref, atol=3e-2, rtol=3e-2))
    return close and (not backward or (q.grad is not None and bool(torch.isfinite(q.grad).all())))


# ----------------------------------------------------------------------------------------------------------
# KV caches
# ----------------------------------------------------------------------------------------------------------
class KVCache:
    """A growing KV cache: per layer [B, nh, T, hd] tensors (post QK-norm and rotary) extended by concatenation at
    every step, the key padding mask [B, T], and per layer the sequence-MoE context (see model.Block). Simple, but
    every step reallocates the cache and needs the host to know T; generate_text uses StaticKVCache."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[Tensor]] = [None] * num_layers
        self.values: list[Optional[Tensor]] = [None] * num_layers
        self.seq_context: list[Optional[Tensor]] = [None] * num_layers
        self.key_padding_mask: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class StaticKVCache:
    """A preallocated KV cache for decoding without host synchronisation: per layer key and value buffers
    [B, nh, max_length, hd] (allocated at the prefill, in the keys' dtype) written in place, the key padding mask
    [B, max_length], and `position`, a 0-dim int64 device tensor holding the slot of the next token. A decode step
    writes its keys at `position`, attends over all max_length slots with the slots not yet written masked out,
    and advances `position` on the device — it reads no host value, so one captured step (a CUDA graph) can be
    replayed for every token."""

    def __init__(self, num_layers: int, batch_size: int, max_length: int, device: torch.device):
        self.max_length = max_length
        self.keys: list[Optional[Tensor]] = [None] * num_layers
        self.values: list[Optional[Tensor]] = [None] * num_layers
        self.seq_context: list[Optional[Tensor]] = [None] * num_layers
        self.key_padding_mask = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.prefill_length = 0  # host-side: 0 until the prefill ran (it alone has a host-known length)

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is None:  # the prefill attends over its own keys only, as without a cache
            B, nh, L, hd = k.shape
            if L > self.max_length:
                raise ValueError(f"prefill of {L} tokens exceeds the cache's max_length {self.max_length}")
            self.keys[layer] = k.new_zeros(B, nh, self.max_length, hd)
            self.values[layer] = v.new_zeros(B, nh, self.max_length, hd)
            self.keys[layer][:, :, :L] = k
            self.values[layer][:, :, :L] = v
            return k, v
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer]


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------
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

    def forward(self, h: Tensor, positions: Tensor, mask, cache=None, layer: int = 0) -> Tensor:
        """h [B, L, H]; positions [L] (int64, may live on the device); mask: a bool tensor [B, 1, L, T] over the keys
        (T = L, or the cache's keys: cached + new), or a flex_attention BlockMask (no cache)."""
        B, L, _ = h.shape
        split = lambda t: t.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = self.q_layernorm(split(self.q_proj(h)))
        k = self.k_layernorm(split(self.k_proj(h)))
        v = split(self.v_proj(h))
        cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rope_theta, q.dtype)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions)
        if self.backend == "reference":
            if not isinstance(mask, Tensor):
                raise ValueError("the reference backend takes a dense boolean mask")
            scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
        elif isinstance(mask, Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # Under autocast q and k leave their LayerNorm in fp32 while v is bf16; SDPA is cast by autocast,
            # flex_attention is not, so match them to v here.
            out = _flex_attention(q.to(v.dtype), k.to(v.dtype), v, mask)
        return self.dense(out.transpose(1, 2).reshape(B, L, -1))
