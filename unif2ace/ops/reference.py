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
    clipped to w_max (docs/design.md §4).

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
    φ(u) = eᵘ − u − 1, u = LSE − log K. Computed in fp32 (fp64 for fp64 inputs).

    Special values, shared with the kernels: a NaN or +inf logit in a masked row makes its loss NaN (torch's
    log-softmax and cross-entropy do the same); a −inf target logit gives +inf; a row of only −inf gives NaN.
    The score term is left out when α = 0 (so it cannot turn an infinite φ into NaN)."""
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
# Grouped MoE (docs/design.md §5): the eager forms a user would write
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


# ----------------------------------------------------------------------------------------------------------
# Sampling (docs/design.md §6): the eager Show-o-style MaskGIT step and next-token sampling
# ----------------------------------------------------------------------------------------------------------
MASKGIT_SCHEDULES = ("cosine", "linear")


def mask_ratio(r: float, schedule: str = "cosine") -> float:
    """γ(r): the fraction of the N tokens that stays masked after a step at progress r = (s+1)/S."""
    if schedule == "cosine":
        return math.cos(math.pi / 2 * r)
    if schedule == "linear":
        return 1.0 - r
    raise ValueError(f"schedule must be one of {MASKGIT_SCHEDULES}, got {schedule!r}")


def maskgit_step_scalars(
    num_tokens: int, step: int, num_steps: int, temperature: float, choice_temperature: float, schedule: str
) -> dict:
    """The per-step scalars shared by the kernels and the reference: n_base = floor(N·γ(r)), the confidence
    noise scale τ·(1−r), 1/T and whether this is the last step."""
    r = (step + 1) / num_steps
    return {
        "n_base": int(math.floor(num_tokens * mask_ratio(r, schedule))),
        "noise_scale": float(choice_temperature) * (1.0 - r),
        "inv_temperature": 1.0 / float(temperature),
        "last_step": step == num_steps - 1,
    }


def remask_counts(masked: torch.Tensor, n_base: int, last_step: bool) -> torch.Tensor:
    """n = max(1, min(#masked − 1, n_base)) per row before the last step; 0 at the last step or when nothing
    is masked."""
    if last_step:
        return torch.zeros_like(masked)
    n = torch.clamp(torch.clamp(masked - 1, max=n_base), min=1)
    return torch.where(masked > 0, n, torch.zeros_like(n))


def maskgit_step(
    cond_logits: torch.Tensor,
    tokens: torch.Tensor,
    step: int,
    num_steps: int,
    *,
    mask_id: int,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    schedule: str = "cosine",
    uniform: torch.Tensor | None = None,
    gumbel: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_confidence: bool = False,
):
    """One MaskGIT step the way Show-o writes it: guidance, softmax over the full [B, N, K] matrix, a draw for
    every position, gather, and a full sort of the confidences per row.

    `uniform [B, N]` (float64 in [0, 1)) and `gumbel [B, N]` (fp32) replace the random draws; with
    `philox_noise((B, N), seed, offset, kind=...)` they are exactly the noise the kernels use, so the two agree
    token for token (the draw is the inverse CDF: the first k with cdf_k > uniform). Without them the draw is
    torch.multinomial and torch.rand, as in Show-o. Returns (new_tokens, sampled[, confidence])."""
    B, N, K = cond_logits.shape
    s = maskgit_step_scalars(N, step, num_steps, temperature, choice_temperature, schedule)
    z = cond_logits.float()
    if guidance_scale != 0:
        z = z + guidance_scale * (z - uncond_logits.float())
    z = z * torch.tensor(s["inv_temperature"], dtype=torch.float32)
    logp = torch.log_softmax(z.double(), dim=-1)
    probs = logp.exp()
    if uniform is None:
        draw = torch.multinomial(probs.view(-1, K), 1, generator=generator).view(B, N)
    else:
        cdf = probs.cumsum(-1)
        target = (uniform.double().to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
        draw = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=K - 1)
    unknown = tokens == mask_id
    sampled = torch.where(unknown, draw, tokens)
    if gumbel is None:
        u = torch.rand(B, N, generator=generator, dtype=torch.float64).clamp(1e-20, 1 - 1e-16)
        gumbel = -torch.log(-torch.log(u))
    conf = logp.gather(-1, torch.where(unknown, draw, torch.zeros_like(draw)).unsqueeze(-1)).squeeze(-1)
    conf = (conf + s["noise_scale"] * gumbel.double().to(conf.device)).float()
    conf = torch.where(unknown, conf, torch.full_like(conf, math.inf))
    n = remask_counts(unknown.sum(-1), s["n_base"], s["last_step"])
    order = torch.sort(conf, dim=-1, stable=True).indices        # full sort, as Show-o
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=order.device).expand(B, N))
    remask = rank < n[:, None]
    new_tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
    if return_confidence:
        return new_tokens, sampled, conf
    return new_tokens, sampled


def next_token_allowed(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """The tokens that top-k then top-p keep (ties at either threshold kept), and the fp64 probabilities of
    softmax(z / T). Returns (allowed [B, V] bool, probs [B, V])."""
    z = logits.float() * torch.tensor(1.0 / temperature, dtype=torch.float32)
    probs = torch.softmax(z.double(), dim=-1)
    V = z.shape[-1]
    allowed = torch.ones_like(z, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        allowed &= z >= kth
    if top_p < 1.0:
        p = torch.where(allowed, probs, torch.zeros_like(probs))
        p = p / p.sum(-1, keepdim=True)
        desc = torch.sort(z, dim=-1, descending=True)
        cum = torch.cat([torch.zeros_like(p[..., :1]), p.gather(-1, desc.indices).cumsum(-1)], -1)
        # mass of the tokens strictly above each token's logit
        n_above = torch.searchsorted(-desc.values, -z, side="left")
        mass_above = cum.gather(-1, n_above)
        allowed &= mass_above < top_p
    return allowed, probs


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Temperature / top-k / top-p sampling with a full sort (the HF-style eager way). `uniform [B]` (float64)
    replaces the draw: the first allowed k whose renormalised cdf exceeds it (as the kernels)."""
    if temperature == 0 or top_k == 1:
        return torch.argmax(logits.float(), dim=-1)
    allowed, probs = next_token_allowed(logits, temperature, top_k, top_p)
    p = torch.where(allowed, probs, torch.zeros_like(probs))
    if uniform is None:
        return torch.multinomial(p, 1, generator=generator).squeeze(-1)
    cdf = p.cumsum(-1)
    target = (uniform.double().to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
