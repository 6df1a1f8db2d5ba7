"""Grouped token-level and sequence-level mixture-of-experts layers (docs/design.md §5).

Both layers take `backend="kernels"` (the fused ops of `unif2ace.ops.moe`) or `backend="reference"` (the plain
PyTorch loop over experts a user would write: softmax, top-k, then for each expert index-select / compute /
index-add). The two backends share the parameters, so their outputs agree to rounding; the backend can also be
chosen per call (`forward(..., backend=...)`).

Both return `(y, balance_loss)`. The balance loss is the Switch-style Σ_groups E·Σ_e f_e·P_e (f_e: fraction of
the group's routed (token, slot) pairs sent to expert e; P_e: mean router probability of e over the group's
tokens), 0 for a group that has no tokens in the batch; it is differentiable through P (the router).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unif2ace.ops import moe as moe_ops
from unif2ace.ops import reference as ref

BACKENDS = ("kernels", "reference")
ACTIVATIONS = ("gelu_tanh", "gelu")
SEQUENCE_EXPERT_KINDS = ("copy", "zero", "clip", "face", "noise")
_MIXING_KINDS = ("clip", "face", "noise")


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_group_ids(group_ids: Tensor, num_groups: int, shapes: Sequence[tuple], device: torch.device) -> Tensor:
    if not isinstance(group_ids, Tensor):
        raise ValueError(f"group_ids: expected a tensor, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids: must be an integer tensor, got {group_ids.dtype}")
    if tuple(group_ids.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"group_ids: expected shape {' or '.join(str(list(s)) for s in shapes)}, "
                         f"got {list(group_ids.shape)}")
    if group_ids.device != device:
        raise ValueError(f"group_ids: must be on {device}, got {group_ids.device}")
    # A value check reads the data: free on the CPU, a host sync on CUDA (the kernels stay in bounds there).
    if group_ids.device.type == "cpu" and group_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(group_ids.min()), int(group_ids.max())
        if lo < 0 or hi >= num_groups:
            raise ValueError(f"group_ids: values must lie in [0, {num_groups}), found {lo if lo < 0 else hi}")
    return group_ids.to(torch.int64)


def _check_padding_mask(mask: Optional[Tensor], batch: int, length: int, device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        raise ValueError(f"padding_mask: expected a bool tensor of shape [{batch}, {length}] (True = real token), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
    if mask.device != device:
        raise ValueError(f"padding_mask: must be on {device}, got {mask.device}")
    return mask


def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor [B, L, H], got {list(getattr(x, 'shape', []))}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: must be a floating-point tensor, got {x.dtype}")


# ----------------------------------------------------------------------------------------------------------
# Token level
# ----------------------------------------------------------------------------------------------------------
class GroupedTokenMoE(nn.Module):
    """Grouped token-level MoE: G groups of E routed experts plus (optionally) one shared expert per group.

    Token t of group g: p = softmax(x_t · router[g]ᵀ) over the group's E experts, top-k (ties → lower index),
    gates renormalised over the k chosen (unless renormalize=False), and
        y_t = Shared_g(x_t) + Σ_{e ∈ top-k} gate_e · Expert_{g,e}(x_t).
    Experts are Phi-style 2-matrix MLPs with biases, act(x·W1ᵀ + b1)·W2ᵀ + b2, stored stacked over the G·E experts
    (w1 [G·E, F, H], b1 [G·E, F], w2 [G·E, H, F], b2 [G·E, H]) so the expert products run grouped over the
    expert-sorted rows; the shared experts likewise ([G, F_s, H], ...). router: [G, E, H], no bias.

    forward(x [B, L, H], group_ids [B] (per sequence) or [B, L] (per token), padding_mask [B, L] bool
    (True = real token, optional)) → (y [B, L, H], balance_loss). Padding tokens are still computed (their
    output is defined) but left out of the routing statistics of the balance loss.

    backend="kernels": moe_gate, moe_sort, then the fused moe_experts (routed experts, then the shared ones as a
    second pass with k = 1), which never stores the [T·k, H] sorted copies of x, of the expert outputs or of their
    gradients: the backward keeps x, the gates and the experts' hidden pre-activations [T·k, F]. recompute=True
    drops those too and recomputes them in the backward (one more x·W1ᵀ product per expert), so the layer then
    saves nothing of size T·k. The expert pass is moe_experts' default for the device (unif2ace.ops.moe_mlp): on the
    CPU one expert at a time over host row ranges; on CUDA grouped products driven by device-side offsets, so the
    whole layer, forward and backward, runs without a host synchronisation and can be captured in a CUDA graph where
    torch._grouped_mm covers the operands (bf16, sm90/sm100, H and F multiples of 8); other CUDA dtypes and cards
    read the expert offsets on the host (one sync per pass).
    """

    def __init__(
        self,
        hidden_size: int,
        expert_hidden_size: int,
        *,
        num_groups: int = 2,
        experts_per_group: int = 8,
        top_k: int = 4,
        shared_expert: bool = True,
        shared_hidden_size: Optional[int] = None,
        renormalize: bool = True,
        activation: str = "gelu_tanh",
        recompute: bool = False,
        backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("expert_hidden_size", expert_hidden_size),
                        ("num_groups", num_groups), ("experts_per_group", experts_per_group)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= experts_per_group:
            raise ValueError(f"top_k must lie in [1, experts_per_group={experts_per_group}], got {top_k!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.hidden_size, self.expert_hidden_size = hidden_size, expert_hidden_size
        self.num_groups, self.experts_per_group, self.top_k = num_groups, experts_per_group, top_k
        self.renormalize, self.activation, self.backend = renormalize, activation, _check_backend(backend)
        self.recompute = bool(recompute)
        ne, h, f = num_groups * experts_per_group, hidden_size, expert_hidden_size
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Parameter(torch.empty(num_groups, experts_per_group, h, **kw))
        self.w1 = nn.Parameter(torch.empty(ne, f, h, **kw))
        self.b1 = nn.Parameter(torch.empty(ne, f, **kw))
        self.w2 = nn.Parameter(torch.empty(ne, h, f, **kw))
        self.b2 = nn.Parameter(torch.empty(ne, h, **kw))
        self.shared_expert = shared_expert
        self.shared_hidden_size = shared_hidden_size or expert_hidden_size
        if shared_expert:
            fs = self.shared_hidden_size
            self.shared_w1 = nn.Parameter(torch.empty(num_groups, fs, h, **kw))
            self.shared_b1 = nn.Parameter(torch.empty(num_groups, fs, **kw))
            self.shared_w2 = nn.Parameter(torch.empty(num_groups, h, fs, **kw))
            self.shared_b2 = nn.Parameter(torch.empty(num_groups, h, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation per expert matrix; the router from N(0, 0.02²)."""
        nn.init.normal_(self.router, std=0.02)
        pairs = [(self.w1, self.b1), (self.w2, self.b2)]
        if self.shared_expert:
            pairs += [(self.shared_w1, self.shared_b1), (self.shared_w2, self.shared_b2)]
        for w, b in pairs:
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, expert_hidden={self.expert_hidden_size}, groups={self.num_groups}, "
                f"experts_per_group={self.experts_per_group}, top_k={self.top_k}, shared={self.shared_expert}, "
                f"backend={self.backend!r}")

    def _flat_inputs(self, x, group_ids, padding_mask):
        _check_x(x)
        b, l, h = x.shape
        if h != self.hidden_size:
            raise ValueError(f"x: expected hidden size {self.hidden_size}, got {h}")
        gid = _check_group_ids(group_ids, self.num_groups, [(b,), (b, l)], x.device)
        if gid.dim() == 1:
            gid = gid[:, None].expand(b, l)
        mask = _check_padding_mask(padding_mask, b, l, x.device)
        return x.reshape(b * l, h), gid.reshape(b * l).contiguous(), None if mask is None else mask.reshape(b * l)

    def forward(self, x: Tensor, group_ids: Tensor, padding_mask: Optional[Tensor] = None, *,
                backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
        backend = _check_backend(backend or self.backend)
        x2, gid, mask = self._flat_inputs(x, group_ids, padding_mask)
        ne = self.num_groups * self.experts_per_group
        logits = F.linear(x2, self.router.reshape(ne, self.hidden_size))
        if backend == "kernels":
            y, aux = self._forward_kernels(x2, gid, mask, logits)
        else:
            y, aux = self._forward_reference(x2, gid, mask, logits)
        return y.view(x.shape), aux

    def _forward_kernels(self, x2, gid, mask, logits):
        g, ne = self.num_groups, self.num_groups * self.experts_per_group
        gates, ids, counts, prob_mean = moe_ops.moe_gate(
            logits, gid, num_groups=g, top_k=self.top_k, renormalize=self.renormalize, token_mask=mask
        )
        offsets, sorted_slot = moe_ops.moe_sort(ids, ne)
        y = moe_ops.moe_experts(x2, gates, sorted_slot, offsets, self.w1, self.b1, self.w2, self.b2,
                                self.activation, recompute=self.recompute)
        if self.shared_expert:
            # The shared experts as a second fused pass: tokens sorted by group (k = 1, weight 1).
            offs_g, slot_g = moe_ops.moe_sort(gid[:, None], g)
            y = y + moe_ops.moe_experts(x2, None, slot_g, offs_g, self.shared_w1, self.shared_b1, self.shared_w2,
                                        self.shared_b2, self.activation, recompute=self.recompute)
        return y, moe_ops.balance_loss(counts, prob_mean, g)

    def _forward_reference(self, x2, gid, mask, logits):
        g, ne = self.num_groups, self.num_groups * self.experts_per_group
        gates, ids, counts, prob_mean = ref.moe_gate(
            logits, gid, num_groups=g, top_k=self.top_k, renormalize=self.renormalize, token_mask=mask
        )
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"

        def mlp(xe, w1, b1, w2, b2):
            return F.linear(F.gelu(F.linear(xe, w1, b1), approximate=approximate), w2, b2)

        y = torch.zeros_like(x2)
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        for e in range(ne):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            out = mlp(x2.index_select(0, tok), w1[e], b1[e], w2[e], b2[e])
            y.index_add_(0, tok, out * gates[tok, slot, None].to(out.dtype))
        if self.shared_expert:
            sw1, sb1, sw2, sb2 = (p.unbind(0) for p in (self.shared_w1, self.shared_b1, self.shared_w2,
                                                        self.shared_b2))
            for grp in range(g):
                tok = torch.where(gid == grp)[0]
                if tok.numel() == 0:
                    continue
                y.index_add_(0, tok, mlp(x2.index_select(0, tok), sw1[grp], sb1[grp], sw2[grp], sb2[grp]))
        return y, ref.balance_loss(counts, prob_mean, g)


# ----------------------------------------------------------------------------------------------------------
# Sequence level
# ----------------------------------------------------------------------------------------------------------
class Resampler(nn.Module):
    """S(f): Linear(D → D_h) → GELU(tanh) → Linear(D_h → H), mapping a per-sequence embedding into the hidden size."""

    def __init__(self, in_dim: int, hidden_size: int, inner_dim: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        inner = inner_dim or hidden_size
        self.fc1 = nn.Linear(in_dim, inner, device=device, dtype=dtype)
        self.fc2 = nn.Linear(inner, hidden_size, device=device, dtype=dtype)

    def forward(self, f: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(f), approximate="tanh"))


class GroupedSequenceMoE(nn.Module):
    """Grouped sequence-level MoE: one router decision per sequence.

    For sequence b of group g: r_b = mean of x_b over its real (non-padding) tokens; p = softmax(r_b · router[g]ᵀ)
    over the group's experts; top-k (ties → lower index), renormalised; every token of b goes to the same k
    experts and y_b = Σ_j gate_j · Expert_j(x_b). Expert kinds:
      copy   Expert(x) = x
      zero   Expert(x) = 0
      clip, face, noise
             Expert(x) = w·x + (1 − w)·S(f_b), [w, 1 − w] = softmax of two learned logits (initialised equal,
             w = 0.5), S a learned Resampler from the embedding size to H. S(f_b) is one [H] vector per sequence,
             broadcast over all L positions of the sequence (padding positions included; their values are defined
             but meaningless). f_b is embeddings["clip"][b] / embeddings["face"][b] ([B, D]) or, for noise, a draw
             from N(0, I) of size noise_dim.
    Each (group, slot) expert of a mixing kind has its own resampler and mixing logits.

    Noise: in training mode f ~ N(0, I) drawn with `generator` (forward argument, else the module's
    `noise_generator` attribute, else torch's default generator); in eval mode f = 0, so inference is
    deterministic. Both backends use the same draw.
    Missing embeddings: an expert whose embedding is absent from `embeddings` (or embeddings=None) uses a zero
    embedding, f = 0 (documented choice: no host-side check of which sequences route where is needed).
    The kernels backend reads nothing on the host (no synchronisation on CUDA; capturable in a CUDA graph).
    Padding-only sequences (no True in padding_mask): the mean over no tokens is defined as the zero vector, so
    their router logits are 0, p is uniform and ties send them to the group's first k experts; they are left out
    of the balance-loss statistics.
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        groups: Sequence[Sequence[str]] = (("clip", "face", "copy", "copy"), ("copy", "zero", "noise", "copy")),
        top_k: int = 2,
        embedding_dims: Optional[Mapping[str, int]] = None,
        noise_dim: int = 64,
        resampler_hidden: Optional[int] = None,
        backend: str = "kernels",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embedding_dims is None:
            embedding_dims = {"clip": 512, "face": 512}
        groups = tuple(tuple(gr) for gr in groups)
        if not groups or any(len(gr) != len(groups[0]) or not gr for gr in groups):
            raise ValueError(f"groups: every group needs the same, positive number of experts, got {groups}")
        for gr in groups:
            for kind in gr:
                if kind not in SEQUENCE_EXPERT_KINDS:
                    raise ValueError(f"groups: unknown expert kind {kind!r}; kinds are {SEQUENCE_EXPERT_KINDS}")
                if kind in ("clip", "face") and kind not in embedding_dims:
                    raise ValueError(f"embedding_dims: missing the size of the {kind!r} embedding")
        if not isinstance(top_k, int) or not 1 <= top_k <= len(groups[0]):
            raise ValueError(f"top_k must lie in [1, {len(groups[0])}], got {top_k!r}")
        self.hidden_size, self.groups, self.top_k = hidden_size, groups, top_k
        self.num_groups, self.experts_per_group = len(groups), len(groups[0])
        self.embedding_dims, self.noise_dim = dict(embedding_dims), noise_dim
        self.backend = _check_backend(backend)
        self.noise_generator: Optional[torch.Generator] = None
        kw = {"device": device, "dtype": dtype}
        self.router = nn.Parameter(torch.empty(self.num_groups, self.experts_per_group, hidden_size, **kw))
        self.resamplers = nn.ModuleDict()
        self.mix_logits = nn.ParameterDict()
        for g, gr in enumerate(groups):
            for e, kind in enumerate(gr):
                if kind in _MIXING_KINDS:
                    d = noise_dim if kind == "noise" else self.embedding_dims[kind]
                    self.resamplers[f"{g}_{e}"] = Resampler(d, hidden_size, resampler_hidden, **kw)
                    self.mix_logits[f"{g}_{e}"] = nn.Parameter(torch.zeros(2, **kw))
        nn.init.normal_(self.router, std=0.02)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, groups={self.groups}, top_k={self.top_k}, backend={self.backend!r}"

    def _features(self, embeddings, batch, like: Tensor, generator) -> dict:
        feats = {}
        kinds = {k for gr in self.groups for k in gr}
        for kind in ("clip", "face"):
            if kind not in kinds:
                continue
            d = self.embedding_dims[kind]
            f = None if embeddings is None else embeddings.get(kind)
            if f is None:
                f = like.new_zeros(batch, d)
            elif not isinstance(f, Tensor) or tuple(f.shape) != (batch, d) or not f.is_floating_point():
                raise ValueError(f"embeddings[{kind!r}]: expected a floating tensor of shape [{batch}, {d}], got "
                                 f"{getattr(f, 'dtype', type(f).__name__)} {list(getattr(f, 'shape', []))}")
            elif f.device != like.device:
                raise ValueError(f"embeddings[{kind!r}]: must be on {like.device}, got {f.device}")
            feats[kind] = f.to(like.dtype)
        if "noise" in kinds:
            if self.training:
                gen = generator if generator is not None else self.noise_generator
                feats["noise"] = torch.randn(batch, self.noise_dim, generator=gen, device=like.device,
                                             dtype=like.dtype)
            else:
                feats["noise"] = like.new_zeros(batch, self.noise_dim)
        return feats

    def _mix(self, g: int, e: int) -> tuple[Tensor, str]:
        logits = self.mix_logits[f"{g}_{e}"]
        w = torch.softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), 0)[0]
        return w, self.groups[g][e]

    def forward(
        self,
        x: Tensor,
        group_ids: Tensor,
        padding_mask: Optional[Tensor] = None,
        embeddings: Optional[Mapping[str, Tensor]] = None,
        *,
        generator: Optional[torch.Generator] = None,
        backend: Optional[str] = None,
    ) -> tuple[Tensor, Tensor]:
        backend = _check_backend(backend or self.backend)
        _check_x(x)
        b, l, h = x.shape
        if h != self.hidden_size:
            raise ValueError(f"x: expected hidden size {self.hidden_size}, got {h}")
        gid = _check_group_ids(group_ids, self.num_groups, [(b,)], x.device)
        mask = _check_padding_mask(padding_mask, b, l, x.device)
        if mask is None:
            mask = torch.ones(b, l, dtype=torch.bool, device=x.device)
        n_real = mask.sum(1)
        pooled = (x * mask[..., None].to(x.dtype)).sum(1) / n_real.clamp(min=1)[:, None].to(x.dtype)
        logits = F.linear(pooled, self.router.reshape(-1, h))
        has_tokens = n_real > 0
        feats = self._features(embeddings, b, x, generator)
        if backend == "kernels":
            return self._forward_kernels(x, gid, has_tokens, logits, feats)
        return self._forward_reference(x, gid, has_tokens, logits, feats)

    def _forward_kernels(self, x, gid, has_tokens, logits, feats):
        # Every expert is y = a·x + c_b with a scalar a and a per-sequence vector c_b, so the routed sum is
        # y_b = (Σ_j gate_j·a_j)·x_b + Σ_j gate_j·c_{b,j}: two small gathers instead of a loop over experts.
        g_n, e_n, k = self.num_groups, self.experts_per_group, self.top_k
        b, _, h = x.shape
        gates, ids, counts, prob_mean = moe_ops.moe_gate(
            logits, gid, num_groups=g_n, top_k=k, renormalize=True, token_mask=has_tokens
        )
        scale, shift = [], []
        zero_shift = x.new_zeros(b, h)
        for g in range(g_n):
            for e in range(e_n):
                kind = self.groups[g][e]
                if kind == "copy":
                    scale.append(torch.ones((), device=x.device))
                    shift.append(zero_shift)
                elif kind == "zero":
                    scale.append(torch.zeros((), device=x.device))
                    shift.append(zero_shift)
                else:
                    w, _ = self._mix(g, e)
                    scale.append(w)
                    shift.append((1 - w).to(x.dtype) * self.resamplers[f"{g}_{e}"](feats[kind]))
        scale_t = torch.stack(scale).to(gates.dtype)                  # [G·E]
        shift_t = torch.stack(shift, 1)                               # [B, G·E, H]
        alpha = (gates * scale_t[ids]).sum(1)                         # [B]
        beta = (gates[..., None].to(x.dtype) * shift_t.gather(1, ids[..., None].expand(b, k, h))).sum(1)
        y = alpha[:, None, None].to(x.dtype) * x + beta[:, None, :]
        return y, moe_ops.balance_loss(counts, prob_mean, g_n)

    def _forward_reference(self, x, gid, has_tokens, logits, feats):
        g_n, e_n = self.num_groups, self.experts_per_group
        gates, ids, counts, prob_mean = ref.moe_gate(
            logits, gid, num_groups=g_n, top_k=self.top_k, renormalize=True, token_mask=has_tokens
        )
        y = torch.zeros_like(x)
        for ge in range(g_n * e_n):
            seq, slot = torch.where(ids == ge)
            if seq.numel() == 0:
                continue
            g, e = divmod(ge, e_n)
            kind = self.groups[g][e]
            xs = x.index_select(0, seq)
            if kind == "copy":
                out = xs
            elif kind == "zero":
                out = torch.zeros_like(xs)
            else:
                w, _ = self._mix(g, e)
                f = feats[kind].index_select(0, seq)
                out = w.to(x.dtype) * xs + (1 - w).to(x.dtype) * self.resamplers[f"{g}_{e}"](f)[:, None, :]
            y.index_add_(0, seq, out * gates[seq, slot, None, None].to(x.dtype))
        return y, ref.balance_loss(counts, prob_mean, g_n)
