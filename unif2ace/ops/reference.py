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


# ----------------------------------------------------------------------------------------------------------
# Grouped MoE (DESIGN §5): the eager forms a user would write
# ----------------------------------------------------------------------------------------------------------
def moe_gate(
    router_logits: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int,
    top_k: int,
    renormalize: bool = True,
    token_mask: torch.Tensor | None = None,
):
    """Full-matrix grouped gating: mask the other groups' columns, softmax, stable top-k (ties → lower index),
    renormalise, bincount. Returns (gates, expert_ids, expert_counts, router_prob_mean) like ops.moe_gate."""
    acc = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    n_tokens, n_cols = router_logits.shape
    n_experts = n_cols // num_groups
    z = router_logits.to(acc)
    col_group = torch.arange(n_cols, device=z.device) // n_experts
    in_group = col_group[None, :] == group_ids[:, None]
    z = z.masked_fill(~in_group, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    expert_ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :top_k]
    gates = probs.gather(1, expert_ids)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    counted = torch.ones(n_tokens, dtype=torch.bool, device=z.device) if token_mask is None else token_mask
    expert_counts = torch.bincount(expert_ids[counted].flatten(), minlength=n_cols)
    group_tokens = torch.bincount(group_ids[counted], minlength=num_groups)
    prob_sum = (probs * counted[:, None].to(acc)).sum(0)
    router_prob_mean = prob_sum / group_tokens[col_group].clamp(min=1).to(acc)
    return gates, expert_ids, expert_counts, router_prob_mean


def moe_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Stable sort of the flattened (token, slot) expert ids and a row gather. Returns (x_sorted, expert_offsets,
    sorted_slot) like ops.moe_dispatch."""
    top_k = expert_ids.shape[1]
    sorted_slot = torch.sort(expert_ids.flatten(), stable=True).indices
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts)
    expert_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return x.index_select(0, sorted_slot // top_k), expert_offsets, sorted_slot


def moe_combine(y_sorted: torch.Tensor, gates: torch.Tensor, sorted_slot: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_j gates[t, j] · y_sorted[pos(t, j)]: scatter the rows back to slot order, weight, sum over k."""
    n_tokens, top_k = gates.shape
    acc = torch.float64 if y_sorted.dtype == torch.float64 else torch.float32
    by_slot = torch.empty_like(y_sorted).index_copy_(0, sorted_slot, y_sorted)
    y = (by_slot.view(n_tokens, top_k, -1).to(acc) * gates.to(acc)[:, :, None]).sum(1)
    return y.to(y_sorted.dtype)


def grouped_mlp(x_sorted, expert_offsets, w1, b1, w2, b2, activation: str = "gelu_tanh") -> torch.Tensor:
    """Per-expert MLPs over the expert-sorted rows, one slice at a time."""
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    outs = []
    offs = expert_offsets.tolist()
    for e in range(w1.shape[0]):
        xe = x_sorted[offs[e]:offs[e + 1]]
        h = torch.nn.functional.gelu(torch.nn.functional.linear(xe, w1[e], b1[e]), approximate=approximate)
        outs.append(torch.nn.functional.linear(h, w2[e], b2[e]))
    return torch.cat(outs, 0)


def balance_loss(expert_counts: torch.Tensor, router_prob_mean: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ_g E·Σ_e f_e·P_e with f_e the fraction of the group's (token, slot) pairs sent to e."""
    counts = expert_counts.view(num_groups, -1).to(router_prob_mean.dtype)
    frac = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return counts.shape[1] * (frac * router_prob_mean.view(num_groups, -1)).sum()
