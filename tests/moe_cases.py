"""Inputs and the plain per-expert loop shared by the expert-pass tests (test_moe_experts, test_moe_grouped)."""
import torch
import torch.nn.functional as F


def gen(seed):
    return torch.Generator().manual_seed(seed)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def expert_inputs(T, H, F_, NE, k, dtype, seed, empty_experts=(), one_expert=None):
    """x [T, H], renormalised top-k gates and expert ids [T, k] of a random router (experts in `empty_experts` get no
    token; `one_expert` sends every slot to that expert), and stacked expert weights (w1, b1, w2, b2)."""
    g = gen(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    scores = torch.randn(T, NE, generator=g)
    for e in empty_experts:
        scores[:, e] = -1e9
    gates, ids = torch.softmax(scores, -1).topk(k, -1)
    if one_expert is not None:
        ids = torch.full_like(ids, one_expert)
    gates = (gates / gates.sum(-1, keepdim=True)).to(acc_dtype(dtype))
    w1 = (torch.randn(NE, F_, H, generator=g) * 0.3).to(dtype)
    b1 = (torch.randn(NE, F_, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(NE, H, F_, generator=g) * 0.3).to(dtype)
    b2 = (torch.randn(NE, H, generator=g) * 0.3).to(dtype)
    return x, gates, ids, (w1, b1, w2, b2)


def plain_experts(x, gates, ids, weights, activation="gelu_tanh"):
    """The loop a user writes: for each expert, its tokens, its MLP, weighted index_add (weights of 1 without gates)."""
    w1, b1, w2, b2 = weights
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(ids == e)
        out = F.linear(F.gelu(F.linear(x[tok], w1[e], b1[e]), approximate=approximate), w2[e], b2[e])
        scale = gates[tok, slot, None].to(x.dtype) if gates is not None else 1
        y = y.index_add(0, tok, out * scale)
    return y
