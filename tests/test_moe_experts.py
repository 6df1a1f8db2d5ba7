"""The fused expert pass (ops.moe.moe_experts) and its combine kernel (moe_scatter_add_rows_) against plain-PyTorch
references: forward, gradients (gradcheck in fp64), recomputation, determinism, edge cases and bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import unif2ace
from unif2ace import ops
from unif2ace.ops import moe as moe_ops

from moe_cases import acc_dtype as _acc, expert_inputs as _experts_inputs, gen as _gen, plain_experts as _plain_experts

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and unif2ace.WITH_CUDA), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------------------
# moe_scatter_add_rows_
# ---------------------------------------------------------------------------------------------------------
def _distinct_slots(g, n_tokens, top_k, n_rows):
    """n_rows slots of distinct tokens, each token with a random slot j."""
    tokens = torch.randperm(n_tokens, generator=g)[:n_rows]
    return tokens * top_k + torch.randint(0, top_k, (n_rows,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,k,n_rows,H,weighted", [(37, 3, 20, 19, True), (1, 1, 1, 1, False), (50, 4, 0, 8, True),
                                                    (300, 2, 300, 65, False), (129, 4, 128, 256, True)])
def test_scatter_add_rows_matches_index_add(dtype, T, k, n_rows, H, weighted):
    g = _gen(T * 7 + n_rows)
    acc = _acc(dtype)
    out = torch.randn(T, H, generator=g, dtype=acc)
    rows = torch.randn(n_rows, H, generator=g).to(dtype)
    slots = _distinct_slots(g, T, k, n_rows)
    w = torch.rand(T * k, generator=g, dtype=acc) if weighted else None
    expected = out.clone().index_add_(0, slots // k, rows.to(acc) * (w[slots, None] if weighted else 1))
    got = moe_ops.moe_scatter_add_rows_(out, rows, slots, k, w)
    assert got is out
    torch.testing.assert_close(out, expected, rtol=1e-6 if acc == torch.float32 else 1e-12, atol=1e-6)


def test_scatter_add_rows_bad_inputs_leave_out_untouched():
    g = _gen(1)
    out = torch.randn(6, 4, generator=g)
    before = out.clone()
    rows = torch.randn(3, 4, generator=g)
    cases = [
        (torch.tensor([0, 2, 2]), "slots"),                 # token 1 twice (k = 2: slots 2, 2)
        (torch.tensor([0, 3, 2]), "slots"),                 # slots 2 and 3 are both token 1
        (torch.tensor([0, 2, 12]), "slots"),                # token 6 of 6
        (torch.tensor([0, -1, 4]), "slots"),
    ]
    for slots, name in cases:
        with pytest.raises(ValueError, match=name):
            moe_ops.moe_scatter_add_rows_(out, rows, slots, 2)
        assert torch.equal(out, before)
    with pytest.raises(ValueError, match="out"):
        moe_ops.moe_scatter_add_rows_(out.double(), rows, torch.tensor([0, 2, 4]), 2)
    with pytest.raises(ValueError, match="out"):
        moe_ops.moe_scatter_add_rows_(out[:, :3], rows, torch.tensor([0, 2, 4]), 2)
    with pytest.raises(ValueError, match="slots"):
        moe_ops.moe_scatter_add_rows_(out, rows, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="weights"):
        moe_ops.moe_scatter_add_rows_(out, rows, torch.tensor([0, 2, 4]), 2, torch.ones(5))
    with pytest.raises(ValueError, match="top_k"):
        moe_ops.moe_scatter_add_rows_(out, rows, torch.tensor([0, 2, 4]), 0)
    assert torch.equal(out, before)


def test_scatter_add_rows_opcheck():
    g = _gen(2)
    out = torch.randn(10, 5, generator=g)
    rows = torch.randn(4, 5, generator=g)
    slots = _distinct_slots(g, 10, 3, 4)
    torch.library.opcheck(torch.ops.unif2ace.moe_scatter_add_rows, (out, rows, slots, 3, torch.rand(30, generator=g)))
    torch.library.opcheck(torch.ops.unif2ace.moe_scatter_add_rows, (out, rows, slots, 3, None))


# ---------------------------------------------------------------------------------------------------------
# moe_gelu_tanh_backward_rows
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 8e-3),
                                       (torch.float16, 2e-3)])
@pytest.mark.parametrize("n,width,weighted", [(37, 19, True), (1, 1, False), (0, 5, True), (64, 256, False),
                                              (5, 300, True)])
def test_gelu_tanh_backward_rows_matches_autograd(dtype, tol, n, width, weighted):
    g = _gen(n * 31 + width)
    acc = _acc(dtype)
    pre = (torch.randn(n, width, generator=g, dtype=torch.float64) * 3)
    if pre.numel() > 4:  # saturated and zero inputs
        pre.view(-1)[:4] = torch.tensor([1e4, -1e4, 0.0, -0.0], dtype=torch.float64)
    pre = pre.to(dtype)
    d_hid = torch.randn(n, width, generator=g).to(dtype)
    w = torch.rand(n, generator=g, dtype=acc) if weighted else None
    hid_w, d_pre, row_dot = moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid, w)
    p64, d64 = pre.double(), d_hid.double()
    act = F.gelu(p64, approximate="tanh")
    scale = w.double()[:, None] if weighted else 1.0
    want_d_pre = torch.ops.aten.gelu_backward(d64, p64, approximate="tanh") * scale
    assert hid_w.dtype == dtype and d_pre.dtype == dtype and row_dot.dtype == acc
    torch.testing.assert_close(hid_w.double(), act * scale, rtol=tol, atol=tol)
    torch.testing.assert_close(d_pre.double(), want_d_pre, rtol=tol, atol=tol)
    # row_dot is accumulated in fp32 (fp64) from inputs every dtype represents exactly: fp32-level error for all.
    dot_tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(row_dot.double(), (d64 * act).sum(1), rtol=dot_tol, atol=dot_tol)


def test_gelu_tanh_backward_rows_opcheck_and_bad_inputs():
    g = _gen(3)
    pre, d_hid = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    torch.library.opcheck(torch.ops.unif2ace.moe_gelu_tanh_backward_rows, (pre, d_hid, torch.rand(6, generator=g)))
    torch.library.opcheck(torch.ops.unif2ace.moe_gelu_tanh_backward_rows, (pre, d_hid, None))
    with pytest.raises(ValueError, match="d_hid"):
        moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid[:5])
    with pytest.raises(ValueError, match="d_hid"):
        moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid.double())
    with pytest.raises(ValueError, match="row_weights"):
        moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid, torch.rand(5))
    with pytest.raises(ValueError, match="row_weights"):
        moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid, torch.rand(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="pre"):
        moe_ops.moe_gelu_tanh_backward_rows(pre.long(), d_hid)


# ---------------------------------------------------------------------------------------------------------
# moe_experts
# ---------------------------------------------------------------------------------------------------------
def _fused(x, gates, ids, weights, recompute=False, activation="gelu_tanh"):
    offsets, sorted_slot = ops.moe.moe_sort(ids, weights[0].shape[0])
    return moe_ops.moe_experts(x, gates, sorted_slot, offsets, *weights, activation, recompute=recompute)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("T,H,F_,NE,k", [(61, 24, 20, 6, 2), (1, 8, 4, 3, 3), (200, 33, 17, 16, 4)])
def test_experts_match_reference_with_gradients(dtype, tol, recompute, T, H, F_, NE, k):
    x, gates, ids, weights = _experts_inputs(T, H, F_, NE, k, dtype, seed=T + NE)
    dy = torch.randn(T, H, generator=_gen(5)).to(dtype)
    results = []
    for fn in (lambda *a: _fused(*a, recompute=recompute), _plain_experts):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
        y = fn(leaves[0], leaves[1], ids, leaves[2:])
        (y.to(torch.float64) * dy.to(torch.float64)).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(["y", "x", "gates", "w1", "b1", "w2", "b2"], *results):
        scale = b.abs().max().double().clamp(min=1)
        assert ((a.double() - b.double()).abs().max() / scale).item() <= tol, name


def test_experts_match_unfused_ops_and_gradcheck():
    x, gates, ids, weights = _experts_inputs(13, 6, 5, 4, 2, torch.float64, seed=3, empty_experts=(2,))
    x_sorted, offsets, sorted_slot = ops.moe_dispatch(x, ids, 4)
    unfused = ops.moe_combine(ops.grouped_mlp(x_sorted, offsets, *weights), gates, sorted_slot)
    torch.testing.assert_close(moe_ops.moe_experts(x, gates, sorted_slot, offsets, *weights), unfused)

    for recompute, activation in ((False, "gelu_tanh"), (True, "gelu")):
        def f(x, gates, *w):
            return moe_ops.moe_experts(x, gates, sorted_slot, offsets, *w, activation, recompute=recompute)

        leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
        assert torch.autograd.gradcheck(f, leaves)
    # Without gates (weights of 1, k = 1: the shared-expert pass).
    gid = torch.randint(0, 4, (13, 1), generator=_gen(4))
    offs1, slot1 = ops.moe.moe_sort(gid, 4)
    torch.testing.assert_close(moe_ops.moe_experts(x, None, slot1, offs1, *weights),
                               _plain_experts(x, None, gid, weights))
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    assert torch.autograd.gradcheck(lambda x, *w: moe_ops.moe_experts(x, None, slot1, offs1, *w), leaves)


def test_experts_recompute_is_bit_identical_and_runs_repeat():
    x, gates, ids, weights = _experts_inputs(300, 32, 24, 8, 4, torch.float32, seed=6)
    dy = torch.randn(300, 32, generator=_gen(7))
    runs = []
    for recompute in (False, True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
        y = _fused(leaves[0], leaves[1], ids, leaves[2:], recompute=recompute)
        (y * dy).sum().backward()
        runs.append([y.detach()] + [t.grad for t in leaves])
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_experts_all_tokens_to_one_expert_and_no_x_grad():
    x, gates, _, weights = _experts_inputs(9, 8, 6, 3, 1, torch.float64, seed=8)
    ids = torch.zeros(9, 1, dtype=torch.int64)
    w = [t.clone().requires_grad_() for t in weights]
    y = _fused(x, torch.ones(9, 1, dtype=torch.float64), ids, w)  # x needs no gradient
    torch.testing.assert_close(y, _plain_experts(x, None, ids, weights))
    y.sum().backward()
    assert all(t.grad is not None for t in w)
    assert torch.count_nonzero(w[0].grad[1:]) == 0 and torch.count_nonzero(w[3].grad[1:]) == 0  # unused experts


def test_experts_bad_inputs():
    x, gates, ids, weights = _experts_inputs(10, 8, 6, 4, 2, torch.float32, seed=9)
    offsets, ss = ops.moe.moe_sort(ids, 4)
    w1, b1, w2, b2 = weights
    with pytest.raises(ValueError, match="gates"):
        moe_ops.moe_experts(x, gates[:5], ss, offsets, *weights)
    with pytest.raises(ValueError, match="sorted_slot"):
        moe_ops.moe_experts(x, gates, ss[:-1], offsets, *weights)
    with pytest.raises(ValueError, match="expert_offsets"):
        moe_ops.moe_experts(x, gates, ss, offsets[:-1], *weights)
    with pytest.raises(ValueError, match="w1"):
        moe_ops.moe_experts(x, gates, ss, offsets, w1[:, :, :4], b1, w2, b2)
    with pytest.raises(ValueError, match="w2"):
        moe_ops.moe_experts(x, gates, ss, offsets, w1, b1, w2[:, :4], b2[:, :4])
    with pytest.raises(ValueError, match="activation"):
        moe_ops.moe_experts(x, gates, ss, offsets, *weights, "relu")
    with pytest.raises(ValueError, match="expert_ids"):
        ops.moe.moe_sort(ids.float(), 4)
    bad = ss.clone()
    bad[0] = bad[1]  # one token twice in an expert's rows
    with pytest.raises(ValueError, match="slots"):
        moe_ops.moe_experts(x, gates, bad, offsets, *weights)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_cuda_match_cpu(dtype):
    x, gates, ids, weights = _experts_inputs(1000, 64, 48, 8, 4, dtype, seed=10)
    dy = torch.randn(1000, 64, generator=_gen(11)).to(dtype)
    out = {}
    for dev in ("cpu", "cuda"):
        leaves = [t.to(dev).detach().requires_grad_() for t in (x, gates, *weights)]
        y = _fused(leaves[0], leaves[1], ids.to(dev), leaves[2:])
        (y.float() * dy.to(dev).float()).sum().backward()
        out[dev] = [t.detach().float().cpu() for t in [y] + [t.grad for t in leaves]]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [257, 256])  # the element-wise path, and 16-byte vector accesses
def test_gelu_tanh_backward_rows_cuda_match_cpu(dtype, width):
    g = _gen(12)
    pre = (torch.randn(300, width, generator=g) * 3).to(dtype)
    d_hid = torch.randn(300, width, generator=g).to(dtype)
    w = torch.rand(300, generator=g)
    cpu = moe_ops.moe_gelu_tanh_backward_rows(pre, d_hid, w)
    gpu = moe_ops.moe_gelu_tanh_backward_rows(pre.cuda(), d_hid.cuda(), w.cuda())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol * 10)


def test_experts_under_autocast_run_in_the_autocast_dtype():
    x, gates, ids, weights = _experts_inputs(64, 16, 12, 4, 2, torch.float32, seed=13)
    dy = torch.randn(64, 16, generator=_gen(14))
    results = []
    for autocast in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = _fused(leaves[0], leaves[1], ids, leaves[2:])
            assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
            (y.float() * dy).sum().backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)  # fp32 leaves get fp32 gradients
        results.append([y.detach().float()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2 * max(1.0, a.abs().max().item()))
