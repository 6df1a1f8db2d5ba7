"""The experts' MLPs of the token MoE over the expert-sorted rows (docs/design.md §5): grouped_mlp and moe_experts.

Two implementations of one contract (`impl=`):
  "fused"    the CPU default. One expert at a time over host-side row ranges (expert_offsets read on the host, free on
             the CPU): per-expert gathers, products and scatter-adds, without the [T·k, H] intermediates.
  "grouped"  the CUDA default. Every product grouped over all the experts at once and driven by device-side offsets:
             a fixed number of launches whatever the number of experts, no host synchronisation in the forward or the
             backward, so a layer built on it can run under torch.cuda.set_sync_debug_mode("error") and be captured in
             a CUDA graph. Its grouped products (grouped_mm_rows, grouped_mm_ragged_k) call torch._grouped_mm where it
             is covered (CUDA bf16 on sm90/sm100, widths multiple of 8, 16-byte aligned operands); elsewhere they loop
             over the experts with host row ranges — free on the CPU (where this path is tested against the fused one and
             the reference loop), one synchronisation per pass on CUDA for the dtypes and cards torch._grouped_mm does
             not cover.

Rows of the grouped pass: x_sorted[i] = x[sorted_slot[i] // k]; expert e owns rows expert_offsets[e] : expert_offsets[e+1].
Rows past expert_offsets[-1] (slots whose expert id was invalid, CUDA only) are computed with the last expert's weights
— so no product leaves memory unwritten — and enter every sum with weight 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from unif2ace._core import _C, dl, stream_of
from unif2ace.ops.moe import (
    _acc_dtype,
    _bias_gelu_tanh_rows,
    _check_float,
    _check_index,
    _gather_rows,
    _gelu_tanh_backward_rows,
    _scatter_add_rows,
    _slot_positions,
)

IMPLS = ("fused", "grouped")
_ACTIVATIONS = ("gelu_tanh", "gelu")


def _act(h: Tensor, activation: str) -> Tensor:
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _act_backward(grad: Tensor, h: Tensor, activation: str) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _default_impl(x: Tensor, impl: Optional[str]) -> str:
    if impl is None:
        return "grouped" if x.device.type == "cuda" else "fused"
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS} or None, got {impl!r}")
    return impl


# ----------------------------------------------------------------------------------------------------------
# Fused pass: one expert at a time over host row ranges
# ----------------------------------------------------------------------------------------------------------
def _expert_weight_grads(w1: Tensor, w2: Tensor, bounds: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Uninitialised (gw1, gb1, gw2, gb2) for the stacked expert weights, with the slices of experts without rows
    zeroed: the backward passes write every other slice in full."""
    gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
    gb1 = w1.new_empty(w1.shape[0], w1.shape[1])
    gb2 = w2.new_empty(w2.shape[0], w2.shape[1])
    for e, (a, b) in enumerate(bounds):
        if b == a:
            for grad in (gw1, gb1, gw2, gb2):
                grad[e].zero_()
    return gw1, gb1, gw2, gb2


class _FusedMLP(torch.autograd.Function):
    """Per-expert 2-matrix MLPs over contiguous row ranges. Saves only the pre-activation [N, F] (the activation is
    recomputed in the backward) and writes every weight gradient straight into its slice of the stacked gradient."""

    @staticmethod
    def forward(ctx, x, bounds, activation, w1, b1, w2, b2):
        n, f = x.shape[0], w1.shape[1]
        pre = x.new_zeros(n, f) if bounds[-1][1] < n else x.new_empty(n, f)
        out = x.new_zeros(n, w2.shape[1]) if bounds[-1][1] < n else x.new_empty(n, w2.shape[1])
        for e, (a, b) in enumerate(bounds):
            if b == a:
                continue
            torch.addmm(b1[e], x[a:b], w1[e].t(), out=pre[a:b])
            torch.addmm(b2[e], _act(pre[a:b], activation), w2[e].t(), out=out[a:b])
        ctx.bounds, ctx.activation = bounds, activation
        ctx.save_for_backward(x, pre, w1, w2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, pre, w1, w2 = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # Every row and every expert with tokens is written below; only the rest is zeroed.
        gx = torch.empty_like(x)
        gx[ctx.bounds[-1][1]:].zero_()
        gw1, gb1, gw2, gb2 = _expert_weight_grads(w1, w2, ctx.bounds)
        for e, (a, b) in enumerate(ctx.bounds):
            if b == a:
                continue
            dy, h = grad_out[a:b], pre[a:b]
            torch.mm(dy.t(), _act(h, ctx.activation), out=gw2[e])
            torch.sum(dy, 0, out=gb2[e])
            dh = _act_backward(torch.mm(dy, w2[e]), h, ctx.activation)
            torch.mm(dh.t(), x[a:b], out=gw1[e])
            torch.sum(dh, 0, out=gb1[e])
            torch.mm(dh, w1[e], out=gx[a:b])
        return gx, None, None, gw1, gb1, gw2, gb2


class _FusedExperts(torch.autograd.Function):
    """Dispatch, the experts' MLPs and the gate-weighted combine as one autograd node, one expert at a time.

    Expert e gathers its token rows (x[slot // k] for its slots), runs its MLP and adds gate · output straight into
    the [T, H] result (moe_scatter_add_rows), so the [T·k, H] sorted copies of x, of the expert outputs and of
    their gradients are never stored; the only [T·k, ·] tensor kept for the backward is the experts' hidden
    pre-activation [T·k, F], and not even that with `recompute` (one more x·W1ᵀ product per expert in the backward).

    The gate gradient uses ⟨dy, MLP(x)⟩ = ⟨dy·W2, act(pre)⟩ + ⟨dy, b2⟩, so the expert outputs need not be kept
    for it. Summation order: each token's terms are added in ascending expert order, on every run.
    """

    @staticmethod
    def forward(ctx, x, gates, sorted_slot, bounds, top_k, activation, recompute, w1, b1, w2, b2):
        acc = _acc_dtype(x)
        y = torch.zeros(x.shape, dtype=acc, device=x.device)
        weights = None if gates is None else gates.reshape(-1)
        # One buffer for every expert's pre-activation (kept for the backward): per-expert tensors would leave the
        # heap fragmented between the transient rows of successive experts.
        pre_all = None if recompute else x.new_empty(bounds[-1][1] if bounds else 0, w1.shape[1])
        for e, (a, b) in enumerate(bounds):
            if b == a:
                continue
            slots = sorted_slot[a:b]
            xe = _gather_rows(x, slots, top_k)
            pre = torch.addmm(b1[e], xe, w1[e].t(), out=None if recompute else pre_all[a:b])
            ye = torch.addmm(b2[e], _act(pre, activation), w2[e].t())
            _scatter_add_rows(y, ye, slots, top_k, weights)
        ctx.bounds, ctx.top_k, ctx.activation, ctx.recompute = bounds, top_k, activation, recompute
        ctx.has_gates = gates is not None
        ctx.save_for_backward(x, gates, sorted_slot, w1, b1, w2, b2, pre_all)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        # The forward ran with autocast off, in the dtype of its inputs; so does the backward, whatever the caller's
        # autocast state during .backward().
        with torch.autocast(grad_y.device.type, enabled=False):
            return _FusedExperts._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        x, gates, sorted_slot, w1, b1, w2, b2, pre_all = ctx.saved_tensors
        k, act_name = ctx.top_k, ctx.activation
        acc = _acc_dtype(x)
        dy = grad_y.to(x.dtype).contiguous()
        need_x = ctx.needs_input_grad[0]
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        weights = gates.reshape(-1) if ctx.has_gates else None
        g_gates = torch.zeros_like(weights) if ctx.has_gates else None
        gw1, gb1, gw2, gb2 = _expert_weight_grads(w1, w2, ctx.bounds)
        for e, (a, b) in enumerate(ctx.bounds):
            if b == a:
                continue
            slots = sorted_slot[a:b]
            xe = _gather_rows(x, slots, k)
            dye = _gather_rows(dy, slots, k)
            pre = torch.addmm(b1[e], xe, w1[e].t()) if ctx.recompute else pre_all[a:b]
            d_hid = torch.mm(dye, w2[e])
            # d gate = ⟨dy_t, act(pre)·W2ᵀ + b2⟩ without the expert output: ⟨dy_t·W2, act(pre)⟩ + ⟨dy_t, b2⟩.
            we = None if weights is None else weights[slots]
            if act_name == "gelu_tanh":
                # One pass: gate-weighted activation (for the W2 gradient), weighted activation backward, row dots.
                hid_w, d_pre, row_dot = _gelu_tanh_backward_rows(pre, d_hid, we, with_row_dot=we is not None)
            else:
                # The erf form has no fused kernel (cpu_math.h has no vectorisable erf): the same quantities from
                # torch's activation ops.
                hid = _act(pre, act_name)
                row_dot = None if we is None else (d_hid.to(acc) * hid.to(acc)).sum(1)
                hid_w = hid if we is None else hid * we.to(x.dtype)[:, None]
                d_pre = _act_backward(d_hid if we is None else d_hid * we.to(x.dtype)[:, None], pre, act_name)
            torch.mm(dye.t(), hid_w, out=gw2[e])
            if we is None:
                torch.sum(dye, 0, out=gb2[e])
            else:
                g_gates[slots] = row_dot + dye.to(acc) @ b2[e].to(acc)
                torch.mv(dye.t(), we.to(x.dtype), out=gb2[e])
            torch.mm(d_pre.t(), xe, out=gw1[e])
            torch.sum(d_pre, 0, out=gb1[e])
            if need_x:
                _scatter_add_rows(gx, torch.mm(d_pre, w1[e]), slots, k, None)
        if gx is not None and gx.dtype != x.dtype:
            gx = gx.to(x.dtype)
        g_gates = None if g_gates is None else g_gates.view(gates.shape)
        return gx, g_gates, None, None, None, None, None, gw1, gb1, gw2, gb2



# ----------------------------------------------------------------------------------------------------------
# Grouped pass: device-side offsets, a fixed number of launches
# ----------------------------------------------------------------------------------------------------------
# Tests set this to "torch" to run the torch._grouped_mm call layouts on the CPU (forward calls only: the backward
# below calls it directly too, never through its autograd), or to "loop".
_FORCE_GROUPED_MM: Optional[str] = None


def _grouped_mm_backend(n_rows: int, mats: tuple) -> str:
    """"torch" where torch._grouped_mm runs as one device-driven kernel for these operands (x, w1, w2), else "loop"."""
    x = mats[0]
    if _FORCE_GROUPED_MM is not None:
        if _FORCE_GROUPED_MM == "loop":
            return "loop"
    elif (x.device.type != "cuda" or x.dtype != torch.bfloat16
          or torch.cuda.get_device_capability(x.device)[0] not in (9, 10)):
        return "loop"
    if n_rows == 0 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not hasattr(torch, "_grouped_mm"):
        return "loop"
    # Its TMA loads need 16-byte aligned bases and leading strides: widths H and F that are multiples of 16 bytes.
    align = 16 // x.element_size()
    if any(t.data_ptr() % 16 or t.shape[-1] % align or t.shape[-2] % align for t in mats[1:]):
        return "loop"
    return "torch"


class _Groups:
    """The expert groups of the sorted rows, on the device: group ends (int32, what torch._grouped_mm takes), the
    expert of every row, which rows are real (before expert_offsets[-1]) and which experts have rows. The host row
    ranges exist only for the looping backend (a host read of the offsets: free on the CPU, a sync on CUDA)."""

    def __init__(self, expert_offsets: Tensor, n_rows: int, backend: str):
        dev = expert_offsets.device
        self.n_experts, self.backend = expert_offsets.shape[0] - 1, backend
        rows = torch.arange(n_rows, device=dev)
        self.valid = rows < expert_offsets[-1]
        # The last group stretched to the end of the rows: the rows past expert_offsets[-1] get the last expert's
        # (finite) products instead of unwritten memory, and weight 0 wherever they would count.
        ends = expert_offsets[1:].clone()
        ends[-1:].fill_(n_rows)  # a fill kernel: no host-to-device copy
        self.ends32 = ends.to(torch.int32)
        self.row_expert = torch.searchsorted(ends, rows, right=True)
        self.has_rows = expert_offsets[1:] > expert_offsets[:-1]
        self.bounds = None
        if backend == "loop":
            offs = [0] + ends.tolist()  # host read (a sync on CUDA: the documented fallback)
            self.bounds = tuple(zip(offs[:-1], offs[1:]))


def grouped_mm_rows(a: Tensor, b: Tensor, groups: _Groups) -> Tensor:
    """out[i] = a[i] @ b[e] for every row i of group e: a [N, K], b [G, K, M] (a transposed view is fine) → [N, M]."""
    if groups.backend == "torch":
        return torch._grouped_mm(a, b, groups.ends32)
    out = a.new_empty(a.shape[0], b.shape[2])
    for e, (lo, hi) in enumerate(groups.bounds):
        if hi > lo:
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
    return out


def grouped_mm_ragged_k(a_t: Tensor, b: Tensor, groups: _Groups) -> Tensor:
    """out[e] = a_t[:, rows of e] @ b[rows of e]: the products summed over each group's rows (the weight gradients).
    a_t [M, N] (the transposed view of an [N, M] tensor), b [N, P] → [G, M, P]; zero for a group without rows."""
    if groups.backend == "torch":
        out = torch._grouped_mm(a_t, b, groups.ends32)
        # A group with no rows is a product over an empty K: set it to zero here rather than rely on what the kernel
        # writes for K = 0.
        return out.masked_fill_(~groups.has_rows[:, None, None], 0)
    out = a_t.new_empty(groups.n_experts, a_t.shape[0], b.shape[1])
    for e, (lo, hi) in enumerate(groups.bounds):
        if hi > lo:
            torch.mm(a_t[:, lo:hi], b[lo:hi], out=out[e])
        else:
            out[e].zero_()
    return out


def _segment_sums(rows: Tensor, groups: _Groups) -> Tensor:
    """[G, W]: the sum of each group's rows (the first bias's gradient), rows past expert_offsets[-1] left out. One
    product with the one-hot [N, G] matrix of the rows' experts: a fixed summation order (no atomics), no host read."""
    onehot = groups.row_expert[:, None] == torch.arange(groups.n_experts, device=rows.device)
    return (onehot & groups.valid[:, None]).to(rows.dtype).t().mm(rows)


def _first_layer(x_sorted: Tensor, w1: Tensor, b1: Tensor, groups: _Groups, activation: str
                 ) -> tuple[Tensor, Tensor]:
    """(pre, act(pre)) with pre = x_sorted[i] @ w1[e]ᵀ + b1[e] for the rows of group e: the bias and the activation
    in one pass over pre for the tanh form (moe_bias_gelu_tanh_rows), torch's ops for the erf form."""
    pre = grouped_mm_rows(x_sorted, w1.transpose(1, 2), groups)
    if activation == "gelu_tanh":
        return pre, _bias_gelu_tanh_rows(pre, b1, groups.row_expert)
    pre.add_(b1.index_select(0, groups.row_expert))
    return pre, _act(pre, activation)


def _token_expert_weights(slot_w: Tensor, slot_expert: Tensor, top_k: int, n_experts: int) -> Tensor:
    """[T, G·E]: each token's slot weights placed in the columns of the slots' experts (a sum over the k slots in a
    fixed order: no scatter, no atomics; slots of weight 0 add nothing wherever they point)."""
    n_tokens = slot_w.shape[0] // top_k
    experts = torch.arange(n_experts, device=slot_w.device)
    onehot = slot_expert.view(n_tokens, top_k, 1) == experts
    return (slot_w.view(n_tokens, top_k, 1) * onehot).sum(1)


def _combine(rows: Tensor, slot_pos: Tensor, slot_weights: Optional[Tensor], top_k: int) -> Tensor:
    """y[t] = Σ_j w[t·k + j] · rows[slot_pos[t·k + j]], in the order j = 0..k−1 (the unpermute kernel)."""
    out = rows.new_empty(rows.shape[0] // top_k, rows.shape[1])
    weights = None if slot_weights is None else dl(slot_weights.view(out.shape[0], top_k))
    _C.moe_unpermute_sum(dl(rows), dl(slot_pos), weights, top_k, dl(out), stream_of(rows))
    return out


class _GroupedExperts(torch.autograd.Function):
    """Gather, the experts' MLPs as grouped products, and the gate-weighted combine as one autograd node.

    Forward: x_sorted = x[slot // k] (permute kernel); pre = x_sorted·W1[e]ᵀ, then + b1[e] and act in one pass
    (moe_bias_gelu_tanh_rows); out = act(pre)·W2[e]ᵀ;
    y[t] = Σ_j gate[t, j]·out[pos(t, j)] (unpermute kernel: fixed order, fp32 accumulation, no atomics) + the b2
    term Σ_j gate[t, j]·b2[e_j] as one [T, G·E]·[G·E, H] product added to y.
    Kept for the backward: x, the gates and the row order (all of which the caller holds anyway), the rows' weights
    [T·k], the tokens' weights by expert [T, G·E] and pre [T·k, F] (nothing of size T·k·F with recompute, which
    redoes the first product). x_sorted, act(pre) and out are not kept: the backward gathers x again (one [T·k, H]
    row copy) and recomputes act inside the fused activation-backward kernel.
    Backward: dy_sorted = dy[slot // k]; the W2 gradient dy_sortedᵀ·(w·act(pre)); d_hid = dy_sorted·W2[e]; one fused
    pass gives d_pre = w·d_hid·act'(pre) (over d_hid) and the gate gradient's ⟨d_hid, act(pre)⟩ (+ ⟨dy, b2[e]⟩ from a
    [T, G·E] product), so the expert outputs are never stored; weight gradients as ragged-K grouped products, bias gradients
    as one-hot products (b2's: token weights·dy; deterministic), dx = unweighted combine of d_pre·W1[e].
    """

    @staticmethod
    def forward(ctx, x, gates, sorted_slot, expert_offsets, top_k, activation, recompute, backend, w1, b1, w2, b2):
        n = sorted_slot.shape[0]
        groups = _Groups(expert_offsets, n, backend)
        slot_pos = _slot_positions(sorted_slot)
        acc = _acc_dtype(x)
        # The weight of each sorted row: its slot's gate (1 without gates), 0 past expert_offsets[-1].
        row_w = groups.valid.to(acc)
        if gates is not None:
            row_w.mul_(gates.reshape(-1).index_select(0, sorted_slot))
        slot_w = torch.empty_like(row_w).scatter_(0, sorted_slot, row_w)
        x_sorted = _gather_rows(x, sorted_slot, top_k)
        pre, hid = _first_layer(x_sorted, w1, b1, groups, activation)
        del x_sorted
        out = grouped_mm_rows(hid, w2.transpose(1, 2), groups)
        del hid
        # The second bias after the combine, as one small product: Σ_j w_j·b2[e_j] = token_w·b2 with token_w [T, G·E]
        # each token's weights by expert — instead of a pass over the [T·k, H] expert outputs.
        token_w = _token_expert_weights(slot_w, groups.row_expert.index_select(0, slot_pos), top_k, groups.n_experts)
        y = torch.addmm(_combine(out, slot_pos, slot_w, top_k), token_w.to(x.dtype), b2)
        ctx.groups, ctx.top_k, ctx.activation, ctx.recompute = groups, top_k, activation, recompute
        ctx.has_gates = gates is not None
        ctx.save_for_backward(x, gates, sorted_slot, slot_pos, row_w, token_w, w1, b1, w2, b2,
                              None if recompute else pre)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            return _GroupedExperts._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y):
        x, gates, sorted_slot, slot_pos, row_w, token_w, w1, b1, w2, b2, pre = ctx.saved_tensors
        groups, k, act_name = ctx.groups, ctx.top_k, ctx.activation
        acc = _acc_dtype(x)
        dy = grad_y.to(x.dtype).contiguous()
        # The [T·k, ·] temporaries live one after another to keep the peak low: pre (saved or recomputed), then
        # w·act(pre) and dy's sorted copy for the W2 gradient, then d_hid in place of w·act, the activation backward
        # writing d_pre over d_hid; x is gathered again only after dy's sorted copy is freed.
        if pre is None:
            pre = _first_layer(_gather_rows(x, sorted_slot, k), w1, b1, groups, act_name)[0]
        # act from pre by torch's op on both paths, so that recomputing gives the same bits.
        hid_w = _act(pre, act_name).mul_(row_w.to(x.dtype)[:, None])
        dy_sorted = _gather_rows(dy, sorted_slot, k)
        gw2 = grouped_mm_ragged_k(dy_sorted.t(), hid_w, groups)
        del hid_w
        gb2 = token_w.t().to(x.dtype).mm(dy)
        d_hid = grouped_mm_rows(dy_sorted, w2, groups)
        del dy_sorted
        if act_name == "gelu_tanh":
            _, d_pre, row_dot = _gelu_tanh_backward_rows(pre, d_hid, row_w, ctx.has_gates, d_pre=d_hid,
                                                         with_hid_w=False)
        else:
            # The erf form has no fused kernel: the same quantities from torch's activation ops.
            row_dot = (d_hid.to(acc) * _act(pre, act_name).to(acc)).sum(1) if ctx.has_gates else None
            d_pre = _act_backward(d_hid.mul_(row_w.to(x.dtype)[:, None]), pre, act_name)
        del d_hid, pre
        g_gates = None
        if ctx.has_gates:
            # d gate = ⟨dy_t, act(pre)·W2ᵀ + b2⟩ = ⟨dy_t·W2, act(pre)⟩ + ⟨dy_t, b2⟩, 0 for rows past the last offset.
            dy_b2 = dy.to(acc).mm(b2.to(acc).t())                                   # [T, G·E]
            token = torch.div(sorted_slot, k, rounding_mode="floor")
            row_g = row_dot + dy_b2.reshape(-1).index_select(0, token * groups.n_experts + groups.row_expert)
            row_g = torch.where(groups.valid, row_g, 0)
            g_gates = torch.empty_like(row_g).scatter_(0, sorted_slot, row_g).view(gates.shape)
        x_sorted = _gather_rows(x, sorted_slot, k)
        gw1 = grouped_mm_ragged_k(d_pre.t(), x_sorted, groups)
        gb1 = _segment_sums(d_pre, groups)
        del x_sorted
        gx = _combine(grouped_mm_rows(d_pre, w1, groups), slot_pos, None, k) if ctx.needs_input_grad[0] else None
        return gx, g_gates, None, None, None, None, None, None, gw1, gb1, gw2, gb2


def _check_expert_weights(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x_name: str) -> int:
    """Checks the stacked expert weights against x [·, H]; returns the number of experts."""
    _check_float(w1, "w1", 3)
    n_exp, f, h = w1.shape
    if n_exp == 0:
        raise ValueError("w1: needs at least one expert")
    if h != x.shape[1]:
        raise ValueError(f"w1: expected [{n_exp}, F, {x.shape[1]}] (the width of {x_name}), got {list(w1.shape)}")
    _check_float(w2, "w2", 3)
    h_out = w2.shape[1]
    for name, t, shape in (("b1", b1, (n_exp, f)), ("w2", w2, (n_exp, h_out, f)), ("b2", b2, (n_exp, h_out))):
        _check_float(t, name, len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: must have the dtype and device of {x_name} ({x.dtype}, {x.device}), got "
                             f"{t.dtype}, {t.device}")
    return n_exp


def _check_offsets(expert_offsets: Tensor, n_exp: int, n_rows: int, device: torch.device) -> Optional[tuple]:
    """Checks expert_offsets' dtype and shape; on the CPU also its values (a host read, free there), returning the
    experts' (start, end) row ranges. On CUDA the values are trusted (moe_sort makes them) and None is returned:
    reading them would synchronise."""
    if not isinstance(expert_offsets, Tensor) or expert_offsets.dtype != torch.int64:
        got = expert_offsets.dtype if isinstance(expert_offsets, Tensor) else type(expert_offsets).__name__
        raise ValueError(f"expert_offsets: expected an int64 tensor, got {got}")
    if expert_offsets.shape != (n_exp + 1,):
        raise ValueError(f"expert_offsets: expected shape [{n_exp + 1}], got {list(expert_offsets.shape)}")
    if expert_offsets.device != device:
        raise ValueError(f"expert_offsets: must be on {device}, got {expert_offsets.device}")
    if device.type != "cpu":
        return None
    offs = expert_offsets.tolist()
    if offs[0] != 0 or offs[-1] > n_rows or any(a > b for a, b in zip(offs[:-1], offs[1:])):
        raise ValueError(f"expert_offsets: must rise from 0 to at most the number of rows ({n_rows}), got {offs}")
    return tuple(zip(offs[:-1], offs[1:]))


def _host_bounds(expert_offsets: Tensor, n_exp: int, n_rows: int, device: torch.device) -> tuple:
    """The fused pass's host row ranges: checked on the CPU; on CUDA a plain host read (one synchronisation)."""
    bounds = _check_offsets(expert_offsets, n_exp, n_rows, device)
    if bounds is None:
        offs = expert_offsets.tolist()
        bounds = tuple(zip(offs[:-1], offs[1:]))
    return bounds


def grouped_mlp(
    x_sorted: Tensor,
    expert_offsets: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str = "gelu_tanh",
    *,
    impl: Optional[str] = None,
) -> Tensor:
    """Expert e's MLP `act(x @ w1[e]ᵀ + b1[e]) @ w2[e]ᵀ + b2[e]` on its rows expert_offsets[e] : expert_offsets[e+1]
    of `x_sorted [N, H]`. w1 [NE, F, H], b1 [NE, F], w2 [NE, H_out, F], b2 [NE, H_out]. Rows past
    expert_offsets[-1] (slots whose expert id was invalid, possible on CUDA only) come out as zeros.

    impl: None (grouped on CUDA, fused on the CPU), "fused" (per-expert products over host row ranges: one host read
    of expert_offsets, a synchronisation on CUDA) or "grouped" (device-driven grouped products, no synchronisation
    where torch._grouped_mm covers the operands; see the module docstring).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _check_float(x_sorted, "x_sorted", 2)
    impl = _default_impl(x_sorted, impl)
    n_rows = x_sorted.shape[0]
    n_exp = _check_expert_weights(x_sorted, w1, b1, w2, b2, "x_sorted")
    if impl == "fused":
        bounds = _host_bounds(expert_offsets, n_exp, n_rows, x_sorted.device)
        return _FusedMLP.apply(x_sorted.contiguous(), bounds, activation, w1, b1, w2, b2)
    _check_offsets(expert_offsets, n_exp, n_rows, x_sorted.device)
    # The grouped expert pass with the identity order (k = 1, weights 1): rows past the last offset get weight 0.
    identity = torch.arange(n_rows, device=x_sorted.device)
    x_sorted = x_sorted.contiguous()
    backend = _grouped_mm_backend(n_rows, (x_sorted, w1, w2))
    return _GroupedExperts.apply(x_sorted, None, identity, expert_offsets, 1, activation, False, backend,
                                 w1, b1, w2, b2)


def moe_experts(
    x: Tensor,
    gates: Optional[Tensor],
    sorted_slot: Tensor,
    expert_offsets: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    activation: str = "gelu_tanh",
    *,
    recompute: bool = False,
    impl: Optional[str] = None,
) -> Tensor:
    """The routed experts of a token MoE in one step: y[t] = Σ_j gates[t, j] · MLP_{e(t,j)}(x[t]).

    x [T, H]; gates [T, k] (from moe_gate, differentiable) or None for weights of 1; sorted_slot [T·k] and
    expert_offsets [NE + 1] from moe_sort / moe_dispatch (expert e owns sorted rows expert_offsets[e] :
    expert_offsets[e + 1]); expert weights as in grouped_mlp. Equal to
    moe_combine(grouped_mlp(moe_dispatch(x)...), gates, sorted_slot) up to rounding and the order of the k-term sums.
    Differentiable w.r.t. x, gates and the expert weights. Deterministic.

    impl: None (the default for the device), "fused" or "grouped" (module docstring).
      fused (CPU default): one expert at a time, reading expert_offsets on the host (a sync on CUDA); keeps x, the
        gates and the experts' hidden pre-activations [T·k, F] for the backward.
      grouped (CUDA default): grouped products driven by device-side offsets, no host synchronisation where
        torch._grouped_mm covers the operands (CUDA bf16, sm90/sm100); keeps x, the gates, the row weights [T·k]
        and the pre-activations [T·k, F].
    recompute=True keeps no pre-activations and redoes the first product in the backward.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    _check_float(x, "x", 2)
    impl = _default_impl(x, impl)
    n_tokens = x.shape[0]
    if gates is not None:
        _check_float(gates, "gates", 2)
        if gates.shape[0] != n_tokens or gates.shape[1] == 0 or gates.device != x.device:
            raise ValueError(f"gates: expected [{n_tokens}, k] on {x.device}, got {list(gates.shape)} on "
                             f"{gates.device}")
        top_k = gates.shape[1]
    else:
        if not isinstance(sorted_slot, Tensor):
            raise ValueError(f"sorted_slot: expected a tensor, got {type(sorted_slot).__name__}")
        top_k = sorted_slot.numel() // n_tokens if n_tokens else 1
        if top_k == 0 or sorted_slot.numel() != n_tokens * top_k:
            raise ValueError(f"sorted_slot: without gates its length ({sorted_slot.numel()}) must be a positive "
                             f"multiple of the number of tokens ({n_tokens})")
    _check_index(sorted_slot, "sorted_slot", (n_tokens * top_k,), x.device)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the whole pass runs in the autocast dtype: x and the weights are cast here (the casts are
        # ordinary autograd ops, so fp32 master weights get fp32 gradients) and autocast is off inside.
        dt = torch.get_autocast_dtype(device_type)
        x, w1, b1, w2, b2 = (t.to(dt) for t in (x, w1, b1, w2, b2))
    if gates is not None:
        gates = gates.to(_acc_dtype(x)).contiguous()  # after any autocast cast of x: the dtype the kernels expect
    n_exp = _check_expert_weights(x, w1, b1, w2, b2, "x")
    if w2.shape[1] != x.shape[1]:
        raise ValueError(f"w2: the experts' output width ({w2.shape[1]}) must equal the width of x ({x.shape[1]})")
    x, sorted_slot = x.contiguous(), sorted_slot.contiguous()
    with torch.autocast(device_type, enabled=False):
        if impl == "fused":
            bounds = _host_bounds(expert_offsets, n_exp, n_tokens * top_k, x.device)
            return _FusedExperts.apply(x, gates, sorted_slot, bounds, top_k, activation, bool(recompute),
                                       w1, b1, w2, b2)
        _check_offsets(expert_offsets, n_exp, n_tokens * top_k, x.device)
        n_slots = sorted_slot.numel()
        if x.device.type == "cpu" and n_slots and (
                bool(((sorted_slot < 0) | (sorted_slot >= n_slots)).any())
                or not torch.equal(torch.bincount(sorted_slot, minlength=n_slots), torch.ones_like(sorted_slot))):
            # Free on the CPU; on CUDA the kernels stay in bounds instead (a check would synchronise).
            raise ValueError("sorted_slot: must be a permutation of the slots 0 .. T·k − 1")
        backend = _grouped_mm_backend(n_tokens * top_k, (x, w1, w2))
        return _GroupedExperts.apply(x, gates, sorted_slot, expert_offsets, top_k, activation, bool(recompute),
                                     backend, w1, b1, w2, b2)
