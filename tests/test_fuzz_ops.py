"""Property-based fuzzing of the op boundary: random shapes, dtypes, strides, ids and special values.
Every call must give a correct result or a clean Python error (ValueError/RuntimeError) — never a crash and
never a write outside the outputs (inputs are checked unchanged; under .ci/sanitize.sh AddressSanitizer
watches every access)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unif2ace.ops import d3diff_loss, linear_d3diff_loss, row_lse_target, softmax_onehot_grad
from unif2ace.ops import reference as ref

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPECIALS = [0.0, 1e4, -1e4, float("inf"), float("-inf"), float("nan")]


@st.composite
def loss_inputs(draw):
    n = draw(st.integers(0, 40))
    k = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 100.0])))
    if n and draw(st.booleans()):  # a few special values
        for _ in range(draw(st.integers(1, 3))):
            logits[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] = draw(st.sampled_from(SPECIALS))
    logits = logits.to(dtype)
    if draw(st.booleans()) and n > 1 and k > 1:  # non-contiguous views are accepted (copied)
        logits = logits.t().contiguous().t()
    target = torch.randint(0, k, (n,), generator=g)
    if n:
        target[torch.rand(n, generator=g) < draw(st.floats(0, 1))] = -100
    bad_target = draw(st.sampled_from([None, k, -1, 2**40, -(2**40)]))
    if bad_target is not None and n:
        target[draw(st.integers(0, n - 1))] = bad_target
    gamma = torch.rand(n, generator=g, dtype=torch.float64).clamp(min=1e-4)
    bad_gamma = draw(st.sampled_from([None, 0.0, -0.5, 1.5, float("nan")]))
    if bad_gamma is not None and n:
        gamma[draw(st.integers(0, n - 1))] = bad_gamma
    return logits, target, gamma, bad_target is not None and n > 0, bad_gamma is not None and n > 0


@FUZZ
@given(loss_inputs(), st.sampled_from(["normalized", "sedd"]), st.sampled_from(["mean", "sum", "none"]))
def test_d3diff_loss_fuzz(inputs, score, reduction):
    logits, target, gamma, bad_target, bad_gamma = inputs
    snapshot = (logits.clone(), target.clone(), gamma.clone())
    try:
        out = d3diff_loss(logits, target, gamma, score=score, reduction=reduction)
    except ValueError as e:
        assert bad_target or bad_gamma, f"unexpected error: {e}"
        msg = str(e)
        assert ("target" in msg) or ("gamma" in msg)
    else:
        assert not (bad_target or bad_gamma), "bad input was accepted"
        # The reference in the same accumulation dtype, so both overflow (e.g. SEDD's e^u) at the same inputs.
        exp = ref.d3diff_loss(logits, target, gamma, score=score, reduction=reduction)
        finite = torch.isfinite(exp)
        assert torch.equal(torch.isfinite(out), finite)
        if finite.any():
            torch.testing.assert_close(out[finite], exp[finite], rtol=2e-5, atol=2e-5)
    for before, after in zip(snapshot, (logits, target, gamma)):
        assert torch.equal(before, after) or (torch.isnan(before) == torch.isnan(after)).all()


@FUZZ
@given(loss_inputs())
def test_row_primitives_fuzz(inputs):
    logits, target, _, bad_target, _ = inputs
    snapshot = logits.clone()
    try:
        lse, z_t = row_lse_target(logits, target)
    except ValueError as e:
        assert bad_target and "target" in str(e)
        return
    assert not bad_target
    coef = torch.ones_like(lse)
    grad = softmax_onehot_grad(logits, lse, target, coef, coef)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    valid = target != -100
    assert (grad[~valid] == 0).all()
    assert torch.equal(snapshot.isnan(), logits.isnan()) and torch.equal(snapshot.nan_to_num(), logits.nan_to_num())


@FUZZ
@given(
    st.integers(0, 30), st.integers(1, 9), st.integers(1, 50), st.sampled_from([torch.float32, torch.float64]),
    st.one_of(st.none(), st.integers(-2, 64)), st.booleans(), st.integers(0, 2**31 - 1),
    st.sampled_from(["rows", "vocab"]), st.one_of(st.none(), st.integers(1, 64)),
)
def test_linear_d3diff_fuzz(n, h, k, dtype, chunk_size, with_bias, seed, strategy, vocab_chunk_size):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(k, h, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(k, generator=g, dtype=dtype, requires_grad=True) if with_bias else None
    target = torch.randint(0, k, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.3] = -100
    gamma = torch.rand(n, generator=g, dtype=dtype).clamp(min=1e-3)
    if chunk_size is not None and chunk_size <= 0:
        with pytest.raises(ValueError, match="chunk_size"):
            linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, chunk_size=chunk_size)
        return
    out = linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, chunk_size=chunk_size, score="sedd",
                             strategy=strategy, vocab_chunk_size=vocab_chunk_size)
    exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, score="sedd")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out, exp.to(out.dtype), rtol=tol, atol=tol)
    params = [p for p in (hidden, weight, bias) if p is not None]
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(exp, params)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    assert math.isfinite(out.item())
