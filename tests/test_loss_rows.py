"""The per-row primitives under the D3Diff loss, each tested alone against plain torch."""
import pytest
import torch

import unif2ace
from unif2ace import _C
from unif2ace.ops import row_lse_target, softmax_onehot_grad
from unif2ace.ops.loss import _acc_dtype

SHAPES = [(1, 1), (1, 7), (5, 33), (64, 1000), (3, 8193), (17, 31)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Tolerance of the row statistics against fp64 (inputs are exactly representable in the dtype, so only the
# accumulation differs: fp32 everywhere but fp64).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def make_rows(n, k, dtype, scale=3.0, ignore_frac=0.3):
    logits = (torch.randn(n, k, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, k, (n,))
    target[torch.rand(n) < ignore_frac] = -100
    return logits, target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_lse_target_matches_torch(shape, dtype):
    logits, target = make_rows(*shape, dtype)
    lse, z_t = row_lse_target(logits, target, -100)
    assert lse.dtype == _acc_dtype(logits) and z_t.dtype == lse.dtype
    exact = logits.double()
    valid = target != -100
    ref_lse = torch.logsumexp(exact, -1)
    ref_zt = exact.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
    torch.testing.assert_close(lse.double()[valid], ref_lse[valid], rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(z_t.double()[valid], ref_zt[valid], rtol=0, atol=0)
    assert (lse[~valid] == 0).all() and (z_t[~valid] == 0).all()


def test_row_lse_large_logits_and_ties():
    logits = torch.tensor([[1e4, -1e4, 1e4, 0.0], [-1e4, -1e4, -1e4, -1e4], [5.0, 5.0, 5.0, 5.0]])
    target = torch.tensor([1, 0, 3])
    lse, z_t = row_lse_target(logits, target)
    torch.testing.assert_close(lse, torch.logsumexp(logits.double(), -1).float())
    assert torch.equal(z_t, torch.tensor([-1e4, -1e4, 5.0]))


def reference_grad(logits, target, lse, a, b, ignore_index=-100):
    p = torch.softmax(logits.double(), -1)
    valid = target != ignore_index
    onehot = torch.zeros_like(p)
    onehot[valid, target[valid]] = 1
    g = a.double()[:, None] * p - b.double()[:, None] * onehot
    g[~valid] = 0
    return g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_onehot_grad_matches_torch(shape, dtype):
    logits, target = make_rows(*shape, dtype)
    lse, _ = row_lse_target(logits, target)
    acc = lse.dtype
    a, b = torch.randn(shape[0], dtype=acc), torch.randn(shape[0], dtype=acc)
    grad = softmax_onehot_grad(logits, lse, target, a, b)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref = reference_grad(logits, target, lse, a, b)
    if dtype == torch.float64:
        torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-14)
    else:
        # Within one rounding of the output dtype (plus fp32 accumulation error).
        torch.testing.assert_close(grad.double(), ref.to(dtype).double(), rtol=2e-5 if dtype == torch.float32 else
                                   torch.finfo(dtype).eps, atol=1e-6 if dtype == torch.float32 else 1e-4)
    # In place gives the same bits.
    inplace = logits.clone()
    softmax_onehot_grad(inplace, lse, target, a, b, inplace=True)
    assert torch.equal(inplace, grad)


def test_row_lse_target_gradcheck_fp64():
    logits = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 12, -100, 5, 5, 7])
    assert torch.autograd.gradcheck(lambda z: row_lse_target(z, target), (logits,))


def test_ops_opcheck():
    logits, target = make_rows(9, 37, torch.float32)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.unif2ace.row_lse_target.default, (logits, target, -100))
    lse, _ = row_lse_target(logits.detach(), target)
    a, b = torch.randn(9), torch.randn(9)
    torch.library.opcheck(torch.ops.unif2ace.softmax_onehot_grad.default, (logits.detach(), lse, target, a, b, -100))
    torch.library.opcheck(torch.ops.unif2ace.softmax_onehot_grad_.default,
                          (logits.detach().clone(), lse, target, a, b, -100))


@pytest.mark.parametrize("bad", [7, -1, -101, 10**12])
def test_bad_target_raises_and_writes_nothing(bad):
    logits, target = make_rows(4, 7, torch.float32, ignore_frac=0)
    target[2] = bad
    before = logits.clone()
    with pytest.raises(ValueError, match=r"target\[2\]"):
        row_lse_target(logits, target)
    lse = torch.zeros(4)
    with pytest.raises(ValueError, match=r"target\[2\]"):
        softmax_onehot_grad(logits, lse, target, torch.ones(4), torch.ones(4), inplace=True)
    assert torch.equal(logits, before)


def test_bad_shapes_and_dtypes():
    logits, target = make_rows(4, 7, torch.float32)
    with pytest.raises(ValueError, match="logits"):
        row_lse_target(logits[0], target)
    with pytest.raises(ValueError, match="target"):
        row_lse_target(logits, target[:3])
    with pytest.raises(ValueError, match="target"):
        row_lse_target(logits, target.int())
    with pytest.raises(ValueError, match="logits"):
        row_lse_target(logits.long(), target)
    lse, _ = row_lse_target(logits, target)
    with pytest.raises(ValueError, match="coef_softmax"):
        softmax_onehot_grad(logits, lse, target, torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="lse"):
        softmax_onehot_grad(logits, lse.double(), target, torch.ones(4), torch.ones(4))


def test_binding_rejects_non_contiguous_and_wrong_dtype():
    """The C++ boundary validates by itself (embedders call it without the Python checks)."""
    from torch.utils.dlpack import to_dlpack

    logits = torch.randn(8, 6).t()  # [6, 8], not contiguous
    target = torch.zeros(6, dtype=torch.int64)
    lse, zt = torch.empty(6), torch.empty(6)
    with pytest.raises(ValueError, match="contiguous"):
        _C.row_lse_target(to_dlpack(logits), to_dlpack(target), -100, to_dlpack(lse), to_dlpack(zt), 0)
    with pytest.raises(ValueError, match="target: dtype"):
        _C.row_lse_target(to_dlpack(logits.contiguous()), to_dlpack(target.int()), -100, to_dlpack(lse),
                          to_dlpack(zt), 0)
    with pytest.raises(ValueError, match="lse: expected shape"):
        _C.row_lse_target(to_dlpack(logits.contiguous()), to_dlpack(target), -100, to_dlpack(lse[:5]),
                          to_dlpack(zt), 0)


def test_thread_count_does_not_change_bits():
    logits, target = make_rows(257, 999, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = row_lse_target(logits, target)
        torch.set_num_threads(max(2, threads))
        many = row_lse_target(logits, target)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_cuda_unavailable_is_a_clean_error():
    if unif2ace.WITH_CUDA and torch.cuda.is_available():
        assert _C.cuda_device_count() >= 1
    else:
        with pytest.raises(RuntimeError, match="CUDA"):
            _C.cuda_device_count()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (64, 1000), (3, 8193)])
def test_cuda_rows_match_cpu(shape, dtype):
    logits, target = make_rows(*shape, dtype)
    lse, z_t = row_lse_target(logits, target)
    lse_c, z_t_c = row_lse_target(logits.cuda(), target.cuda())
    torch.testing.assert_close(lse_c.cpu(), lse, rtol=2e-6, atol=2e-6)
    assert torch.equal(z_t_c.cpu(), z_t)
    a, b = torch.randn(shape[0]), torch.randn(shape[0])
    g = softmax_onehot_grad(logits, lse, target, a, b)
    g_c = softmax_onehot_grad(logits.cuda(), lse_c, target.cuda(), a.cuda(), b.cuda())
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(g_c.cpu().double(), g.double(), rtol=tol, atol=tol)
    # Deterministic on the device.
    assert torch.equal(row_lse_target(logits.cuda(), target.cuda())[0], lse_c)


@pytest.mark.cuda
def test_cuda_bad_target_is_nan_not_out_of_bounds():
    logits, target = make_rows(4, 7, torch.float32, ignore_frac=0)
    target[1] = 99
    lse, z_t = row_lse_target(logits.cuda(), target.cuda())
    assert torch.isnan(lse[1]) and torch.isfinite(lse[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_match_torch_bit_for_bit(dtype):
    """Reads: every 16-bit pattern widens exactly. Writes: fp32 -> 16 bit rounds like torch (nearest even,
    overflow to inf, subnormals, NaN stays NaN). With K = 1 the row kernels expose both directions."""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1).contiguous()
    zeros = torch.zeros(every.shape[0], dtype=torch.int64)
    _, widened = row_lse_target(every, zeros)
    expected = every.float().squeeze(1)
    assert torch.equal(widened.isnan(), expected.isnan())
    assert torch.equal(widened.nan_to_num(), expected.nan_to_num())

    g = torch.Generator().manual_seed(1)
    values = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-30, 20, (200_000,), generator=g).float())
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, 5.96e-8, 2.98e-8, 1e-45,
                             float("inf"), float("-inf"), float("nan"), 3.39e38])
    values = torch.cat([values, specials])
    n = values.shape[0]
    one_class = torch.zeros(n, 1, dtype=dtype)          # softmax over one class is exactly 1
    lse = torch.zeros(n)                                  # log-sum-exp of a single 0 logit
    out = softmax_onehot_grad(one_class, lse, torch.zeros(n, dtype=torch.int64), values, torch.zeros(n))
    rounded = values.to(dtype)
    assert torch.equal(out.squeeze(1).isnan(), rounded.isnan())
    assert torch.equal(out.squeeze(1).float().nan_to_num(), rounded.float().nan_to_num())
