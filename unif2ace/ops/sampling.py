"""Sampling ops (docs/design.md §6) as torch custom ops around the C++/CUDA kernels.

  maskgit_step        one fused MaskGIT step: guidance, temperature, the draw, confidence and per-row re-masking
  maskgit_generate    the whole masked-diffusion loop (S steps, Philox offset advanced per step)
  sample_next_token   fused temperature / top-k / top-p draw of one token per row (text decoding)
  philox_noise        the exact noise the kernels draw, to feed the references

Randomness: Philox 4x32-10 keyed by `seed`, counter (row index, `offset`). Each row of logits (each (b, n) of
a MaskGIT step, each b of sample_next_token) uses one Philox block: its first 64 bits choose the token by the
inverse CDF of its integer masses, its third word gives the Gumbel of the confidence. There is no per-k noise.
`philox_noise((B, N), seed, offset, kind="uniform"|"gumbel")` returns exactly these per-row draws (see
csrc/include/unif2ace/philox.h and sampling.h for the bit layout).

Bad values: on the CPU a token neither in [0, K) nor mask_id, or a row with NaN / +inf logits (after guidance
and temperature) or only -inf logits, raises ValueError; -inf entries alone are allowed (probability 0). On CUDA
those checks would need a host sync, so they are not made: an out-of-range token is resampled like a masked
one, and a bad row draws token 0 with confidence -inf (re-masked first while steps re-mask anything). Outputs
always lie in [0, K) or equal mask_id.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from unif2ace._core import _C, dl, stream_of
from unif2ace.ops import reference as _ref
from unif2ace.ops.reference import MASKGIT_SCHEDULES, maskgit_step_scalars

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NOISE_KINDS = {"uniform": (0, torch.float64), "gumbel": (1, torch.float32), "uniform64": (2, torch.int64)}
_INT63 = 1 << 63
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_MIN_TEMPERATURE = 1.0 / _FLOAT32_MAX  # below it 1/T, which the kernels take as a float32, is inf


def _int(name: str, v, low: int, high: int) -> int:
    """v as a Python int (numpy and 0-d tensor integers too; not bool or float) checked to lie in [low, high)."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise ValueError(f"{name}: must be an int, got {v!r}")
    v = operator.index(v)
    if not low <= v < high:
        raise ValueError(f"{name}: must be an int in [{_bound(low)}, {_bound(high)}), got {v}")
    return v


def _bound(b: int) -> str:
    return {_INT63: "2**63", -_INT63: "-2**63"}.get(b, str(b))


def _check_seed(name: str, v) -> int:
    return _int(name, v, 0, _INT63)


def _check_mask_id(mask_id, codebook_size: int) -> int:
    mask_id = _int("mask_id", mask_id, -_INT63, _INT63)
    if 0 <= mask_id < codebook_size:
        raise ValueError(f"mask_id: must lie outside the codebook [0, {codebook_size}), got {mask_id}")
    return mask_id


def _check_scale(name: str, v, allow_zero: bool = True) -> float:
    """A non-negative scalar the kernels receive as a float32: finite there, and for a temperature (whose inverse
    they take) not so small that 1/v overflows."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {v!r}") from None
    if not (math.isfinite(x) and x >= 0 and x <= _FLOAT32_MAX):
        raise ValueError(f"{name}: must be a finite number in [0, {_FLOAT32_MAX:.4g}], got {v!r}")
    if not allow_zero and x < _MIN_TEMPERATURE:
        raise ValueError(f"{name}: must be at least {_MIN_TEMPERATURE:.4g} (1/{name} must be a finite float32), "
                         f"got {v!r}")
    return x


def _check_maskgit_args(cond_logits, tokens, uncond_logits, mask_id) -> None:
    if cond_logits.dim() != 3:
        raise ValueError(f"cond_logits: expected a 3-D tensor [B, N, K], got shape {tuple(cond_logits.shape)}")
    if cond_logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"cond_logits: dtype must be float32, bfloat16 or float16, got {cond_logits.dtype}")
    B, N, K = cond_logits.shape
    if K == 0:
        raise ValueError("cond_logits: the codebook size K must be positive")
    if tokens.dtype != torch.int64:
        raise ValueError(f"tokens: dtype must be int64, got {tokens.dtype}")
    if tuple(tokens.shape) != (B, N):
        raise ValueError(f"tokens: expected shape [{B}, {N}], got {tuple(tokens.shape)}")
    if tokens.device != cond_logits.device:
        raise ValueError(f"tokens: must be on {cond_logits.device}, got {tokens.device}")
    if uncond_logits is not None:
        if uncond_logits.shape != cond_logits.shape:
            raise ValueError(
                f"uncond_logits: expected shape {tuple(cond_logits.shape)}, got {tuple(uncond_logits.shape)}"
            )
        if uncond_logits.dtype != cond_logits.dtype:
            raise ValueError(f"uncond_logits: must have the dtype of cond_logits ({cond_logits.dtype})")
        if uncond_logits.device != cond_logits.device:
            raise ValueError(f"uncond_logits: must be on {cond_logits.device}, got {uncond_logits.device}")
    _check_mask_id(mask_id, K)


# ----------------------------------------------------------------------------------------------------------
# maskgit_step
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("unif2ace::maskgit_step", mutates_args=())
def _maskgit_step(
    cond_logits: Tensor,
    tokens: Tensor,
    uncond_logits: Optional[Tensor],
    mask_id: int,
    guidance_scale: float,
    inv_temperature: float,
    noise_scale: float,
    n_base: int,
    last_step: bool,
    seed: int,
    offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_maskgit_args(cond_logits, tokens, uncond_logits, mask_id)
    cond_logits, tokens = cond_logits.contiguous(), tokens.contiguous()
    new_tokens = torch.empty_like(tokens)
    sampled = torch.empty_like(tokens)
    confidence = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    _C.maskgit_step(
        dl(cond_logits), None if uncond_logits is None else dl(uncond_logits.contiguous()), dl(tokens),
        dl(new_tokens), dl(sampled), dl(confidence), mask_id, guidance_scale, inv_temperature, noise_scale,
        n_base, last_step, seed, offset, stream_of(cond_logits),
    )
    return new_tokens, sampled, confidence


@_maskgit_step.register_fake
def _(cond_logits, tokens, uncond_logits, mask_id, guidance_scale, inv_temperature, noise_scale, n_base,
      last_step, seed, offset):
    _check_maskgit_args(cond_logits, tokens, uncond_logits, mask_id)
    shape = tokens.shape
    return (
        tokens.new_empty(shape),
        tokens.new_empty(shape),
        tokens.new_empty(shape, dtype=torch.float32),
    )


def maskgit_step(
    cond_logits: Tensor,
    tokens: Tensor,
    step: int,
    num_steps: int,
    *,
    uncond_logits: Optional[Tensor] = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    schedule: str = "cosine",
    mask_id: int,
    seed: int,
    offset: int = 0,
    return_confidence: bool = False,
):
    """One fused MaskGIT step (docs/design.md §6) on `cond_logits [B, N, K]` and `tokens [B, N]` (int64 codebook ids
    or `mask_id`). Returns `(new_tokens, sampled)` (plus the fp32 confidence with `return_confidence=True`):

      z = z_c + g·(z_c − z_u) (g = guidance_scale; uncond_logits ignored when g = 0), p = softmax(z / T)
      sampled[i] ~ p_i for masked i (inverse CDF on Philox noise), the known token otherwise
      c_i = log p_i(sampled_i) + τ·(1 − r)·Gumbel_i for masked i, +inf for known (τ = choice_temperature)
      n = max(1, min(#masked − 1, floor(N·γ(r)))) per row before the last step, 0 at the last step
      new_tokens = sampled with the n lowest-confidence positions (ties: lower position first) set to mask_id
    with r = (step + 1) / num_steps and γ the cosine (cos(πr/2)) or linear (1 − r) schedule.
    Deterministic: the same (seed, offset) gives bit-identical results on any thread count, CPU or CUDA.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive int, got {num_steps!r}")
    if not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(f"step: must be an int in [0, num_steps={num_steps}), got {step!r}")
    if schedule not in MASKGIT_SCHEDULES:
        raise ValueError(f"schedule must be one of {MASKGIT_SCHEDULES}, got {schedule!r}")
    temperature = _check_scale("temperature", temperature, allow_zero=False)
    choice_temperature = _check_scale("choice_temperature", choice_temperature)
    guidance_scale = _check_scale("guidance_scale", guidance_scale)
    if guidance_scale != 0 and uncond_logits is None:
        raise ValueError("uncond_logits: required when guidance_scale != 0")
    seed, offset = _check_seed("seed", seed), _check_seed("offset", offset)
    if cond_logits.dim() != 3:
        raise ValueError(f"cond_logits: expected a 3-D tensor [B, N, K], got shape {tuple(cond_logits.shape)}")
    mask_id = _check_mask_id(mask_id, cond_logits.shape[2])
    s = maskgit_step_scalars(
        cond_logits.shape[1], step, num_steps, temperature, choice_temperature, schedule
    )
    out = torch.ops.unif2ace.maskgit_step(
        cond_logits, tokens, uncond_logits if guidance_scale != 0 else None, mask_id, guidance_scale,
        s["inv_temperature"], s["noise_scale"], s["n_base"], s["last_step"], seed, offset,
    )
    return out if return_confidence else (out[0], out[1])


# ----------------------------------------------------------------------------------------------------------
# sample_next_token
# ----------------------------------------------------------------------------------------------------------
def _check_next_token_args(logits: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits: dtype must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits: the vocabulary size must be positive")


@torch.library.custom_op("unif2ace::sample_next_token", mutates_args=())
def _sample_next_token(
    logits: Tensor, inv_temperature: float, greedy: bool, top_k: int, top_p: float, seed: int, offset: int
) -> Tensor:
    _check_next_token_args(logits)
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _C.sample_next_token(dl(logits), dl(out), inv_temperature, greedy, top_k, top_p, seed, offset,
                         stream_of(logits))
    return out


@_sample_next_token.register_fake
def _(logits, inv_temperature, greedy, top_k, top_p, seed, offset):
    _check_next_token_args(logits)
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


def sample_next_token(
    logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int, offset: int = 0
) -> Tensor:
    """One token id per row of `logits [B, V]`: softmax(z / T) restricted to the `top_k` largest logits (0: no
    limit), then to the smallest set of largest logits holding `top_p` of the remaining mass (ties at either
    threshold are kept), drawn with Philox block b of (seed, offset). Greedy (first argmax) when
    temperature == 0 or top_k == 1. No sort: the thresholds come from radix selects over the row."""
    temperature = _check_scale("temperature", temperature)
    if 0 < temperature < _MIN_TEMPERATURE:
        raise ValueError(f"temperature: must be 0 (greedy) or at least {_MIN_TEMPERATURE:.4g} (1/temperature must "
                         f"be a finite float32), got {temperature!r}")
    top_k = _int("top_k", top_k, 0, math.inf)
    top_k = min(top_k, _INT63 - 1)  # any top_k >= V keeps the whole row
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p: must lie in (0, 1], got {top_p!r}")
    seed, offset = _check_seed("seed", seed), _check_seed("offset", offset)
    greedy = temperature == 0 or top_k == 1
    inv_t = 1.0 if greedy else 1.0 / temperature
    return torch.ops.unif2ace.sample_next_token(logits, inv_t, greedy, top_k, float(top_p), seed, offset)


# ----------------------------------------------------------------------------------------------------------
# philox_noise
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("unif2ace::philox_noise", mutates_args=())
def _philox_noise(shape: list[int], seed: int, offset: int, kind: str, device: torch.device) -> Tensor:
    code, dtype = _NOISE_KINDS[kind]
    out = torch.empty(shape, dtype=dtype, device=device)
    _C.philox_noise(dl(out), code, seed, offset, stream_of(out))
    return out


@_philox_noise.register_fake
def _(shape, seed, offset, kind, device):
    return torch.empty(shape, dtype=_NOISE_KINDS[kind][1], device=device)


def philox_noise(
    shape: Union[int, Sequence[int]],
    seed: int,
    offset: int = 0,
    *,
    kind: str = "gumbel",
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """The noise of the sampling kernels: element i (row-major over `shape`) comes from Philox block i of
    (seed, offset). kind="uniform": float64 in [0, 1) (the categorical draw of row i), "gumbel": fp32 Gumbel(0, 1)
    (the confidence noise of row i), "uniform64": the raw 64-bit integer behind "uniform" (int64 bits).
    `philox_noise((B, N), seed, offset, kind=...)` is exactly what maskgit_step(..., seed, offset) uses."""
    if kind not in _NOISE_KINDS:
        raise ValueError(f"kind must be one of {tuple(_NOISE_KINDS)}, got {kind!r}")
    seed, offset = _check_seed("seed", seed), _check_seed("offset", offset)
    shape = [int(shape)] if isinstance(shape, int) else [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: sizes must be >= 0, got {shape}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    return torch.ops.unif2ace.philox_noise(shape, seed, offset, kind, dev)


# ----------------------------------------------------------------------------------------------------------
# maskgit_generate
# ----------------------------------------------------------------------------------------------------------
LogitsFn = Callable[[Tensor], Union[Tensor, tuple]]


def maskgit_generate(
    logits_fn: LogitsFn,
    batch_size: int,
    num_tokens: int,
    codebook_size: int,
    *,
    num_steps: int,
    mask_id: int,
    seed: int,
    init_tokens: Optional[Tensor] = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    schedule: str = "cosine",
    offset: int = 0,
    device: Union[str, torch.device, None] = None,
    backend: str = "kernels",
    progress: Union[bool, dict] = False,
) -> Tensor:
    """Masked-diffusion generation: start from all-masked tokens [batch_size, num_tokens] (or `init_tokens`,
    with pre-filled codebook ids kept, for inpainting), run `num_steps` MaskGIT steps and return the final
    tokens, all in [0, codebook_size).

    `logits_fn(tokens)` returns the conditional logits [B, N, K], or `(cond, uncond)` when guidance_scale > 0.
    Step s uses Philox offset `offset + s`. backend="kernels" runs the fused op; backend="reference" the eager
    Show-o-style step fed the same Philox noise (the two agree except at float ties of the CDF)."""
    if backend not in ("kernels", "reference"):
        raise ValueError(f"backend must be 'kernels' or 'reference', got {backend!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive int, got {num_steps!r}")
    batch_size = _int("batch_size", batch_size, 0, _INT63)
    num_tokens = _int("num_tokens", num_tokens, 0, _INT63)
    codebook_size = _int("codebook_size", codebook_size, 1, _INT63)
    mask_id = _check_mask_id(mask_id, codebook_size)
    seed, offset = _check_seed("seed", seed), _check_seed("offset", offset)
    if offset + num_steps > _INT63:
        raise ValueError(f"offset: step s uses offset + s, so offset + num_steps must not exceed 2**63, got "
                         f"{offset} + {num_steps}")
    if init_tokens is None:
        dev = torch.device("cpu") if device is None else torch.device(device)
        tokens = torch.full((batch_size, num_tokens), mask_id, dtype=torch.int64, device=dev)
    else:
        if tuple(init_tokens.shape) != (batch_size, num_tokens):
            raise ValueError(
                f"init_tokens: expected shape [{batch_size}, {num_tokens}], got {tuple(init_tokens.shape)}"
            )
        tokens = init_tokens.to(torch.int64).clone()
    steps = range(num_steps)
    if progress:  # True, or a dict of unif2ace.progress.progress_bar options
        from unif2ace.progress import progress_bar

        options = progress if isinstance(progress, dict) else {}
        steps = progress_bar(steps, **{"desc": "maskgit", "leave": False, **options})
    for step in steps:
        out = logits_fn(tokens)
        if guidance_scale > 0:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError("logits_fn: must return (cond_logits, uncond_logits) when guidance_scale > 0")
            cond, uncond = out
        else:
            cond, uncond = (out[0] if isinstance(out, (tuple, list)) else out), None
        if tuple(cond.shape) != (batch_size, num_tokens, codebook_size):
            raise ValueError(
                f"logits_fn: expected logits of shape [{batch_size}, {num_tokens}, {codebook_size}], "
                f"got {tuple(cond.shape)}"
            )
        kwargs = dict(
            uncond_logits=uncond, guidance_scale=guidance_scale, temperature=temperature,
            choice_temperature=choice_temperature, schedule=schedule, mask_id=mask_id,
        )
        if backend == "kernels":
            tokens, _ = maskgit_step(cond, tokens, step, num_steps, seed=seed, offset=offset + step, **kwargs)
        else:
            shape = tuple(tokens.shape)
            uni = philox_noise(shape, seed, offset + step, kind="uniform", device=tokens.device)
            gum = philox_noise(shape, seed, offset + step, kind="gumbel", device=tokens.device)
            tokens, _ = _ref.maskgit_step(cond, tokens, step, num_steps, uniform=uni, gumbel=gum, **kwargs)
    return tokens
