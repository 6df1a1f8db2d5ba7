"""D3Diff loss ops (docs/design.md §4) as torch custom ops around the C++/CUDA row kernels.

Layers, from the bottom:
  row_lse_target        per-row log-sum-exp and target logit
  softmax_onehot_grad   its backward: coef_softmax·softmax(z) − coef_onehot·onehot(y), optionally in place
  d3diff_loss           the loss on given logits [N, K]: one row kernel gives each row's loss and statistics
                        (max m and l = log Σ exp(z − m), kept apart so that no precision is lost at large logits);
                        its backward is one gradient kernel
  linear_d3diff_loss    the loss fused with the output projection: logits are made chunk by chunk and turned
                        into their gradient in place, so the [N, K] matrix never exists in full
"""
from __future__ import annotations

import math
import numbers
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


def _check_int(name: str, value, minimum: Optional[int] = None) -> None:
    """A Python int that fits the int64 of the op schemas (and the C++ kernels)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in a signed 64-bit integer, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_loss_scalars(alpha, w_max, ignore_index) -> None:
    a = _check_real("alpha", alpha)
    if not (math.isfinite(a) and a >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    w = _check_real("w_max", w_max)
    if not w > 0:  # also rejects NaN; +inf means no clipping
        raise ValueError(f"w_max must be > 0, got {w_max}")
    _check_int("ignore_index", ignore_index)


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
    The LSE is one fp32 number: at logits of magnitude M it carries an absolute error of about M·2⁻²⁴, so
    `lse − target_logit` is only accurate while that is small; `d3diff_loss` keeps the row max and the log-sum
    apart instead.
    """
    _check_int("ignore_index", ignore_index)
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
    _check_int("ignore_index", ignore_index)
    if inplace:
        torch.ops.unif2ace.softmax_onehot_grad_(logits, lse, target, coef_softmax, coef_onehot, ignore_index)
        return logits
    return torch.ops.unif2ace.softmax_onehot_grad(logits, lse, target, coef_softmax, coef_onehot, ignore_index)


# ----------------------------------------------------------------------------------------------------------
# The D3Diff loss on given logits
# ----------------------------------------------------------------------------------------------------------
def _row_weight(gamma: Tensor, valid: Tensor, schedule: str, w_max: float, acc: torch.dtype) -> Tensor:
    """The time weight w(γ) of every row in the accumulation dtype, 0 on ignored rows."""
    zero = torch.zeros((), dtype=acc, device=gamma.device)
    return torch.where(valid, time_weight(gamma, schedule, w_max).to(acc), zero).contiguous()


def _check_row_vector(name: str, v: Tensor, logits: Tensor) -> None:
    acc = _acc_dtype(logits)
    if v.shape != (logits.shape[0],) or v.dtype != acc or v.device != logits.device:
        raise ValueError(f"{name}: expected a {acc} tensor of shape [{logits.shape[0]}] on {logits.device}, "
                         f"got {v.dtype} {tuple(v.shape)} on {v.device}")


@torch.library.custom_op("unif2ace::d3diff_rows", mutates_args=())
def _d3diff_rows(
    logits: Tensor, target: Tensor, row_weight: Tensor, alpha: float, sedd: bool, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row loss ℓ, row max m and l = log Σ exp(z − m) (docs/design.md §4)."""
    _check_rows(logits, target)
    _check_row_vector("row_weight", row_weight, logits)
    logits, target, row_weight = logits.contiguous(), target.contiguous(), row_weight.contiguous()
    loss, row_max, log_sum = (torch.empty_like(row_weight) for _ in range(3))
    _C.d3diff_rows(dl(logits), logits.shape[1], dl(target), ignore_index, dl(row_weight), alpha, sedd, None,
                   dl(loss), dl(row_max), dl(log_sum), None, stream_of(logits))
    return loss, row_max, log_sum


@_d3diff_rows.register_fake
def _(logits, target, row_weight, alpha, sedd, ignore_index):
    _check_rows(logits, target)
    _check_row_vector("row_weight", row_weight, logits)
    return tuple(torch.empty_like(row_weight, memory_format=torch.contiguous_format) for _ in range(3))


@torch.library.custom_op("unif2ace::d3diff_rows_grad", mutates_args=())
def _d3diff_rows_grad(
    logits: Tensor, target: Tensor, row_weight: Tensor, row_max: Tensor, log_sum: Tensor, row_scale: Tensor,
    alpha: float, sedd: bool, ignore_index: int,
) -> Tensor:
    """row_scale[n]·∂ℓₙ/∂z from the statistics of d3diff_rows."""
    _check_rows(logits, target)
    for name, v in (("row_weight", row_weight), ("row_max", row_max), ("log_sum", log_sum), ("row_scale", row_scale)):
        _check_row_vector(name, v, logits)
    logits = logits.contiguous()
    grad = torch.empty_like(logits)
    k = logits.shape[1]
    _C.d3diff_rows_grad(dl(logits), k, 0, k, dl(target.contiguous()), ignore_index, dl(row_weight.contiguous()),
                        alpha, sedd, dl(row_max.contiguous()), dl(log_sum.contiguous()), dl(row_scale.contiguous()),
                        dl(grad), stream_of(logits))
    return grad


@_d3diff_rows_grad.register_fake
def _(logits, target, row_weight, row_max, log_sum, row_scale, alpha, sedd, ignore_index):
    _check_rows(logits, target)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _d3diff_rows_setup(ctx, inputs, output):
    logits, target, row_weight, alpha, sedd, ignore_index = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics
    ctx.save_for_backward(logits, target, row_weight, output[1], output[2])
    ctx.opts = (alpha, sedd, ignore_index)


def _d3diff_rows_backward(ctx, grad_loss, _grad_max, _grad_log_sum):
    if grad_loss is None:
        return None, None, None, None, None, None
    logits, target, row_weight, row_max, log_sum = ctx.saved_tensors
    alpha, sedd, ignore_index = ctx.opts
    grad = torch.ops.unif2ace.d3diff_rows_grad(logits, target, row_weight, row_max, log_sum,
                                               grad_loss.to(row_weight.dtype).contiguous(), alpha, sedd, ignore_index)
    return grad, None, None, None, None, None


_d3diff_rows.register_autograd(_d3diff_rows_backward, setup_context=_d3diff_rows_setup)


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

    gamma [N]: the masking probability of each row's sample, in (0, 1] (data: not differentiated). Rows whose
    target is `ignore_index` are unmasked tokens and contribute nothing (their logits are not read; loss and
    gradient 0). `alpha=0` is exactly a masked cross-entropy. `reduction`: "mean" over contributing rows (0 when
    there are none), "sum", or "none" (per row, zeros for ignored rows). The result is fp32 (fp64 for fp64 logits).

    Numerics: CE is formed as (max − z_y) + log Σ exp(z − max) and the softmax as exp((z − max) − log Σ), so
    rows of any magnitude the dtype can hold keep their precision (ten equal logits of 1e8 give log 10). A NaN or
    +inf logit in a contributing row makes that row's loss and gradient NaN, as torch's cross-entropy does; −inf
    logits have probability 0. On CUDA an out-of-range target gives NaN in its row instead of an error (raising
    would need a host synchronisation); on the CPU it raises ValueError.
    """
    _check_options(score, schedule, reduction)
    _check_loss_scalars(alpha, w_max, ignore_index)
    _check_rows(logits, target)
    _check_gamma(gamma, logits.shape[0], logits.device)
    valid = target != ignore_index
    row_weight = _row_weight(gamma, valid, schedule, w_max, _acc_dtype(logits))
    loss_rows, _, _ = torch.ops.unif2ace.d3diff_rows(logits, target, row_weight, float(alpha), score == "sedd",
                                                     ignore_index)
    return _reduce(loss_rows, valid, reduction)


# ----------------------------------------------------------------------------------------------------------
# The fused linear form
# ----------------------------------------------------------------------------------------------------------
STRATEGIES = ("rows", "vocab")
# Logits buffers have rows padded to a multiple of LOGITS_ALIGN columns: every row then starts 16-byte aligned, which
# cuBLAS needs for its Hopper kernels (a vocabulary of 58,498 columns otherwise runs at a third of the speed). The
# products write through a column view of the buffer (torch passes its row stride to the BLAS, no copy). Set it to 1
# for contiguous [rows, K] buffers, should a BLAS ever copy such a view.
LOGITS_ALIGN = 64
_VOCAB_TILE = 64  # default vocabulary chunks are multiples of it
# Workspace of one chunk: max(48 MiB, the size of hidden).
_WORKSPACE_BYTES = 48 << 20
# Row chunks are whole matrix-product tiles.
_ROW_TILE = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _even_split(total: int, limit: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that covers `total` in as few pieces of at most `limit` as possible."""
    pieces = max(1, -(-total // limit))
    return max(1, min(total, _round_up(-(-total // pieces), multiple)))


def _workspace_bytes(n_rows: int, hidden_size: int, element_size: int) -> int:
    return max(_WORKSPACE_BYTES, n_rows * hidden_size * element_size)


def default_chunk_size(n_rows: int, n_classes: int, hidden_size: int, element_size: int = 4) -> int:
    """Rows per chunk of the row pass: multiples of 128 rows (whole matrix-product tiles), as few chunks as keep a
    padded [rows, K] logits chunk within max(48 MiB, the size of hidden), split evenly over the rows."""
    row_bytes = _round_up(max(1, n_classes), LOGITS_ALIGN) * element_size
    limit = max(_ROW_TILE, _workspace_bytes(n_rows, hidden_size, element_size) // row_bytes // _ROW_TILE * _ROW_TILE)
    return _even_split(n_rows, limit, _ROW_TILE)


def default_vocab_chunk_size(n_rows: int, n_classes: int, hidden_size: int, element_size: int = 4) -> int:
    """Columns per chunk of the vocabulary pass: multiples of 64, as few chunks as keep an [N, columns] logits chunk
    within max(48 MiB, the size of hidden), split evenly over the vocabulary."""
    limit = _workspace_bytes(n_rows, hidden_size, element_size) // max(1, n_rows * element_size)
    limit = max(_VOCAB_TILE, limit // _VOCAB_TILE * _VOCAB_TILE)
    return _even_split(n_classes, limit, _VOCAB_TILE)


def default_strategy(device: torch.device, dtype: torch.dtype) -> str:
    """"vocab" for 16-bit weights on CUDA (four matrix products, each gradient written once, no [K, H]
    accumulator); "rows" otherwise (three matrix products, the weight gradient accumulated over row chunks in
    fp32/fp64, which for fp32 weights is the gradient buffer itself)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return "vocab"
    return "rows"


def _project(h: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> None:
    """out = h @ weightᵀ (+ bias), written straight into `out` (a column view of a padded buffer)."""
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


def _row_pass(hidden, weight, bias, target, row_weight, opts, chunk, *, stats=None, row_scale=None,
              grad_hidden=False, grad_weight=False):
    """Row chunks over the whole vocabulary, logits written into a padded [chunk, K] buffer.

    Without `stats`, every row's loss and statistics are computed (and, with `row_scale`, each chunk is turned
    into row_scale·∂ℓ/∂z in place); with `stats` = (row_max, log_sum) only the gradient is formed. With a gradient,
    dH rows are one product per chunk (grad_hidden), and dW, dbias are accumulated over the chunks in the
    accumulation dtype (grad_weight). Returns (loss, row_max, log_sum, grad_hidden, grad_weight, grad_bias)."""
    alpha, sedd, ignore_index = opts
    n, k = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden)
    if stats is None:
        loss, row_max, log_sum = (hidden.new_empty(n, dtype=acc) for _ in range(3))
    else:
        loss = None
        row_max, log_sum = stats
    write_grad = row_scale is not None
    gh = torch.empty_like(hidden) if write_grad and grad_hidden else None
    gw = gb = None
    if write_grad and grad_weight:
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        gb = torch.zeros(k, dtype=acc, device=weight.device) if bias is not None else None
    ld = _round_up(k, LOGITS_ALIGN)
    buf = hidden.new_empty(min(chunk, n) * ld)
    stream = stream_of(hidden)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        z = buf[: (r1 - r0) * ld].view(r1 - r0, ld)
        logits = z[:, :k]
        h = hidden[r0:r1]
        _project(h, weight, bias, logits)
        rows = slice(r0, r1)
        if stats is None:
            _C.d3diff_rows(dl(z), k, dl(target[rows]), ignore_index, dl(row_weight[rows]), alpha, sedd,
                           dl(row_scale[rows]) if write_grad else None, dl(loss[rows]), dl(row_max[rows]),
                           dl(log_sum[rows]), dl(z) if write_grad else None, stream)
        else:
            _C.d3diff_rows_grad(dl(z), k, 0, k, dl(target[rows]), ignore_index, dl(row_weight[rows]), alpha, sedd,
                                dl(row_max[rows]), dl(log_sum[rows]), dl(row_scale[rows]), dl(z), stream)
        if not write_grad:
            continue
        if gh is not None:
            torch.mm(logits, weight, out=gh[rows])
        if gw is not None:
            if gw.dtype == weight.dtype:
                gw.addmm_(logits.t(), h)
            else:  # 16-bit weights: each chunk's product rounds once, the sum over chunks stays in fp32
                gw += torch.mm(logits.t(), h)
            if gb is not None:
                gb += logits.sum(0, dtype=acc)
    if gw is not None:
        gw = gw.to(weight.dtype)
        gb = gb.to(bias.dtype) if gb is not None else None
    return loss, row_max, log_sum, gh, gw, gb


def _vocab_pass(hidden, weight, bias, target, row_weight, opts, vocab_chunk, stats, row_scale):
    """Vocabulary chunks over all rows: the logits of columns [v0, v1) are recomputed into a padded [N, chunk]
    buffer, turned into row_scale·∂ℓ/∂z from the stored row statistics, and dW[v0:v1] = Gᵀ·H is one product
    written once (fp32 accumulation inside the product, one rounding). Returns (grad_weight, grad_bias)."""
    alpha, sedd, ignore_index = opts
    row_max, log_sum = stats
    n, k = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden)
    gw = torch.empty_like(weight)
    gb = torch.empty(k, dtype=acc, device=weight.device) if bias is not None else None
    ld = _round_up(min(vocab_chunk, k), LOGITS_ALIGN)
    z = hidden.new_empty(n * ld).view(n, ld)
    stream = stream_of(hidden)
    captured = [dl(t) for t in (target, row_weight, row_max, log_sum, row_scale)]
    for v0 in range(0, k, vocab_chunk):
        v1 = min(k, v0 + vocab_chunk)
        logits = z[:, : v1 - v0]
        _project(hidden, weight[v0:v1], None if bias is None else bias[v0:v1], logits)
        t, w, m, l, s = captured
        _C.d3diff_rows_grad(dl(z), v1 - v0, v0, k, t, ignore_index, w, alpha, sedd, m, l, s, dl(z), stream)
        torch.mm(logits.t(), hidden, out=gw[v0:v1])
        if gb is not None:
            torch.sum(logits, 0, dtype=acc, out=gb[v0:v1])
    return gw, gb.to(bias.dtype) if gb is not None else None


def _compacts(hidden: Tensor, strategy: str) -> bool:
    """Whether only the contributing rows are passed on. Finding them is data-dependent (a host sync on CUDA), so
    only the CPU "rows" strategy does it; elsewhere unmasked rows are computed and zeroed."""
    return hidden.device.type == "cpu" and strategy == "rows"


def _contributing_rows(hidden, target, ignore_index, strategy):
    if not _compacts(hidden, strategy):
        return None
    rows = (target != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == hidden.shape[0] else rows


def _select(rows, *tensors):
    return tuple(t if t is None or rows is None else t.index_select(0, rows) for t in tensors)


def _scatter(rows, n, t):
    """Rows of a compacted result back in place, zeros elsewhere."""
    if rows is None or t is None:
        return t
    return t.new_zeros((n, *t.shape[1:])).index_copy_(0, rows, t)


def _reduction_scale(valid: Tensor, reduction: str, acc: torch.dtype) -> Tensor:
    scale = valid.to(acc)
    return scale / valid.sum().clamp(min=1) if reduction == "mean" else scale


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _forward_impl(hidden, weight, bias, target, row_weight, opts, strategy, chunk, vocab_chunk, row_scale,
                  grad_hidden, grad_weight):
    """Loss rows, statistics and (with row_scale) the gradients of Σₙ row_scale[n]·ℓₙ."""
    n = hidden.shape[0]
    rows = _contributing_rows(hidden, target, opts[2], strategy)
    h, t, w, s = _select(rows, hidden, target, row_weight, row_scale)
    with_weight_grad = grad_weight and strategy == "rows"
    loss, row_max, log_sum, gh, gw, gb = _row_pass(h, weight, bias, t, w, opts, chunk, row_scale=s,
                                                   grad_hidden=grad_hidden, grad_weight=with_weight_grad)
    if s is not None and grad_weight and strategy == "vocab":
        gw, gb = _vocab_pass(h, weight, bias, t, w, opts, vocab_chunk, (row_max, log_sum), s)
    return (*(_scatter(rows, n, x) for x in (loss, row_max, log_sum, gh)), gw, gb)


def _backward_impl(row_scale, hidden, weight, bias, target, row_weight, row_max, log_sum, opts, strategy, chunk,
                   vocab_chunk, grad_hidden, grad_weight):
    """The gradients of Σₙ row_scale[n]·ℓₙ from the statistics the forward stored."""
    n = hidden.shape[0]
    rows = _contributing_rows(hidden, target, opts[2], strategy)
    h, t, w, s, m, l = _select(rows, hidden, target, row_weight, row_scale, row_max, log_sum)
    gh = gw = gb = None
    if strategy == "rows":
        _, _, _, gh, gw, gb = _row_pass(h, weight, bias, t, w, opts, chunk, stats=(m, l), row_scale=s,
                                        grad_hidden=grad_hidden, grad_weight=grad_weight)
    else:
        if grad_hidden:
            _, _, _, gh, _, _ = _row_pass(h, weight, bias, t, w, opts, chunk, stats=(m, l), row_scale=s,
                                          grad_hidden=True)
        if grad_weight:
            gw, gb = _vocab_pass(h, weight, bias, t, w, opts, vocab_chunk, (m, l), s)
    return _scatter(rows, n, gh), gw, gb


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else _empty(like)


@torch.library.custom_op("unif2ace::linear_d3diff_loss", mutates_args=())
def _linear_d3diff_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    row_weight: Tensor,
    alpha: float,
    sedd: bool,
    ignore_index: int,
    reduction: str,
    strategy: str,
    chunk_size: int,
    vocab_chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, row_max, log_sum, grad_hidden, grad_weight, grad_bias). For the "mean" and "sum" reductions
    the requested gradients of the loss (grad_hidden: hidden's; grad_weight: weight's and bias's) are formed in the
    same passes as the loss, so the backward only scales them; otherwise they are empty and the backward forms them
    from the stored row statistics."""
    hidden, weight, target, row_weight = (t.contiguous() for t in (hidden, weight, target, row_weight))
    opts = (alpha, sedd, ignore_index)
    valid = target != ignore_index
    in_forward = reduction != "none" and (grad_hidden or grad_weight)
    scale = _reduction_scale(valid, reduction, row_weight.dtype) if in_forward else None
    loss_rows, row_max, log_sum, gh, gw, gb = _forward_impl(
        hidden, weight, bias, target, row_weight, opts, strategy, chunk_size, vocab_chunk_size, scale, grad_hidden,
        grad_weight)
    return (_reduce(loss_rows, valid, reduction), row_max, log_sum, _or_empty(gh, hidden), _or_empty(gw, weight),
            _or_empty(gb, weight))


@_linear_d3diff_loss.register_fake
def _(hidden, weight, bias, target, row_weight, alpha, sedd, ignore_index, reduction, strategy, chunk_size,
      vocab_chunk_size, grad_hidden, grad_weight):
    n = hidden.shape[0]
    loss = row_weight.new_empty((n,) if reduction == "none" else ())
    in_forward = reduction != "none"
    gh = torch.empty_like(hidden) if in_forward and grad_hidden else _empty(hidden)
    gw = torch.empty_like(weight) if in_forward and grad_weight else _empty(weight)
    gb = torch.empty_like(bias) if in_forward and grad_weight and bias is not None else _empty(weight)
    return loss, row_weight.new_empty(n), row_weight.new_empty(n), gh, gw, gb


@torch.library.custom_op("unif2ace::linear_d3diff_loss_backward", mutates_args=())
def _linear_d3diff_loss_backward(
    row_scale: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    row_weight: Tensor,
    row_max: Tensor,
    log_sum: Tensor,
    alpha: float,
    sedd: bool,
    ignore_index: int,
    strategy: str,
    chunk_size: int,
    vocab_chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σₙ row_scale[n]·ℓₙ w.r.t. hidden, weight and bias (empty where not requested)."""
    args = (t.contiguous() for t in (row_scale, hidden, weight, target, row_weight, row_max, log_sum))
    row_scale, hidden, weight, target, row_weight, row_max, log_sum = args
    gh, gw, gb = _backward_impl(row_scale, hidden, weight, bias, target, row_weight, row_max, log_sum,
                                (alpha, sedd, ignore_index), strategy, chunk_size, vocab_chunk_size, grad_hidden,
                                grad_weight)
    return _or_empty(gh, hidden), _or_empty(gw, weight), _or_empty(gb, weight)


@_linear_d3diff_loss_backward.register_fake
def _(row_scale, hidden, weight, bias, target, row_weight, row_max, log_sum, alpha, sedd, ignore_index, strategy,
      chunk_size, vocab_chunk_size, grad_hidden, grad_weight):
    gh = torch.empty_like(hidden) if grad_hidden else _empty(hidden)
    gw = torch.empty_like(weight) if grad_weight else _empty(weight)
    gb = torch.empty_like(bias) if grad_weight and bias is not None else _empty(weight)
    return gh, gw, gb


def _is_eager(*tensors: Tensor) -> bool:
    """Real tensors outside any tracing (not fake, functional or traced by torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and not torch._is_functional_tensor(t) for t in tensors)


def _linear_setup(ctx, inputs, output):
    (hidden, weight, bias, target, row_weight, alpha, sedd, ignore_index, reduction, strategy, chunk, vocab_chunk,
     grad_hidden, grad_weight) = inputs
    loss, row_max, log_sum, gh, gw, gb = output
    ctx.mark_non_differentiable(row_max, log_sum, gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero "gradients" of the size of the statistics and gradients
    ctx.opts = (alpha, sedd, ignore_index, reduction, strategy, chunk, vocab_chunk, grad_hidden, grad_weight)
    ctx.has_bias = bias is not None
    saved = (hidden, weight, bias, target, row_weight, row_max, log_sum)
    ctx.grads = None
    if reduction != "none" and (grad_hidden or grad_weight):
        if _is_eager(gh, gw, gb):
            # Handed to the first backward, which scales them in place (see _linear_backward).
            ctx.grads = (gh, gw, gb)
        else:  # a traced graph must see them as saved activations
            saved += (gh, gw, gb)
            ctx.grads = "saved"
    ctx.save_for_backward(*saved)


def _linear_backward(ctx, grad_loss, *_unused):
    if grad_loss is None:
        return (None,) * 14
    hidden, weight, bias, target, row_weight, row_max, log_sum, *saved_grads = ctx.saved_tensors
    alpha, sedd, ignore_index, reduction, strategy, chunk, vocab_chunk, grad_hidden, grad_weight = ctx.opts
    acc = row_weight.dtype
    g = grad_loss.to(acc)
    if ctx.grads == "saved":
        gh, gw, gb = (x * g if x.numel() else x for x in saved_grads)
    elif ctx.grads is not None:
        # The first backward scales the forward's gradients by the incoming (0-dim) gradient, in place, and returns
        # them: nothing else holds them, so autograd adopts them as .grad without a copy and the backward allocates
        # nothing.
        gh, gw, gb = (x.mul_(g) for x in ctx.grads)
        ctx.grads = None
    else:
        # reduction="none", or a second backward through a retained graph: form the gradients from the statistics.
        row_scale = g
        if reduction != "none":
            row_scale = g * _reduction_scale(target != ignore_index, reduction, acc)
        gh, gw, gb = torch.ops.unif2ace.linear_d3diff_loss_backward(
            row_scale, hidden, weight, bias, target, row_weight, row_max, log_sum, alpha, sedd, ignore_index,
            strategy, chunk, vocab_chunk, grad_hidden, grad_weight)
    return (gh if grad_hidden else None, gw if grad_weight else None,
            gb if grad_weight and ctx.has_bias else None, *([None] * 11))


_linear_d3diff_loss.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_d3diff_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    gamma: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
    strategy: Optional[str] = None,
    alpha: float = 0.01,
    score: str = "normalized",
    schedule: str = "cosine",
    w_max: float = 1000.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """`d3diff_loss(hidden @ weightᵀ + bias, target, gamma, ...)` without materialising the [N, K] logits.

    hidden [N, H], weight [K, H], bias [K] or None (all of one dtype), target [N] int64, gamma [N]. Two strategies
    (default: `default_strategy`, "vocab" for 16-bit weights on CUDA, "rows" otherwise):

    - "rows": `chunk_size` rows at a time (default `default_chunk_size`), the logits of a chunk are made, turned
      into their gradient in place, and give dH of those rows and a dW/dbias term accumulated in fp32 (fp64): three
      matrix products. On the CPU only the contributing rows are computed.
    - "vocab": the same row pass without dW, then `vocab_chunk_size` vocabulary columns at a time (default
      `default_vocab_chunk_size`) over all rows: the chunk's logits are recomputed, turned into their gradient
      from the stored row statistics, and dW of those columns is one product written once. Four matrix products,
      no [K, H] accumulator, each gradient rounded once.

    Logits chunks are rows padded to a multiple of 64 columns (aligned rows for the matrix products); extra memory
    is one chunk: about max(48 MiB, the size of hidden) with the default chunk sizes. For the "mean" and "sum"
    reductions, when a gradient is needed the gradients are formed during the forward pass and the backward only
    scales them, in place; with reduction="none" the backward forms them from the row statistics. No host
    synchronisation on CUDA. Numerics and special values as `d3diff_loss`.

    Under torch.autocast the matrix products run in the autocast dtype: hidden, weight and bias are cast to it and
    the op runs with autocast off (inside, mixed dtypes would meet in the chunk products).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_d3diff_loss(
                hidden.to(dtype), weight.to(dtype), target, gamma, bias=None if bias is None else bias.to(dtype),
                chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, strategy=strategy, alpha=alpha,
                score=score, schedule=schedule, w_max=w_max, ignore_index=ignore_index, reduction=reduction)
    _check_options(score, schedule, reduction)
    _check_loss_scalars(alpha, w_max, ignore_index)
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None:
            _check_int(name, value, minimum=1)
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
    n, k, h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    strategy = strategy or default_strategy(hidden.device, hidden.dtype)
    chunk_size = chunk_size or default_chunk_size(n, k, h, hidden.element_size())
    vocab_chunk_size = vocab_chunk_size or default_vocab_chunk_size(n, k, h, hidden.element_size())
    grad_enabled = torch.is_grad_enabled()
    grad_hidden = grad_enabled and hidden.requires_grad
    grad_weight = grad_enabled and (weight.requires_grad or (bias is not None and bias.requires_grad))
    valid = target != ignore_index
    row_weight = _row_weight(gamma, valid, schedule, w_max, _acc_dtype(hidden))
    loss, *_ = torch.ops.unif2ace.linear_d3diff_loss(
        hidden, weight, bias, target, row_weight, float(alpha), score == "sedd", ignore_index, reduction, strategy,
        chunk_size, vocab_chunk_size, grad_hidden, grad_weight)
    return loss
