"""The per-row primitives under the D3Diff loss, each tested alone against plain torch."""
import math
import os

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import unif2ace
from unif2ace import _C
from unif2ace.ops import row_lse_target, softmax_onehot_grad
from unif2ace.ops.loss import _acc_dtype, _round_up

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


# ----------------------------------------------------------------------------------------------------------
# The D3Diff row kernels, called through the binding on padded buffers and column slices
# ----------------------------------------------------------------------------------------------------------
def d3diff_rows_reference(z, target, w, alpha, sedd, scale, ignore_index=-100):
    """fp64 loss rows and scale·∂ℓ/∂z written out from docs/design.md §4 (independent of the kernels)."""
    z = z.double()
    n, k = z.shape
    valid = target != ignore_index
    y = target.clamp(min=0)
    lse = torch.logsumexp(z, -1)
    ce = lse - z.gather(1, y[:, None]).squeeze(1)
    aw = alpha * w.double()
    u = lse - torch.log(torch.tensor(float(k), dtype=torch.float64))
    phi = torch.expm1(u) - u if sedd else torch.zeros_like(u)
    loss = torch.where(valid, (1 + aw) * ce + aw * phi, torch.zeros_like(ce))
    e = aw * torch.expm1(u) if sedd else torch.zeros_like(u)
    p = torch.softmax(z, -1)
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    grad = scale.double()[:, None] * ((1 + aw + e)[:, None] * p - (1 + aw)[:, None] * onehot)
    grad[~valid] = 0
    return loss, grad


def padded(z, ld):
    """z [N, K] copied into the first K columns of a [N, ld] buffer whose padding holds garbage."""
    buf = torch.full((z.shape[0], ld), float("nan"), dtype=z.dtype, device=z.device)
    buf[:, : z.shape[1]] = z
    return buf


def call_d3diff_rows(buf, k, target, w, alpha, sedd, scale=None, grad=None, ignore_index=-100):
    acc = _acc_dtype(buf)
    n = buf.shape[0]
    loss, m, l = (torch.empty(n, dtype=acc, device=buf.device) for _ in range(3))
    stream = torch.cuda.current_stream().cuda_stream if buf.is_cuda else 0
    _C.d3diff_rows(to_dlpack(buf), k, to_dlpack(target), ignore_index, to_dlpack(w), alpha, sedd,
                   None if scale is None else to_dlpack(scale), to_dlpack(loss), to_dlpack(m), to_dlpack(l),
                   None if grad is None else to_dlpack(grad), stream)
    return loss, m, l


def call_d3diff_rows_grad(buf, n_cols, col0, k, target, w, m, l, scale, grad, alpha, sedd, ignore_index=-100):
    stream = torch.cuda.current_stream().cuda_stream if buf.is_cuda else 0
    _C.d3diff_rows_grad(to_dlpack(buf), n_cols, col0, k, to_dlpack(target), ignore_index, to_dlpack(w), alpha, sedd,
                        to_dlpack(m), to_dlpack(l), to_dlpack(scale), to_dlpack(grad), stream)


D3_SHAPES = [(1, 1), (1, 7), (5, 33), (17, 1000), (3, 8193)]
# Loss rows against fp64: fp32 accumulation over up to 8k columns, amplified by eᵘ in the sedd term (the fp32 bound
# of docs/design.md §3, 1e-5 relative).
D3_TOL = {torch.float64: (1e-12, 1e-14)}


@pytest.mark.parametrize("shape", D3_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sedd", [False, True])
def test_d3diff_rows_kernels_match_reference(shape, dtype, sedd):
    """Loss, statistics and in-place gradient of whole rows in a padded buffer, then the gradient again from the
    statistics over column slices of odd widths, against fp64 formulas on the same (dtype-exact) inputs."""
    n, k = shape
    logits, target = make_rows(n, k, dtype)
    acc = _acc_dtype(logits)
    w, scale = torch.rand(n, dtype=acc) * 3, torch.randn(n, dtype=acc)
    alpha = 0.3
    ref_loss, ref_grad = d3diff_rows_reference(logits, target, w, alpha, sedd, scale)
    ld = k + 5  # an odd padding: rows start misaligned as well
    buf = padded(logits, ld)
    loss, m, l = call_d3diff_rows(buf, k, target, w, alpha, sedd, scale, grad=buf)
    rtol, atol = D3_TOL.get(dtype, (1e-5, 1e-6))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    valid = target != -100
    torch.testing.assert_close((m + l).double()[valid], torch.logsumexp(logits.double(), -1)[valid],
                               rtol=min(rtol, 2e-6), atol=atol)
    assert (m[~valid] == 0).all() and (l[~valid] == 0).all() and (loss[~valid] == 0).all()
    grad_tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(
        rtol=2e-5 if dtype == torch.float32 else torch.finfo(dtype).eps, atol=1e-6 if dtype == torch.float32 else 1e-4)
    torch.testing.assert_close(buf[:, :k].double(), ref_grad.to(dtype).double(), **grad_tol)
    assert buf[:, k:].isnan().all()  # the padding is never written
    # The same gradient from the statistics, slice by slice (about five slices of an odd width and the remainder),
    # out of place.
    step = k // 5 | 1
    out = torch.zeros(n, step, dtype=dtype)
    for col0 in range(0, k, step):
        width = min(step, k - col0)
        src = padded(logits[:, col0:col0 + width], step)
        call_d3diff_rows_grad(src, width, col0, k, target, w, m, l, scale, out, alpha, sedd)
        assert torch.equal(out[:, :width], buf[:, col0:col0 + width]), col0


def test_d3diff_rows_huge_equal_logits():
    """Ten equal logits of 1e8: CE = log 10 (lse − z_y would give 0 in fp32), softmax 0.1."""
    for dtype, value in ((torch.float32, 1e8), (torch.bfloat16, 1e8), (torch.float16, 6e4), (torch.float32, -3e38)):
        z = torch.full((1, 10), value, dtype=dtype)
        target, w, scale = torch.tensor([3]), torch.zeros(1), torch.ones(1)
        loss, m, l = call_d3diff_rows(z.clone(), 10, target, w, 0.0, False)
        assert abs(loss.item() - math.log(10)) < 1e-6, (dtype, loss)
        g = z.clone()
        call_d3diff_rows(g, 10, target, w, 0.0, False, scale, grad=g)
        expected = torch.full((1, 10), 0.1).to(dtype).float()
        expected[0, 3] = (torch.tensor(0.1).to(dtype).float() - 1).to(dtype).float()
        torch.testing.assert_close(g.float(), expected, rtol=1e-6, atol=1e-7)


def test_d3diff_rows_special_values():
    """+inf or NaN in a contributing row: NaN loss and gradient row (as torch); a −inf target logit: +inf loss and
    a finite gradient; a row of only −inf: NaN; ignored rows are not read."""
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[0.0, inf, 1.0], [0.5, 1.0, nan], [-inf, 1.0, 2.0], [-inf, -inf, -inf], [nan, inf, -inf],
                      [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 0, 0, 1, -100, 2])
    w, scale = torch.ones(6), torch.ones(6)
    g = z.clone()
    loss, _, _ = call_d3diff_rows(z.clone(), 3, target, w, 0.1, True, scale, grad=g)
    assert loss[0].isnan() and loss[1].isnan() and loss[3].isnan()
    assert loss[2] == inf and loss[4] == 0 and torch.isfinite(loss[5])
    assert g[0].isnan().all() and g[1].isnan().all() and g[3].isnan().all()
    assert torch.isfinite(g[2]).all() and (g[4] == 0).all()
    # Torch's cross-entropy agrees on every contributing row.
    ce = torch.nn.functional.cross_entropy(z, target, reduction="none")
    plain, _, _ = call_d3diff_rows(z.clone(), 3, target, torch.zeros(6), 0.0, False)
    contributing = target != -100
    assert torch.equal(plain[contributing].isnan(), ce[contributing].isnan())
    assert plain[2] == ce[2] == inf


def test_d3diff_binding_validates_arguments():
    logits, target = make_rows(4, 9, torch.float32, ignore_frac=0)
    w = torch.ones(4)
    with pytest.raises(ValueError, match="alpha"):
        call_d3diff_rows(logits, 9, target, w, float("nan"), False)
    with pytest.raises(ValueError, match="alpha"):
        call_d3diff_rows(logits, 9, target, w, -1.0, False)
    with pytest.raises(ValueError, match="n_cols"):
        call_d3diff_rows(logits, 10, target, w, 0.0, False)
    with pytest.raises(ValueError, match="row_scale"):
        call_d3diff_rows(logits, 9, target, w, 0.0, False, None, grad=logits)
    with pytest.raises(ValueError, match="row_weight"):
        call_d3diff_rows(logits, 9, target, w.double(), 0.0, False)
    m = l = s = torch.zeros(4)
    with pytest.raises(ValueError, match="col0"):
        call_d3diff_rows_grad(logits, 9, 5, 10, target, w, m, l, s, logits, 0.0, False)
    target[1] = 9
    before = logits.clone()
    with pytest.raises(ValueError, match=r"target\[1\]"):
        call_d3diff_rows(logits, 9, target, w, 0.0, False, s, grad=logits)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("call", [
    lambda z, t: row_lse_target(z, t, 2**63),
    lambda z, t: row_lse_target(z, t, -(2**63) - 1),
    lambda z, t: row_lse_target(z, t, -100.0),
    lambda z, t: softmax_onehot_grad(z, torch.zeros(4), t, torch.ones(4), torch.ones(4), ignore_index=2**64),
])
def test_primitives_validate_ignore_index(call):
    logits, target = make_rows(4, 9, torch.float32)
    with pytest.raises(ValueError, match="ignore_index"):
        call(logits, target)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (64, 1000)]
                         + ([] if os.environ.get("UNIF2ACE_SMALL") else [(3, 8193), (9, 58498)]))
@pytest.mark.parametrize("ld_extra", [0, 3, 64])
def test_cuda_d3diff_rows_match_cpu(shape, dtype, ld_extra):
    """Aligned (padded), misaligned (odd ld) and unpadded rows, whole rows and column slices, in and out of place."""
    n, k = shape
    logits, target = make_rows(n, k, dtype)
    target[0] = 0 if target[0] == -100 else target[0]  # at least one contributing row
    w, scale = torch.rand(n) * 3, torch.randn(n)
    for sedd in (False, True):
        ld = _round_up(k, 64) if ld_extra == 64 else k + ld_extra
        cpu_buf = padded(logits, ld)
        loss, m, l = call_d3diff_rows(cpu_buf, k, target, w, 0.2, sedd, scale, grad=cpu_buf)
        dev_buf = padded(logits.cuda(), ld)
        args = [t.cuda() for t in (target, w)]
        loss_c, m_c, l_c = call_d3diff_rows(dev_buf, k, *args, 0.2, sedd, scale.cuda(), grad=dev_buf)
        torch.testing.assert_close(loss_c.cpu(), loss, rtol=2e-6, atol=2e-6)
        assert torch.equal(m_c.cpu(), m)
        torch.testing.assert_close(l_c.cpu(), l, rtol=2e-6, atol=2e-6)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(dev_buf.cpu().double(), cpu_buf.double(), rtol=tol, atol=tol, equal_nan=True)
        # Column slices of 1000 (or fewer) columns from the statistics, out of place into an aligned buffer.
        width = min(1000, k)
        for col0 in (0, k - width):
            src = padded(logits[:, col0:col0 + width].cuda(), width + ld_extra)
            out = torch.empty_like(src)
            call_d3diff_rows_grad(src, width, col0, k, *args, m_c, l_c, scale.cuda(), out, 0.2, sedd)
            torch.testing.assert_close(out[:, :width].cpu().double(), cpu_buf[:, col0:col0 + width].double(),
                                       rtol=tol, atol=tol)
        # Bit-identical on repeat.
        again = padded(logits.cuda(), ld)
        assert torch.equal(call_d3diff_rows(again, k, *args, 0.2, sedd, scale.cuda(), grad=again)[0], loss_c)
        assert torch.equal(again, dev_buf)


@pytest.mark.cuda
def test_cuda_d3diff_rows_special_values_and_bad_target():
    inf = float("inf")
    z = torch.tensor([[0.0, inf, 1.0], [-inf, 1.0, 2.0], [1e8, 1e8, 1e8], [1.0, 2.0, 3.0]])
    target = torch.tensor([0, 0, 1, 7])
    cpu_loss, _, _ = call_d3diff_rows(z.clone(), 3, target.clamp(max=2), torch.ones(4), 0.1, True)
    loss, m, _ = call_d3diff_rows(z.cuda(), 3, target.cuda(), torch.ones(4).cuda(), 0.1, True)
    assert loss[0].isnan() and loss[1] == inf and loss[3].isnan() and m[3].isnan()
    plain, _, _ = call_d3diff_rows(z.cuda(), 3, target.clamp(max=2).cuda(), torch.zeros(4).cuda(), 0.0, False)
    assert abs(plain[2].item() - math.log(3)) < 1e-6
    assert torch.equal(loss[:3].isnan().cpu(), cpu_loss[:3].isnan())
