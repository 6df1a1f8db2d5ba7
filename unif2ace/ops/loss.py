"""D3Diff loss ops (DESIGN §4) as torch custom ops around the C++/CUDA row kernels.

Layers, from the bottom:
  row_lse_target        per-row log-sum-exp and target logit (the only forward statistics the loss needs)
  softmax_onehot_grad   its backward: coef_softmax·softmax(z) − coef_onehot·onehot(y), optionally in place
  d3diff_loss           the loss on given logits [N, K], differentiated through row_lse_target
  linear_d3diff_loss    the loss fused with the output projection: logits are made chunk by chunk and turned
                        into their gradient in place, so the [N, K] matrix never exists in full
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from unif2ace._core import _C, dl, stream_of
from unif2ace.ops.reference import REDUCTIONS, SCHEDULES, SCORES, time_weight

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_rows(logits: Tensor, target: Tensor, logits_name: str = "logits") -> None:
    if logits.dim() != 2:
        raise ValueError(f"{logits_name}: expected a 2-D tensor [N, K], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise ValueError(f"{logits_name}: dtype must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target: expected shape [{logits.shape[0]}], got {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target: dtype must be int64, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target: must be on {logits.device}, got {target.device}")


def _check_options(score: str, schedule: str, reduction: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_gamma(gamma: Tensor, n: int, device: torch.device) -> None:
    if gamma.dim() != 1 or gamma.shape[0] != n:
        raise ValueError(f"gamma: expected shape [{n}], got {tuple(gamma.shape)}")
    if not gamma.is_floating_point():
        raise ValueError(f"gamma: must be a floating-point tensor, got {gamma.dtype}")
    if gamma.device != device:
        raise ValueError(f"gamma: must be on {device}, got {gamma.device}")
    # A value check reads the data: free on the CPU, a host sync on CUDA, impossible while tracing.
    if gamma.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(((gamma > 0) & (gamma <= 1)).all()):
            bad = gamma[~((gamma > 0) & (gamma <= 1))][0].item()
            raise ValueError(f"gamma: every masking probability must lie in (0, 1], found {bad}")


# ----------------------------------------------------------------------------------------------------------
# Primitive 1: row_lse_target
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("unif2ace::row_lse_target", mutates_args=())
def _row_lse_target(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    _check_rows(logits, target)
    logits, target = logits.contiguous(), target.contiguous()
    acc = _acc_dtype(logits)
    lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
    target_logit = torch.empty_like(lse)
    _C.row_lse_target(dl(logits), dl(target), ignore_index, dl(lse), dl(target_logit), stream_of(logits))
    return lse, target_logit


@_row_lse_target.register_fake
def _(logits, target, ignore_index):
    _check_rows(logits, target)
    acc = _acc_dtype(logits)
    return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape[0], dtype=acc)


def _row_lse_target_setup(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[0])
    ctx.ignore_index = ignore_index


def _row_lse_target_backward(ctx, grad_lse, grad_target_logit):
    logits, target, lse = ctx.saved_tensors
    # d lse / dz = softmax(z); d z_y / dz = onehot(y).
    coef_softmax = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    coef_onehot = torch.zeros_like(lse) if grad_target_logit is None else -grad_target_logit.to(lse.dtype)
    grad = torch.ops.unif2ace.softmax_onehot_grad(
        logits, lse, target, coef_softmax.contiguous(), coef_onehot.contiguous(), ctx.ignore_index
    )
    return grad, None, None


_row_lse_target.register_autograd(_row_lse_target_backward, setup_context=_row_lse_target_setup)


def row_lse_target(logits: Tensor, target: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-row log-sum-exp and target logit of `logits [N, K]` (fp32; fp64 for fp64 logits).

    Rows whose target is `ignore_index` are skipped and get 0 in both outputs. Differentiable w.r.t. logits.
    """
    return torch.ops.unif2ace.row_lse_target(logits, target, ignore_index)


# ----------------------------------------------------------------------------------------------------------
# Primitive 2: softmax_onehot_grad (out of place and in place)
# ----------------------------------------------------------------------------------------------------------
def _check_grad_args(logits, lse, target, coef_softmax, coef_onehot):
    _check_rows(logits, target)
    acc = _acc_dtype(logits)
    for name, v in (("lse", lse), ("coef_softmax", coef_softmax), ("coef_onehot", coef_onehot)):
        if v.shape != (logits.shape[0],) or v.dtype != acc or v.device != logits.device:
            raise ValueError(
                f"{name}: expected a {acc} tensor of shape [{logits.shape[0]}] on {logits.device}, "
                f"got {v.dtype} {tuple(v.shape)} on {v.device}"
            )


def _launch_grad(logits, grad, lse, target, coef_softmax, coef_onehot, ignore_index):
    _C.softmax_onehot_grad(
        dl(logits), dl(grad), dl(lse.contiguous()), dl(target.contiguous()), ignore_index,
        dl(coef_softmax.contiguous()), dl(coef_onehot.contiguous()), stream_of(logits),
    )


@torch.library.custom_op("unif2ace::softmax_onehot_grad", mutates_args=())
def _softmax_onehot_grad(
    logits: Tensor, lse: Tensor, target: Tensor, coef_softmax: Tensor, coef_onehot: Tensor, ignore_index: int
) -> Tensor:
    _check_grad_args(logits, lse, target, coef_softmax, coef_onehot)
    logits = logits.contiguous()
    grad = torch.empty_like(logits)
    _launch_grad(logits, grad, lse, target, coef_softmax, coef_onehot, ignore_index)
    return grad


@_softmax_onehot_grad.register_fake
def _(logits, lse, target, coef_softmax, coef_onehot, ignore_index):
    _check_grad_args(logits, lse, target, coef_softmax, coef_onehot)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("unif2ace::softmax_onehot_grad_", mutates_args=("logits",))
def _softmax_onehot_grad_(
    logits: Tensor, lse: Tensor, target: Tensor, coef_softmax: Tensor, coef_onehot: Tensor, ignore_index: int
) -> None:
    _check_grad_args(logits, lse, target, coef_softmax, coef_onehot)
    if not logits.is_contiguous():
        raise ValueError("logits: the in-place form needs a contiguous tensor")
    _launch_grad(logits, logits, lse, target, coef_softmax, coef_onehot, ignore_index)


@_softmax_onehot_grad_.register_fake
def _(logits, lse, target, coef_softmax, coef_onehot, ignore_index):
    _check_grad_args(logits, lse, target, coef_softmax, coef_onehot)


def softmax_onehot_grad(
    logits: Tensor,
    lse: Tensor,
    target: Tensor,
    coef_softmax: Tensor,
    coef_onehot: Tensor,
    *,
    ignore_index: int = -100,
    inplace: bool = False,
) -> Tensor:
    """Row-wise `coef_softmax[n]·softmax(logits[n]) − coef_onehot[n]·onehot(target[n])`, with `lse` from
    `row_lse_target`. Rows with `ignore_index` become zeros. `inplace=True` overwrites `logits`."""
    if inplace:
        torch.ops.unif2ace.softmax_onehot_grad_(logits, lse, target, coef_softmax, coef_onehot, ignore_index)
        return logits
    return torch.ops.unif2ace.softmax_onehot_grad(logits, lse, target, coef_softmax, coef_onehot, ignore_index)


# ----------------------------------------------------------------------------------------------------------
# The D3Diff loss on given logits
# ----------------------------------------------------------------------------------------------------------
def _row_terms(lse, target_logit, gamma, valid, n_classes, alpha, score, schedule, w_max):
    """Per-row loss ℓ and the coefficients (c_softmax, c_onehot) of its logits gradient (DESIGN §4):
    ℓ = CE + α·w·(CE + [sedd]·φ(u)),  ∂ℓ/∂z = (c + e)·softmax − c·onehot,  c = 1 + α·w, e = [sedd]·α·w·(eᵘ − 1)."""
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    w = torch.where(valid, time_weight(gamma, schedule, w_max).to(lse.dtype), zero)
    ce = lse - target_logit
    c = 1 + alpha * w
    if score == "sedd":
        u = lse - math.log(n_classes)
        loss = c * ce + alpha * w * (torch.expm1(u) - u)
        e = alpha * w * torch.expm1(u)
    else:
        loss = c * ce
        e = torch.zeros_like(c)
    loss = torch.where(valid, loss, zero)
    return loss, torch.where(valid, c + e, zero), torch.where(valid, c, zero)


def _reduce(loss_rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / valid.sum().clamp(min=1)


def d3diff_loss(
    logits: Tensor,
    target: Tensor,
    gamma: Tensor,
    *,
    alpha: float = 0.01,
    score: str = "normalized",
    schedule: str = "cosine",
    w_max: float = 1000.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """D3Diff loss (masked CE + α·score entropy) of `logits [N, K]` against `target [N]`.

    gamma [N]: the masking probability of each row's sample, in (0, 1]. Rows whose target is `ignore_index`
    are unmasked tokens and contribute nothing. `alpha=0` is exactly a masked cross-entropy. `reduction`:
    "mean" over contributing rows (0 when there are none), "sum", or "none" (per row, zeros for ignored rows).
    The result is fp32 (fp64 for fp64 logits). NaN logits propagate into the loss, as in torch's
    cross-entropy. On CUDA an out-of-range target gives NaN in its row instead of an error (raising would need a
    host synchronisation); on the CPU it raises ValueError.
    """
    _check_options(score, schedule, reduction)
    _check_rows(logits, target)
    _check_gamma(gamma, logits.shape[0], logits.device)
    lse, target_logit = torch.ops.unif2ace.row_lse_target(logits, target, ignore_index)
    valid = target != ignore_index
    loss_rows, _, _ = _row_terms(lse, target_logit, gamma, valid, logits.shape[1], alpha, score, schedule, w_max)
    return _reduce(loss_rows, valid, reduction)


# ----------------------------------------------------------------------------------------------------------
# The fused linear form
# ----------------------------------------------------------------------------------------------------------
def default_chunk_size(n_rows: int, n_classes: int, hidden_size: int) -> int:
    """Rows per chunk: about 2^24 logits (64 MiB in fp32) per chunk, between 64 and 4096 rows. Large enough that
    the three matrix products per chunk run at full speed, small enough that memory stays O(chunk·K)."""
    rows = max(64, min(4096, (1 << 24) // max(1, n_classes)))
    return max(1, min(rows, n_rows))


def _fused_pass(hidden, weight, bias, target, gamma, opts, chunk_size, row_scale, compute_grads):
    """One pass over row chunks. Returns the per-row losses and, when compute_grads, the gradients of
    Σₙ row_scale[n]·ℓₙ with respect to hidden, weight and bias."""
    alpha, score, schedule, w_max, ignore_index = opts
    n_rows, n_classes = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden)
    valid = target != ignore_index
    loss_rows = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    grad_hidden = grad_weight = grad_bias = None
    if compute_grads:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = torch.zeros(n_classes, dtype=acc, device=weight.device) if bias is not None else None
    weight_t = weight.t()
    for start in range(0, n_rows, chunk_size):
        end = min(n_rows, start + chunk_size)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight_t) if bias is not None else torch.mm(h, weight_t)
        t = target[start:end]
        lse, target_logit = torch.ops.unif2ace.row_lse_target(logits, t, ignore_index)
        rows, coef_softmax, coef_onehot = _row_terms(
            lse, target_logit, gamma[start:end], valid[start:end], n_classes, alpha, score, schedule, w_max
        )
        loss_rows[start:end] = rows
        if not compute_grads:
            continue
        scale = row_scale[start:end]
        _launch_grad(logits, logits, lse, t, coef_softmax * scale, coef_onehot * scale, ignore_index)
        torch.mm(logits, weight, out=grad_hidden[start:end])
        if acc == weight.dtype:
            grad_weight.addmm_(logits.t(), h)
        else:
            grad_weight += torch.mm(logits.t(), h)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=acc)
    if compute_grads:
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
    return loss_rows, grad_hidden, grad_weight, grad_bias


def _fused_pass_compacted(hidden, weight, bias, target, gamma, opts, chunk_size, row_scale, compute_grads):
    """_fused_pass over the contributing rows only. Finding them is data-dependent (a host sync on CUDA), so
    only CPU tensors are compacted; on CUDA unmasked rows are computed and zeroed."""
    ignore_index = opts[-1]
    if hidden.device.type != "cpu":
        return _fused_pass(hidden, weight, bias, target, gamma, opts, chunk_size, row_scale, compute_grads)
    rows = (target != ignore_index).nonzero().squeeze(1)
    if rows.numel() == hidden.shape[0]:
        return _fused_pass(hidden, weight, bias, target, gamma, opts, chunk_size, row_scale, compute_grads)
    scale = row_scale.index_select(0, rows) if row_scale is not None else None
    loss_c, grad_hidden_c, grad_weight, grad_bias = _fused_pass(
        hidden.index_select(0, rows), weight, bias, target.index_select(0, rows), gamma.index_select(0, rows),
        opts, chunk_size, scale, compute_grads,
    )
    loss_rows = torch.zeros(hidden.shape[0], dtype=loss_c.dtype).index_copy_(0, rows, loss_c)
    grad_hidden = None
    if compute_grads:
        if rows.numel() == 0:  # nothing contributes: zero gradients
            grad_weight = torch.zeros_like(weight)
            grad_bias = torch.zeros_like(bias) if bias is not None else None
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_hidden_c)
    return loss_rows, grad_hidden, grad_weight, grad_bias


def _reduction_scale(valid: Tensor, reduction: str, acc: torch.dtype) -> Tensor:
    scale = valid.to(acc)
    return scale / valid.sum().clamp(min=1) if reduction == "mean" else scale


def _empty_grads(hidden, weight):
    return hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)


@torch.library.custom_op("unif2ace::linear_d3diff_loss", mutates_args=())
def _linear_d3diff_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    gamma: Tensor,
    alpha: float,
    score: str,
    schedule: str,
    w_max: float,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    grad_in_forward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias). With grad_in_forward (reductions "mean"/"sum"),
    the gradients of the loss are computed in the same pass as the loss, so the backward only scales them;
    otherwise the three are empty and the backward recomputes the logits chunk by chunk."""
    hidden, weight, target, gamma = hidden.contiguous(), weight.contiguous(), target.contiguous(), gamma.contiguous()
    opts = (alpha, score, schedule, w_max, ignore_index)
    valid = target != ignore_index
    acc = _acc_dtype(hidden)
    scale = _reduction_scale(valid, reduction, acc) if grad_in_forward else None
    loss_rows, gh, gw, gb = _fused_pass_compacted(
        hidden, weight, bias, target, gamma, opts, chunk_size, scale, grad_in_forward
    )
    loss = _reduce(loss_rows, valid, reduction)
    if not grad_in_forward:
        return (loss, *_empty_grads(hidden, weight))
    return loss, gh, gw, gb if gb is not None else weight.new_empty(0)


@_linear_d3diff_loss.register_fake
def _(hidden, weight, bias, target, gamma, alpha, score, schedule, w_max, ignore_index, reduction, chunk_size,
      grad_in_forward):
    acc = _acc_dtype(hidden)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    if not grad_in_forward:
        return (loss, *_empty_grads(hidden, weight))
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), gb


@torch.library.custom_op("unif2ace::linear_d3diff_loss_backward", mutates_args=())
def _linear_d3diff_loss_backward(
    row_scale: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    gamma: Tensor,
    alpha: float,
    score: str,
    schedule: str,
    w_max: float,
    ignore_index: int,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σₙ row_scale[n]·ℓₙ w.r.t. hidden, weight and bias (empty when bias is None)."""
    opts = (alpha, score, schedule, w_max, ignore_index)
    _, gh, gw, gb = _fused_pass_compacted(
        hidden.contiguous(), weight.contiguous(), bias, target.contiguous(), gamma.contiguous(), opts, chunk_size,
        row_scale.contiguous(), True,
    )
    return gh, gw, gb if gb is not None else weight.new_empty(0)


@_linear_d3diff_loss_backward.register_fake
def _(row_scale, hidden, weight, bias, target, gamma, alpha, score, schedule, w_max, ignore_index, chunk_size):
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, target, gamma, alpha, score, schedule, w_max, ignore_index, reduction, chunk, gif = inputs
    ctx.opts = (alpha, score, schedule, w_max, ignore_index, chunk)
    ctx.reduction, ctx.grad_in_forward, ctx.has_bias = reduction, gif, bias is not None
    if gif:
        ctx.save_for_backward(*output[1:])
    else:
        ctx.save_for_backward(hidden, weight, bias, target, gamma)


def _linear_backward(ctx, grad_loss, *_unused):
    if ctx.grad_in_forward:
        gh, gw, gb = ctx.saved_tensors
        g = grad_loss.to(torch.float64 if gh.dtype == torch.float64 else torch.float32)
        grads = (gh * g, gw * g, gb * g if ctx.has_bias else None)
    else:
        hidden, weight, bias, target, gamma = ctx.saved_tensors
        alpha, score, schedule, w_max, ignore_index, chunk = ctx.opts
        acc = _acc_dtype(hidden)
        valid = target != ignore_index
        row_scale = grad_loss.to(acc) if ctx.reduction == "none" else grad_loss.to(acc) * _reduction_scale(
            valid, ctx.reduction, acc
        )
        gh, gw, gb = torch.ops.unif2ace.linear_d3diff_loss_backward(
            row_scale, hidden, weight, bias, target, gamma, alpha, score, schedule, w_max, ignore_index, chunk
        )
        grads = (gh, gw, gb if ctx.has_bias else None)
    return (*grads, None, None, None, None, None, None, None, None, None, None)


_linear_d3diff_loss.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_d3diff_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    gamma: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    alpha: float = 0.01,
    score: str = "normalized",
    schedule: str = "cosine",
    w_max: float = 1000.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """`d3diff_loss(hidden @ weightᵀ + bias, target, gamma, ...)` without materialising the [N, K] logits.

    hidden [N, H], weight [K, H], bias [K] or None (all of one dtype), target [N] int64, gamma [N].
    Logits are computed `chunk_size` rows at a time (default: `default_chunk_size`). For the "mean" and "sum"
    reductions, when a gradient is needed the gradients are formed during the forward pass (each chunk's logits
    become their own gradient in place), so the backward pass only scales them: the same three matrix products
    as the eager computation, and O(chunk·K) extra memory instead of O(N·K). With reduction="none" the backward
    recomputes the logits chunk by chunk.

    Under torch.autocast the matrix products run in the autocast dtype: hidden, weight and bias are cast to it and
    the op runs with autocast off (inside, mixed dtypes would meet in the chunk products).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_d3diff_loss(
                hidden.to(dtype), weight.to(dtype), target, gamma, bias=None if bias is None else bias.to(dtype),
                chunk_size=chunk_size, alpha=alpha, score=score, schedule=schedule, w_max=w_max,
                ignore_index=ignore_index, reduction=reduction)
    _check_options(score, schedule, reduction)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D tensor [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight: expected shape [K, {hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight: the number of classes must be positive")
    if hidden.dtype not in _FLOATS or weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: must be on {hidden.device}, got {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"bias: expected a {weight.dtype} tensor of shape [{weight.shape[0]}] on {weight.device}")
    _check_rows(hidden, target, "hidden")
    _check_gamma(gamma, hidden.shape[0], hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])
    elif chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    grad_in_forward = needs_grad and reduction != "none"
    loss, _, _, _ = torch.ops.unif2ace.linear_d3diff_loss(
        hidden, weight, bias, target, gamma, alpha, score, schedule, w_max, ignore_index, reduction, chunk_size,
        grad_in_forward,
    )
    return loss
