"""Plain-PyTorch references of every op: the definitions the kernels are tested against, and the
`backend="reference"` path of the layers. They materialise whatever they need (full logits, full
probability matrices, per-expert loops) and favour clarity over speed.
"""
from __future__ import annotations

import math

import torch

SCORES = ("normalized", "sedd")
SCHEDULES = ("cosine", "linear")
REDUCTIONS = ("mean", "sum", "none")


def time_weight(gamma: torch.Tensor, schedule: str = "cosine", w_max: float = 1000.0) -> torch.Tensor:
    """w(γ) = γ'(τ)/γ(τ) of the masking schedule, written as a function of the masking probability γ,
    clipped to w_max (DESIGN §4).

    cosine (γ = sin(πτ/2)): w = (π/2)·√(1−γ²)/γ;   linear (γ = τ): w = 1/γ.
    """
    g = gamma.to(torch.float64 if gamma.dtype == torch.float64 else torch.float32)
    if schedule == "cosine":
        w = (math.pi / 2) * torch.sqrt(torch.clamp(1 - g * g, min=0)) / g
    elif schedule == "linear":
        w = 1 / g
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return torch.clamp(w, max=w_max)


def d3diff_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    *,
    alpha: float = 0.01,
    score: str = "normalized",
    schedule: str = "cosine",
    w_max: float = 1000.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """D3Diff loss on materialised logits [N, K]: per masked row ℓ = CE + α·w·(CE + [sedd]·φ(u)),
    φ(u) = eᵘ − u − 1, u = LSE − log K. Computed in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_probs = torch.log_softmax(z, dim=-1)
    ce = -log_probs.gather(1, safe_target[:, None]).squeeze(1)
    loss = ce
    if alpha != 0:
        w = torch.where(valid, time_weight(gamma, schedule, w_max).to(acc), torch.zeros((), dtype=acc))
        score_term = ce
        if score == "sedd":
            u = torch.logsumexp(z, dim=-1) - math.log(z.shape[-1])
            score_term = ce + (torch.expm1(u) - u)
        loss = ce + alpha * w * score_term
    loss = torch.where(valid, loss, torch.zeros((), dtype=acc))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def linear_d3diff_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gamma: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """The eager form a user would write: materialise hidden @ weightᵀ (+ bias), then the loss."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return d3diff_loss(logits, target, gamma, **kwargs)
