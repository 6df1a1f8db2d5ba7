"""Grouped mixture-of-experts ops (docs/design.md §5) as torch custom ops around the C++/CUDA kernels.

Public functions:
  moe_gate      fused grouped softmax + top-k + renormalise + routing statistics (expert counts, mean router
                probabilities for the balance loss); the [T, G·E] probability matrix is never stored
  moe_dispatch  stable expert-sorted permutation of the (token, slot) pairs and the row gather into that order
  moe_combine   the gate-weighted sum of each token's k expert rows back in token order (fixed order j = 0..k−1)
  grouped_mlp   the experts' 2-matrix MLPs over the expert-sorted rows (defined in unif2ace.ops.moe_mlp)
  moe_sort      the expert-sorted order alone (expert_offsets, sorted_slot), without moving rows
  moe_experts   dispatch + expert MLPs + combine in one autograd node (defined in unif2ace.ops.moe_mlp): on the CPU
                one expert at a time, on CUDA grouped products over device-side offsets without a host sync
                (what GroupedTokenMoE's kernels backend runs)
  balance_loss  Σ_groups E·Σ_e f_e·P_e from moe_gate's statistics

The custom ops underneath (torch.ops.unif2ace.*): moe_gate, moe_gate_backward, moe_sort, moe_permute,
moe_unpermute, moe_unpermute_backward, moe_scatter_add_rows, and the expert pass's row kernels
moe_gelu_tanh_backward_rows and moe_bias_gelu_tanh_rows. Every one is deterministic: the same inputs give bit-identical outputs on
the same device (fixed-order sums, no float atomics).

Slots: token t's j-th choice is slot s = t·k + j. `sorted_slot[i]` is the slot held by expert-sorted row i;
rows are grouped by expert (ascending expert id) and, within an expert, by ascending slot, so
`x_sorted[i] = x[sorted_slot[i] // k]` and expert e owns rows `expert_offsets[e] : expert_offsets[e + 1]`.

Invalid ids: on the CPU an out-of-range group id, expert id or a malformed sorted_slot raises ValueError naming
the argument. On CUDA the check would need a host synchronisation, so the kernels stay in bounds instead (a
token with an out-of-range group gets expert ids −1 and gates 0; out-of-range expert ids sort after every real
expert, past expert_offsets[-1]).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from unif2ace._core import _C, dl, stream_of

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _opt_dl(t: Optional[Tensor]):
    return None if t is None else dl(t.contiguous())


def _check_float(t: Tensor, name: str, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name}: dtype must be float32, bfloat16, float16 or float64, got {t.dtype}")


_INT64_MAX = 2**63 - 1


def _check_int(value, name: str, low: int = 1, high: int = _INT64_MAX) -> int:
    """A Python int in [low, high] (bools are rejected: True would pass as 1). The custom ops take int64, so a larger
    int would otherwise fail later with a conversion error that does not name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must lie in [{low}, {high}], got {value}")
    return value


def _check_index(t: Tensor, name: str, shape: tuple, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise ValueError(f"{name}: dtype must be int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: must be on {device}, got {t.device}")


# ----------------------------------------------------------------------------------------------------------
# Gating
# ----------------------------------------------------------------------------------------------------------
def _check_gate(router_logits, group_ids, token_mask, num_groups, top_k):
    _check_float(router_logits, "router_logits", 2)
    _check_int(num_groups, "num_groups")
    n_tokens, n_cols = router_logits.shape
    if n_cols == 0 or n_cols % num_groups != 0:
        raise ValueError(
            f"router_logits: the number of columns ({n_cols}) must be a positive multiple of num_groups ({num_groups})"
        )
    n_experts = n_cols // num_groups
    _check_int(top_k, "top_k (at most the experts per group)", 1, n_experts)
    _check_index(group_ids, "group_ids", (n_tokens,), router_logits.device)
    if token_mask is not None:
        if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (n_tokens,):
            raise ValueError(f"token_mask: expected a bool tensor of shape [{n_tokens}], got {token_mask.dtype} "
                             f"{list(token_mask.shape)}")
        if token_mask.device != router_logits.device:
            raise ValueError(f"token_mask: must be on {router_logits.device}, got {token_mask.device}")
    return n_tokens, n_experts


@torch.library.custom_op("unif2ace::moe_gate", mutates_args=())
def _moe_gate(
    router_logits: Tensor, group_ids: Tensor, token_mask: Optional[Tensor], num_groups: int, top_k: int,
    renormalize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n_tokens, n_experts = _check_gate(router_logits, group_ids, token_mask, num_groups, top_k)
    logits = router_logits.contiguous()
    dev, acc, ne = logits.device, _acc_dtype(logits), num_groups * n_experts
    gates = torch.empty(n_tokens, top_k, dtype=acc, device=dev)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=dev)
    counts = torch.empty(ne, dtype=torch.int64, device=dev)
    group_counts = torch.empty(num_groups, dtype=torch.int64, device=dev)
    prob_mean = torch.empty(ne, dtype=acc, device=dev)
    ws = (None, None, None)
    if dev.type == "cuda":
        nb = -(-n_tokens // _C.moe_gate_block_tokens())
        ws = (torch.empty(nb, ne, dtype=torch.float32, device=dev), torch.empty(nb, ne, dtype=torch.int64, device=dev),
              torch.empty(nb, num_groups, dtype=torch.int64, device=dev))
    _C.moe_gate_forward(
        dl(logits), dl(group_ids.contiguous()), _opt_dl(token_mask), num_groups, top_k, renormalize, dl(gates),
        dl(ids), dl(counts), dl(group_counts), dl(prob_mean), *[_opt_dl(w) for w in ws], stream_of(logits),
    )
    return gates, ids, counts, prob_mean, group_counts


@_moe_gate.register_fake
def _(router_logits, group_ids, token_mask, num_groups, top_k, renormalize):
    n_tokens, n_experts = _check_gate(router_logits, group_ids, token_mask, num_groups, top_k)
    acc, ne = _acc_dtype(router_logits), num_groups * n_experts
    new = router_logits.new_empty
    return (new(n_tokens, top_k, dtype=acc), new(n_tokens, top_k, dtype=torch.int64), new(ne, dtype=torch.int64),
            new(ne, dtype=acc), new(num_groups, dtype=torch.int64))


@torch.library.custom_op("unif2ace::moe_gate_backward", mutates_args=())
def _moe_gate_backward(
    router_logits: Tensor, group_ids: Tensor, token_mask: Optional[Tensor], expert_ids: Tensor,
    group_counts: Tensor, grad_gates: Optional[Tensor], grad_prob_mean: Optional[Tensor], num_groups: int,
    top_k: int, renormalize: bool,
) -> Tensor:
    _check_gate(router_logits, group_ids, token_mask, num_groups, top_k)
    logits = router_logits.contiguous()
    grad = torch.empty_like(logits)
    acc = _acc_dtype(logits)
    gg = None if grad_gates is None else grad_gates.to(acc)
    gp = None if grad_prob_mean is None else grad_prob_mean.to(acc)
    _C.moe_gate_backward(
        dl(logits), dl(group_ids.contiguous()), _opt_dl(token_mask), num_groups, top_k, renormalize,
        dl(expert_ids.contiguous()), dl(group_counts.contiguous()), _opt_dl(gg), _opt_dl(gp), dl(grad),
        stream_of(logits),
    )
    return grad


@_moe_gate_backward.register_fake
def _(router_logits, group_ids, token_mask, expert_ids, group_counts, grad_gates, grad_prob_mean, num_groups, top_k,
      renormalize):
    return torch.empty_like(router_logits, memory_format=torch.contiguous_format)


def _gate_setup(ctx, inputs, output):
    router_logits, group_ids, token_mask, num_groups, top_k, renormalize = inputs
    ctx.opts = (num_groups, top_k, renormalize)
    ctx.save_for_backward(router_logits, group_ids, token_mask, output[1], output[4])


def _gate_backward(ctx, grad_gates, _g_ids, _g_counts, grad_prob_mean, _g_group_counts):
    router_logits, group_ids, token_mask, expert_ids, group_counts = ctx.saved_tensors
    num_groups, top_k, renormalize = ctx.opts
    grad = torch.ops.unif2ace.moe_gate_backward(
        router_logits, group_ids, token_mask, expert_ids, group_counts, grad_gates, grad_prob_mean, num_groups,
        top_k, renormalize,
    )
    return grad, None, None, None, None, None


_moe_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


def moe_gate(
    router_logits: Tensor,
    group_ids: Tensor,
    *,
    num_groups: int,
    top_k: int,
    renormalize: bool = True,
    token_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grouped softmax gating in one pass.

    router_logits [T, G·E] (fp32/bf16/fp16; fp64 on CPU); group_ids [T] int64: token t routes only among the E
    experts of its group g (global ids g·E .. g·E + E − 1). token_mask [T] bool (optional): tokens with False
    are routed normally but left out of the statistics (padding).

    Returns
      gates [T, k]            the softmax probabilities of the chosen experts within the token's group,
                              divided by their sum when `renormalize`; fp32 (fp64 for fp64 logits); differentiable
      expert_ids [T, k]       int64 global expert ids, by descending probability; ties go to the lower index
      expert_counts [G·E]     int64 number of (token, slot) pairs routed to each expert
      router_prob_mean [G·E]  mean router probability of each expert over the tokens of its group (0 for a group
                              without tokens); differentiable — the P of the balance loss
    The selection is made on the logits (the same order as on the probabilities, without rounding ties).
    """
    # The op layer takes int64: check the Python ints here, before the call converts them.
    _check_int(num_groups, "num_groups")
    _check_int(top_k, "top_k")
    gates, ids, counts, prob_mean, _ = torch.ops.unif2ace.moe_gate(
        router_logits, group_ids, token_mask, num_groups, top_k, renormalize
    )
    return gates, ids, counts, prob_mean


# ----------------------------------------------------------------------------------------------------------
# Permutation
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("unif2ace::moe_sort", mutates_args=())
def _moe_sort(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    ids = expert_ids.contiguous()
    dev, n = ids.device, ids.numel()
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
    sorted_slot = torch.empty(n, dtype=torch.int64, device=dev)
    ws = None
    if dev.type == "cuda":
        ws = torch.empty(-(-n // _C.moe_sort_block_slots()), num_experts + 1, dtype=torch.int64, device=dev)
    _C.moe_sort_slots(dl(ids), num_experts, dl(offsets), dl(sorted_slot), _opt_dl(ws), stream_of(ids))
    return offsets, sorted_slot


@_moe_sort.register_fake
def _(expert_ids, num_experts):
    return (expert_ids.new_empty(num_experts + 1, dtype=torch.int64),
            expert_ids.new_empty(expert_ids.numel(), dtype=torch.int64))


@torch.library.custom_op("unif2ace::moe_permute", mutates_args=())
def _moe_permute(x: Tensor, sorted_slot: Tensor, top_k: int) -> Tensor:
    x = x.contiguous()
    out = x.new_empty(sorted_slot.shape[0], x.shape[1])
    _C.moe_permute_rows(dl(x), dl(sorted_slot.contiguous()), top_k, dl(out), stream_of(x))
    return out


@_moe_permute.register_fake
def _(x, sorted_slot, top_k):
    return x.new_empty(sorted_slot.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output):
    _, sorted_slot, top_k = inputs
    ctx.top_k = top_k
    ctx.save_for_backward(sorted_slot)


def _permute_backward(ctx, grad):
    (sorted_slot,) = ctx.saved_tensors
    # Each token's k gathered rows summed back in the fixed order j = 0..k−1.
    return torch.ops.unif2ace.moe_unpermute(grad, None, sorted_slot, ctx.top_k), None, None


_moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)


def _slot_positions(sorted_slot: Tensor) -> Tensor:
    pos = torch.empty_like(sorted_slot)
    _C.moe_invert_permutation(dl(sorted_slot), dl(pos), stream_of(sorted_slot))
    return pos


@torch.library.custom_op("unif2ace::moe_unpermute", mutates_args=())
def _moe_unpermute(y_sorted: Tensor, gates: Optional[Tensor], sorted_slot: Tensor, top_k: int) -> Tensor:
    y_sorted, sorted_slot = y_sorted.contiguous(), sorted_slot.contiguous()
    out = y_sorted.new_empty(y_sorted.shape[0] // top_k, y_sorted.shape[1])
    pos = _slot_positions(sorted_slot)
    _C.moe_unpermute_sum(dl(y_sorted), dl(pos), _opt_dl(gates), top_k, dl(out), stream_of(y_sorted))
    return out


@_moe_unpermute.register_fake
def _(y_sorted, gates, sorted_slot, top_k):
    return y_sorted.new_empty(y_sorted.shape[0] // top_k, y_sorted.shape[1])


@torch.library.custom_op("unif2ace::moe_unpermute_backward", mutates_args=())
def _moe_unpermute_backward(grad_y: Tensor, y_sorted: Tensor, gates: Tensor, sorted_slot: Tensor
                            ) -> tuple[Tensor, Tensor]:
    grad_y, y_sorted, gates = grad_y.contiguous(), y_sorted.contiguous(), gates.contiguous()
    grad_rows = torch.empty_like(y_sorted)
    grad_gates = torch.empty_like(gates)
    _C.moe_unpermute_sum_backward(dl(grad_y), dl(y_sorted), dl(sorted_slot.contiguous()), dl(gates), dl(grad_rows),
                                  dl(grad_gates), stream_of(y_sorted))
    return grad_rows, grad_gates


@_moe_unpermute_backward.register_fake
def _(grad_y, y_sorted, gates, sorted_slot):
    return (torch.empty_like(y_sorted, memory_format=torch.contiguous_format),
            torch.empty_like(gates, memory_format=torch.contiguous_format))


def _unpermute_setup(ctx, inputs, output):
    y_sorted, gates, sorted_slot, top_k = inputs
    ctx.top_k = top_k
    ctx.has_gates = gates is not None
    ctx.save_for_backward(y_sorted if gates is not None else None, gates, sorted_slot)


def _unpermute_backward(ctx, grad_y):
    y_sorted, gates, sorted_slot = ctx.saved_tensors
    if not ctx.has_gates:
        return torch.ops.unif2ace.moe_permute(grad_y, sorted_slot, ctx.top_k), None, None, None
    grad_rows, grad_gates = torch.ops.unif2ace.moe_unpermute_backward(
        grad_y.to(y_sorted.dtype), y_sorted, gates, sorted_slot
    )
    return grad_rows, grad_gates, None, None


_moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def moe_sort(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """The expert-sorted order of the (token, slot) pairs of `expert_ids [T, k]` (int64 in [0, num_experts)), without
    moving any rows: (expert_offsets [num_experts + 1], sorted_slot [T·k]) as moe_dispatch returns them — what
    moe_experts needs."""
    if not isinstance(expert_ids, Tensor) or expert_ids.dim() != 2 or expert_ids.dtype != torch.int64:
        got = (f"{expert_ids.dtype} {list(expert_ids.shape)}" if isinstance(expert_ids, Tensor)
               else type(expert_ids).__name__)
        raise ValueError(f"expert_ids: expected a 2-D int64 tensor [T, k], got {got}")
    if expert_ids.shape[1] == 0:
        raise ValueError("expert_ids: top_k (its second dimension) must be positive")
    _check_int(num_experts, "num_experts")
    return torch.ops.unif2ace.moe_sort(expert_ids, num_experts)


def moe_dispatch(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the rows of `x [T, H]` into expert order for `expert_ids [T, k]` (int64 in [0, num_experts)).

    Returns (x_sorted [T·k, H], expert_offsets [num_experts + 1] int64, sorted_slot [T·k] int64), with
    x_sorted[i] = x[sorted_slot[i] // k] and expert e's rows at expert_offsets[e] : expert_offsets[e + 1], in
    ascending slot order (a stable sort). Differentiable w.r.t. x: the backward sums each token's k rows in the
    order j = 0..k−1.
    """
    _check_float(x, "x", 2)
    if not isinstance(expert_ids, Tensor) or expert_ids.dim() != 2:
        raise ValueError(f"expert_ids: expected a 2-D tensor [T, k], got "
                         f"{list(expert_ids.shape) if isinstance(expert_ids, Tensor) else type(expert_ids).__name__}")
    _check_index(expert_ids, "expert_ids", (x.shape[0], expert_ids.shape[1]), x.device)
    offsets, sorted_slot = moe_sort(expert_ids, num_experts)
    x_sorted = torch.ops.unif2ace.moe_permute(x, sorted_slot, expert_ids.shape[1])
    return x_sorted, offsets, sorted_slot


def moe_combine(y_sorted: Tensor, gates: Tensor, sorted_slot: Tensor) -> Tensor:
    """y[t] = Σ_j gates[t, j] · y_sorted[pos(t, j)] with pos the inverse of `sorted_slot`, summed in the order
    j = 0..k−1 in fp32 (fp64 for fp64 rows); y has y_sorted's dtype. gates [T, k] is used in fp32 (fp64).
    Differentiable w.r.t. y_sorted and gates (grad_gates[t, j] = ⟨dy_t, y_sorted[pos(t, j)]⟩)."""
    _check_float(y_sorted, "y_sorted", 2)
    _check_float(gates, "gates", 2)
    n_tokens, top_k = gates.shape
    if top_k == 0 or y_sorted.shape[0] != n_tokens * top_k:
        raise ValueError(f"y_sorted: expected {n_tokens * top_k} rows (gates is [{n_tokens}, {top_k}]), "
                         f"got {y_sorted.shape[0]}")
    if gates.device != y_sorted.device:
        raise ValueError(f"gates: must be on {y_sorted.device}, got {gates.device}")
    _check_index(sorted_slot, "sorted_slot", (n_tokens * top_k,), y_sorted.device)
    return torch.ops.unif2ace.moe_unpermute(y_sorted, gates.to(_acc_dtype(y_sorted)), sorted_slot, top_k)


# Raw kernel calls, shared by the custom ops below and by the fused layer (_ExpertLayer), which calls them directly:
# inside its own autograd node the custom-op layer would only add its dispatch cost (tens of microseconds per
# call, per expert).
def _gather_rows(src: Tensor, slots: Tensor, top_k: int) -> Tensor:
    """src[slots // top_k] through the permute kernel."""
    out = src.new_empty(slots.shape[0], src.shape[1])
    _C.moe_permute_rows(dl(src), dl(slots), top_k, dl(out), stream_of(src))
    return out


def _scatter_add_rows(out: Tensor, rows: Tensor, slots: Tensor, top_k: int, weights: Optional[Tensor]) -> None:
    _C.moe_scatter_add_rows(dl(out), dl(rows.contiguous()), dl(slots.contiguous()), top_k, _opt_dl(weights),
                            stream_of(rows))


def _gelu_tanh_backward_rows(pre: Tensor, d_hid: Tensor, row_weights: Optional[Tensor], with_row_dot: bool,
                             d_pre: Optional[Tensor] = None, with_hid_w: bool = True
                             ) -> tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    """d_pre: where to write it (None: a fresh tensor); it may be d_hid itself — the kernels read each element before
    they write it — for a caller that owns that (contiguous) tensor and needs it no more. with_hid_w=False skips
    hid_w (returned as None)."""
    pre, d_hid = pre.contiguous(), d_hid.contiguous()
    hid_w = torch.empty_like(pre) if with_hid_w else None
    d_pre = torch.empty_like(pre) if d_pre is None else d_pre
    row_dot = pre.new_empty(pre.shape[0], dtype=_acc_dtype(pre)) if with_row_dot else None
    _C.moe_gelu_tanh_backward_rows(dl(pre), dl(d_hid), _opt_dl(row_weights), _opt_dl(hid_w), dl(d_pre), _opt_dl(row_dot),
                                   stream_of(pre))
    return hid_w, d_pre, row_dot


def _bias_gelu_tanh_rows(pre: Tensor, bias: Tensor, row_expert: Tensor) -> Tensor:
    """In place pre += bias[row_expert]; returns gelu(pre) (tanh form) of the rounded sum. pre contiguous."""
    act = torch.empty_like(pre)
    _C.moe_bias_gelu_tanh_rows(dl(pre), dl(bias.contiguous()), dl(row_expert.contiguous()), dl(act), stream_of(pre))
    return act


@torch.library.custom_op("unif2ace::moe_bias_gelu_tanh_rows", mutates_args=())
def _moe_bias_gelu_tanh_rows(pre: Tensor, bias: Tensor, row_expert: Tensor) -> tuple[Tensor, Tensor]:
    out = pre.contiguous().clone()
    return out, _bias_gelu_tanh_rows(out, bias, row_expert)


@_moe_bias_gelu_tanh_rows.register_fake
def _(pre, bias, row_expert):
    return (torch.empty_like(pre, memory_format=torch.contiguous_format),
            torch.empty_like(pre, memory_format=torch.contiguous_format))


def moe_bias_gelu_tanh_rows(pre: Tensor, bias: Tensor, row_expert: Tensor) -> tuple[Tensor, Tensor]:
    """The grouped expert pass's first bias and activation in one pass: returns (pre + bias[row_expert] rounded to
    pre's dtype, GELU of it (tanh form)). pre [n, F]; bias [G, F] of pre's dtype; row_expert [n] int64 in [0, G)
    (checked on the CPU; on CUDA a row with an id outside gets no bias). Not differentiable (a building block of
    ops.moe_mlp's grouped pass, which calls the kernel in place)."""
    _check_float(pre, "pre", 2)
    _check_float(bias, "bias", 2)
    if bias.dtype != pre.dtype or bias.shape[1] != pre.shape[1] or bias.device != pre.device:
        raise ValueError(f"bias: expected a {pre.dtype} tensor [G, {pre.shape[1]}] on {pre.device}, got {bias.dtype} "
                         f"{list(bias.shape)} on {bias.device}")
    _check_index(row_expert, "row_expert", (pre.shape[0],), pre.device)
    return torch.ops.unif2ace.moe_bias_gelu_tanh_rows(pre, bias, row_expert)


@torch.library.custom_op("unif2ace::moe_scatter_add_rows", mutates_args=("out",))
def _moe_scatter_add_rows(out: Tensor, rows: Tensor, slots: Tensor, top_k: int, weights: Optional[Tensor]) -> None:
    _scatter_add_rows(out, rows, slots, top_k, weights)


@_moe_scatter_add_rows.register_fake
def _(out, rows, slots, top_k, weights):
    return None


def moe_scatter_add_rows_(out: Tensor, rows: Tensor, slots: Tensor, top_k: int,
                          weights: Optional[Tensor] = None) -> Tensor:
    """In place: out[slots[i] // top_k] += weights[slots[i]] · rows[i] for every row i (weights [T·k] flattened
    gates, or None for 1). `out [T, H]` is in the accumulation dtype (fp32; fp64 for fp64 rows). The slots must
    belong to distinct tokens — the rows of one expert do — so a combine that adds expert after expert sums each
    token's terms in ascending expert order, the same order on every run. Not differentiable (a building block
    of the fused expert layer's forward and backward). Returns `out`."""
    _check_float(rows, "rows", 2)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != rows.shape[1]:
        raise ValueError(f"out: expected a 2-D tensor [T, {rows.shape[1]}], got {list(getattr(out, 'shape', []))}")
    if out.dtype != _acc_dtype(rows) or not out.is_contiguous():
        raise ValueError(f"out: must be a contiguous {_acc_dtype(rows)} tensor (the accumulation dtype of "
                         f"{rows.dtype} rows), got {out.dtype}")
    _check_index(slots, "slots", (rows.shape[0],), rows.device)
    _check_int(top_k, "top_k")
    if weights is not None:
        _check_float(weights, "weights", 1)
        if weights.dtype != out.dtype or weights.shape[0] != out.shape[0] * top_k:
            raise ValueError(f"weights: expected a {out.dtype} tensor of shape [{out.shape[0] * top_k}], got "
                             f"{weights.dtype} {list(weights.shape)}")
    if out.device != rows.device or (weights is not None and weights.device != rows.device):
        raise ValueError(f"out and weights: must be on {rows.device}")
    torch.ops.unif2ace.moe_scatter_add_rows(out, rows, slots, top_k, weights)
    return out


@torch.library.custom_op("unif2ace::moe_gelu_tanh_backward_rows", mutates_args=())
def _moe_gelu_tanh_backward_rows(pre: Tensor, d_hid: Tensor, row_weights: Optional[Tensor]
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    return _gelu_tanh_backward_rows(pre, d_hid, row_weights, with_row_dot=True)


@_moe_gelu_tanh_backward_rows.register_fake
def _(pre, d_hid, row_weights):
    return (torch.empty_like(pre, memory_format=torch.contiguous_format),
            torch.empty_like(pre, memory_format=torch.contiguous_format),
            pre.new_empty(pre.shape[0], dtype=_acc_dtype(pre)))


def moe_gelu_tanh_backward_rows(pre: Tensor, d_hid: Tensor, row_weights: Optional[Tensor] = None
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """The fused expert's activation backward in one pass, for GELU's tanh form: with w = row_weights [n] (None: 1),
    returns hid_w = w·gelu(pre), d_pre = w·d_hid·gelu'(pre) and row_dot = Σ_f d_hid·gelu(pre) (the gate gradient
    less ⟨dy, b2⟩, in the accumulation dtype). pre, d_hid [n, F] of one dtype. Not differentiable."""
    _check_float(pre, "pre", 2)
    _check_float(d_hid, "d_hid", 2)
    if d_hid.shape != pre.shape or d_hid.dtype != pre.dtype or d_hid.device != pre.device:
        raise ValueError(f"d_hid: expected {pre.dtype} {list(pre.shape)} on {pre.device}, got {d_hid.dtype} "
                         f"{list(d_hid.shape)} on {d_hid.device}")
    if row_weights is not None:
        _check_float(row_weights, "row_weights", 1)
        if (row_weights.shape[0] != pre.shape[0] or row_weights.dtype != _acc_dtype(pre)
                or row_weights.device != pre.device):
            raise ValueError(f"row_weights: expected a {_acc_dtype(pre)} tensor [{pre.shape[0]}] on {pre.device}, "
                             f"got {row_weights.dtype} {list(row_weights.shape)} on {row_weights.device}")
    return torch.ops.unif2ace.moe_gelu_tanh_backward_rows(pre, d_hid, row_weights)


def balance_loss(expert_counts: Tensor, router_prob_mean: Tensor, num_groups: int) -> Tensor:
    """Σ_g E·Σ_e f_e·P_e (docs/design.md §5): f_e = expert_counts / (the group's routed (token, slot) pairs),
    P_e = router_prob_mean. A group without tokens contributes 0. Differentiable through router_prob_mean.
    Negative expert_counts raise ValueError on the CPU; CUDA counts are trusted (checking them would synchronise)."""
    _check_int(num_groups, "num_groups")
    if not isinstance(expert_counts, Tensor) or expert_counts.dim() != 1 or expert_counts.dtype != torch.int64:
        got = (f"{expert_counts.dtype} {list(expert_counts.shape)}" if isinstance(expert_counts, Tensor)
               else type(expert_counts).__name__)
        raise ValueError(f"expert_counts: expected a 1-D int64 tensor [G·E], got {got}")
    _check_float(router_prob_mean, "router_prob_mean", 1)
    n = expert_counts.shape[0]
    if n == 0 or n % num_groups != 0:
        raise ValueError(f"expert_counts: the length ({n}) must be a positive multiple of num_groups "
                         f"({num_groups})")
    if router_prob_mean.shape != expert_counts.shape:
        raise ValueError(f"router_prob_mean: expected shape [{n}] (that of expert_counts), "
                         f"got {list(router_prob_mean.shape)}")
    # Negative counts (not from moe_gate) would make the fractions meaningless. The check reads the data: free on the
    # CPU; on CUDA it would be a host synchronisation, so CUDA counts are trusted (moe_gate never makes negative ones).
    if expert_counts.device.type == "cpu" and not torch.compiler.is_compiling() and bool((expert_counts < 0).any()):
        raise ValueError(f"expert_counts: must be non-negative, found {int(expert_counts.min())}")
    counts = expert_counts.view(num_groups, -1).to(router_prob_mean.dtype)
    n_experts = counts.shape[1]
    frac = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return n_experts * (frac * router_prob_mean.view(num_groups, -1)).sum()


# The expert pass lives in its own module, moe_mlp (it builds on the helpers above; a module named moe_experts would be
# shadowed by the function of that name in unif2ace.ops); re-exported so existing imports keep working.
from unif2ace.ops.moe_mlp import grouped_mlp, moe_experts  # noqa: E402,F401
