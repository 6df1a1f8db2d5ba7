"""Shared helpers of the model tests.

TEMPORARY: until the `moe` and `sampling` branches land, `install_standins()` registers minimal plain-PyTorch
stand-ins for unif2ace.nn.moe.GroupedTokenMoE / GroupedSequenceMoE and unif2ace.ops.maskgit_generate /
sample_next_token with the agreed signatures. Remove the stand-ins once the branches are merged.
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


class _TokenMoE(nn.Module):
    def __init__(self, hidden_size, expert_hidden_size, *, num_groups=2, experts_per_group=8, top_k=4,
                 shared_expert=True, shared_hidden_size=None, renormalize=True, activation="gelu_tanh",
                 backend="kernels"):
        super().__init__()
        G, E, H, Fh = num_groups, experts_per_group, hidden_size, expert_hidden_size
        S = shared_hidden_size or expert_hidden_size
        self.G, self.E, self.k, self.renormalize = G, E, top_k, renormalize
        self.router = nn.Parameter(torch.randn(G, E, H) * 0.02)
        self.w1 = nn.Parameter(torch.randn(G, E, H, Fh) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(G, E, Fh))
        self.w2 = nn.Parameter(torch.randn(G, E, Fh, H) * 0.02)
        self.b2 = nn.Parameter(torch.zeros(G, E, H))
        self.s1 = nn.Parameter(torch.randn(G, H, S) * 0.02)
        self.sb1 = nn.Parameter(torch.zeros(G, S))
        self.s2 = nn.Parameter(torch.randn(G, S, H) * 0.02)
        self.sb2 = nn.Parameter(torch.zeros(G, H))

    def forward(self, x, group_ids):
        B, L, H = x.shape
        g = (group_ids if group_ids.dim() == 2 else group_ids[:, None].expand(B, L)).reshape(-1)
        xs = x.reshape(-1, H)
        y = torch.zeros_like(xs)
        aux = x.new_zeros(())
        for grp in range(self.G):
            sel = (g == grp).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            t = xs[sel]
            probs = torch.softmax(t @ self.router[grp].t(), -1)
            top_p, top_i = probs.topk(self.k, -1)
            if self.renormalize:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)
            hid = F.gelu(torch.einsum("th,ehf->tef", t, self.w1[grp]) + self.b1[grp], approximate="tanh")
            out = torch.einsum("tef,efh->teh", hid, self.w2[grp]) + self.b2[grp]
            yt = (gates[..., None] * out).sum(1)
            sh = F.gelu(t @ self.s1[grp] + self.sb1[grp], approximate="tanh")
            yt = yt + sh @ self.s2[grp] + self.sb2[grp]
            y = y.index_add(0, sel, yt)
            f = F.one_hot(top_i, self.E).float().sum(1).mean(0) / self.k
            aux = aux + self.E * (f * probs.mean(0)).sum()
        return y.view(B, L, H), aux


class _SeqMoE(nn.Module):
    def __init__(self, hidden_size, *, groups=(("clip", "face", "copy", "copy"), ("copy", "zero", "noise", "copy")),
                 top_k=2, embedding_dims={"clip": 512, "face": 512}, noise_dim=64, backend="kernels"):
        super().__init__()
        self.groups, self.k, self.noise_dim = groups, top_k, noise_dim
        n = len(groups[0])
        self.router = nn.Parameter(torch.randn(len(groups), n, hidden_size) * 0.02)
        dims = dict(embedding_dims, noise=noise_dim)
        self.resamplers = nn.ModuleDict({k: nn.Linear(dims[k], hidden_size) for g in groups for k in g
                                         if k in dims})
        self.mix_logits = nn.Parameter(torch.zeros(len(groups), n, 2))

    def forward(self, x, group_ids, padding_mask, embeddings):
        B, L, H = x.shape
        pm = padding_mask.to(x.dtype)[..., None]
        pooled = (x * pm).sum(1) / pm.sum(1).clamp(min=1)
        probs = torch.softmax(torch.einsum("bh,beh->be", pooled, self.router[group_ids]), -1)
        top_p, top_i = probs.topk(self.k, -1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for b in range(B):
            grp = int(group_ids[b])
            for s in range(self.k):
                e = int(top_i[b, s])
                kind = self.groups[grp][e]
                if kind == "copy":
                    out = x[b]
                elif kind == "zero":
                    out = torch.zeros_like(x[b])
                else:
                    f = torch.randn(self.noise_dim, dtype=x.dtype) if kind == "noise" else embeddings[kind][b]
                    w = torch.softmax(self.mix_logits[grp, e], -1)
                    out = w[0] * x[b] + w[1] * self.resamplers[kind](f)[None]
                y[b] = y[b] + top_p[b, s] * out
        aux = x.new_zeros(())
        for grp in range(len(self.groups)):
            sel = group_ids == grp
            if sel.any():
                n = probs.shape[-1]
                f = F.one_hot(top_i[sel], n).float().sum(1).mean(0) / self.k
                aux = aux + n * (f * probs[sel].mean(0)).sum()
        return y, aux


def _maskgit_generate(logits_fn, batch_size, num_tokens, codebook_size, *, num_steps, mask_id, seed,
                      init_tokens=None, guidance_scale=0.0, temperature=1.0, choice_temperature=1.0,
                      schedule="cosine", progress=False, backend="kernels", **_):
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.full((batch_size, num_tokens), mask_id) if init_tokens is None else init_tokens.clone()).long()
    for step in range(num_steps):
        out = logits_fn(tokens)
        z = out[0] + guidance_scale * (out[0] - out[1]) if guidance_scale > 0 else out
        p = torch.softmax(z.float() / temperature, -1)
        x = torch.multinomial(p.view(-1, codebook_size), 1, generator=g).view(batch_size, num_tokens)
        unknown = tokens == mask_id
        x = torch.where(unknown, x, tokens)
        r = (step + 1) / num_steps
        conf = torch.log(p.gather(-1, x[..., None]).squeeze(-1).clamp_min(1e-30))
        u = torch.rand(conf.shape, generator=g).clamp(1e-20, 1 - 1e-7)
        conf = conf + choice_temperature * (1 - r) * -torch.log(-torch.log(u))
        conf = torch.where(unknown, conf, torch.full_like(conf, float("inf")))
        if step + 1 == num_steps:
            tokens = x
            break
        n = (unknown.sum(-1) - 1).clamp(min=1).clamp(max=math.floor(num_tokens * math.cos(math.pi / 2 * r)))
        n = n.clamp(min=1)
        order = conf.argsort(dim=-1, stable=True).argsort(-1)
        tokens = torch.where(order < n[:, None], torch.full_like(x, mask_id), x)
    return tokens


def _sample_next_token(logits, *, temperature=1.0, top_k=0, top_p=1.0, seed, offset=0):
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    z = logits.float() / temperature
    if top_k > 0:
        kth = z.topk(top_k, -1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    g = torch.Generator().manual_seed(seed * 1000003 + offset)
    return torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)


def install_standins() -> None:
    """TEMPORARY: register the stand-ins where the real modules are still missing."""
    import unif2ace
    import unif2ace.ops as ops

    try:
        import unif2ace.nn.moe  # noqa: F401
    except ImportError:
        nn_pkg = types.ModuleType("unif2ace.nn")
        nn_pkg.__path__ = []
        moe = types.ModuleType("unif2ace.nn.moe")
        moe.GroupedTokenMoE, moe.GroupedSequenceMoE = _TokenMoE, _SeqMoE
        nn_pkg.moe = moe
        sys.modules["unif2ace.nn"], sys.modules["unif2ace.nn.moe"] = nn_pkg, moe
        unif2ace.nn = nn_pkg
    if not hasattr(ops, "maskgit_generate"):
        ops.maskgit_generate = _maskgit_generate
    if not hasattr(ops, "sample_next_token"):
        ops.sample_next_token = _sample_next_token


install_standins()
