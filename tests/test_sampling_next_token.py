"""Fused temperature / top-k / top-p next-token sampling: against the sort-based reference fed the same Philox
uniform, the allowed set and the renormalised law, greedy, determinism and bad inputs."""
import math

import numpy as np
import pytest
import torch

from unif2ace import ops
from unif2ace.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (5, 33), (16, 1000), (3, 50304)])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 1.0), (1.2, 0, 0.9),
                                                     (1.0, 50, 0.8), (0.5, 3, 0.5)])
def test_matches_reference_given_same_noise(B, V, dtype, temperature, top_k, top_p):
    logits = (torch.randn(B, V) * 3).to(dtype)
    got = ops.sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=5, offset=2)
    uni = ops.philox_noise(B, 5, 2, kind="uniform")
    want = ref.sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uni)
    assert torch.equal(got, want)


def test_greedy():
    logits = torch.randn(6, 100)
    logits[2, 10] = logits[2, 40] = 50.0  # a tie: the first index wins
    want = torch.argmax(logits, -1)
    assert torch.equal(ops.sample_next_token(logits, temperature=0.0, seed=0), want)
    assert torch.equal(ops.sample_next_token(logits, top_k=1, seed=3), want)
    assert ops.sample_next_token(logits, top_k=1, seed=3)[2] == 10


def _law(logits_row, draws, **kw):
    logits = logits_row.expand(draws, -1).contiguous()
    out = ops.sample_next_token(logits, seed=77, **kw)
    return np.bincount(out.numpy(), minlength=logits_row.numel())


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(top_k=4), dict(top_p=0.7),
                                dict(top_k=5, top_p=0.8, temperature=1.5)])
def test_law_and_allowed_set(kw):
    from scipy import stats

    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 1.2, 0.7, -0.1, 0.3])
    draws = 20000
    counts = _law(row, draws, **kw)
    allowed, probs = ref.next_token_allowed(row[None], kw.get("temperature", 1.0), kw.get("top_k", 0),
                                            kw.get("top_p", 1.0))
    allowed, probs = allowed[0].numpy(), probs[0].numpy()
    assert counts[~allowed].sum() == 0  # nothing outside the allowed set
    p = np.where(allowed, probs, 0.0)
    p = p / p.sum()
    assert stats.chisquare(counts[allowed], p[allowed] * draws).pvalue > 1e-3


def test_top_k_keeps_ties_and_top_p_minimal_set():
    row = torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0]])
    allowed, _ = ref.next_token_allowed(row, 1.0, 2, 1.0)
    assert allowed[0].tolist() == [True, True, True, False, False]
    out = _law(row[0], 3000, top_k=2)
    assert out[3:].sum() == 0 and (out[:3] > 0).all()
    # one token holds > 90 % of the mass: top_p = 0.9 keeps only it
    row = torch.tensor([10.0, 0.0, 0.0, 0.0])
    assert (ops.sample_next_token(row.expand(500, -1).contiguous(), top_p=0.9, seed=1) == 0).all()


def test_determinism_and_threads():
    logits = torch.randn(32, 5000, dtype=torch.bfloat16)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.sample_next_token(logits, top_k=100, top_p=0.9, seed=4, offset=9)
        torch.set_num_threads(max(2, prev))
        b = ops.sample_next_token(logits, top_k=100, top_p=0.9, seed=4, offset=9)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(a, b)
    c = ops.sample_next_token(logits, top_k=100, top_p=0.9, seed=4, offset=10)
    assert not torch.equal(a, c)


def test_peaked_and_neg_inf():
    logits = torch.full((4, 300), -1e30)
    logits[:, 17] = 1e30
    assert (ops.sample_next_token(logits, seed=0) == 17).all()
    logits = torch.randn(3, 50)
    logits[:, 1::2] = -math.inf
    assert (ops.sample_next_token(logits.expand(3, -1), seed=0, top_p=0.95) % 2 == 0).all()


def test_bad_inputs():
    logits = torch.randn(3, 20)
    for v in (math.nan, math.inf):
        bad = logits.clone()
        bad[2, 5] = v
        with pytest.raises(ValueError, match=r"logits\[2\]"):
            ops.sample_next_token(bad, seed=0)
    bad = logits.clone()
    bad[0] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        ops.sample_next_token(bad, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample_next_token(logits, top_p=0.0, seed=0)
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_next_token(logits, top_k=-1, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        ops.sample_next_token(logits, temperature=-1.0, seed=0)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_next_token(logits[0], seed=0)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_next_token(logits.double(), seed=0)


def test_opcheck():
    logits = torch.randn(4, 64)
    torch.library.opcheck(torch.ops.unif2ace.sample_next_token.default, (logits, 1.0, False, 10, 0.9, 3, 1))
    torch.library.opcheck(torch.ops.unif2ace.sample_next_token.default, (logits, 1.0, True, 0, 1.0, 3, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 7), (5, 33), (16, 50304)])
def test_cuda_matches_cpu(B, V, dtype):
    logits = (torch.randn(B, V) * 3).to(dtype)
    for kw in (dict(), dict(temperature=0.0), dict(top_k=40), dict(top_p=0.9), dict(top_k=50, top_p=0.8)):
        a = ops.sample_next_token(logits, seed=8, offset=1, **kw)
        b = ops.sample_next_token(logits.cuda(), seed=8, offset=1, **kw)
        assert torch.equal(a, b.cpu()), kw
