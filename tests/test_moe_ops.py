"""MoE kernels (moe_gate, moe_dispatch, moe_combine, grouped_mlp) against the plain-PyTorch references."""
import pytest
import torch

import unif2ace
from unif2ace import ops
from unif2ace.ops import moe as moe_ops
from unif2ace.ops import reference as ref

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and unif2ace.WITH_CUDA), reason="needs a CUDA device")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(T, G, E, dtype=torch.float32, seed=0):
    g = _gen(seed)
    logits = torch.randn(T, G * E, generator=g).to(dtype)
    gid = torch.randint(0, G, (T,), generator=g)
    return logits, gid


# ---------------------------------------------------------------------------------------------------------
# Forward against the references
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_gate_matches_reference(dtype, renormalize):
    logits, gid = _inputs(301, 2, 8, dtype, seed=1)
    mask = torch.rand(301, generator=_gen(2)) > 0.2
    got = ops.moe_gate(logits, gid, num_groups=2, top_k=4, renormalize=renormalize, token_mask=mask)
    want = ref.moe_gate(logits, gid, num_groups=2, top_k=4, renormalize=renormalize, token_mask=mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[3], want[3], rtol=tol, atol=tol)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dispatch_combine_match_reference(dtype):
    T, NE, k, H = 257, 16, 4, 24
    g = _gen(3)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(NE, generator=g)[:k] for _ in range(T)])
    xs, off, ss = ops.moe_dispatch(x, ids, NE)
    xs_r, off_r, ss_r = ref.moe_dispatch(x, ids, NE)
    assert torch.equal(ss, ss_r) and torch.equal(off, off_r) and torch.equal(xs, xs_r)
    ys = torch.randn(T * k, H, generator=g).to(dtype)
    gates = torch.rand(T, k, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32)
    y = ops.moe_combine(ys, gates, ss)
    want = ref.moe_combine(ys.double(), gates.double(), ss)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_grouped_mlp_matches_reference():
    g = _gen(4)
    NE, H, Fh = 4, 8, 6
    counts = torch.tensor([3, 0, 5, 1])
    off = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x = torch.randn(int(off[-1]), H, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
          for s in ((NE, Fh, H), (NE, Fh), (NE, H, Fh), (NE, H))]
    torch.testing.assert_close(ops.grouped_mlp(x, off, *ws), ref.grouped_mlp(x, off, *ws))
    assert torch.autograd.gradcheck(lambda *a: ops.grouped_mlp(a[0], off, *a[1:]), (x, *ws))


# ---------------------------------------------------------------------------------------------------------
# Gradients (fp64 gradcheck on the CPU kernels)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [True, False])
def test_gate_gradcheck(renormalize):
    logits, gid = _inputs(13, 2, 4, torch.float64, seed=5)
    logits.requires_grad_()
    mask = torch.tensor([True] * 10 + [False] * 3)

    def f(z):
        gates, _, _, pm = ops.moe_gate(z, gid, num_groups=2, top_k=3, renormalize=renormalize, token_mask=mask)
        return gates, pm

    assert torch.autograd.gradcheck(f, (logits,))


def test_gate_grad_matches_reference():
    logits, gid = _inputs(64, 2, 8, torch.float32, seed=6)
    w = torch.randn(64, 4, generator=_gen(7))
    v = torch.randn(16, generator=_gen(8))
    grads = []
    for impl in (ops.moe_gate, ref.moe_gate):
        z = logits.clone().requires_grad_()
        gates, _, _, pm = impl(z, gid, num_groups=2, top_k=4)
        ((gates * w).sum() + (pm * v).sum()).backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_dispatch_combine_gradcheck():
    g = _gen(9)
    T, NE, k, H = 11, 6, 3, 5
    ids = torch.stack([torch.randperm(NE, generator=g)[:k] for _ in range(T)])
    x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    _, _, ss = ops.moe_dispatch(x, ids, NE)
    assert torch.autograd.gradcheck(lambda x: ops.moe_dispatch(x, ids, NE)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda x: ops.moe_dispatch(x, ids, NE)[0], (x,))
    ys = torch.randn(T * k, H, generator=g, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, k, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ys, gt: ops.moe_combine(ys, gt, ss), (ys, gates))


def test_combine_grad_matches_reference_bf16():
    g = _gen(10)
    T, NE, k, H = 50, 8, 2, 32
    ids = torch.stack([torch.randperm(NE, generator=g)[:k] for _ in range(T)])
    x = torch.randn(T, H, generator=g)
    _, _, ss = ops.moe_dispatch(x, ids, NE)
    ys0 = torch.randn(T * k, H, generator=g).bfloat16()
    gates0 = torch.rand(T, k, generator=g)
    dy = torch.randn(T, H, generator=g).bfloat16()
    out = []
    for impl, dt in ((ops.moe_combine, torch.bfloat16), (ref.moe_combine, torch.float64)):
        ys = ys0.detach().to(dt).clone().requires_grad_()
        gt = gates0.detach().to(torch.float64 if dt == torch.float64 else torch.float32).clone().requires_grad_()
        impl(ys, gt, ss).backward(dy.to(dt))
        out.append((ys.grad.double(), gt.grad.double()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-2, atol=5e-2)


# ---------------------------------------------------------------------------------------------------------
# opcheck, compile, determinism
# ---------------------------------------------------------------------------------------------------------
def test_opcheck_all_ops():
    logits, gid = _inputs(20, 2, 4, torch.float32, seed=11)
    logits.requires_grad_()
    mask = torch.rand(20, generator=_gen(12)) > 0.3
    torch.library.opcheck(torch.ops.unif2ace.moe_gate, (logits, gid, mask, 2, 2, True))
    torch.library.opcheck(torch.ops.unif2ace.moe_gate, (logits, gid, None, 2, 4, False))
    gates, ids, _, pm, gc = torch.ops.unif2ace.moe_gate(logits, gid, None, 2, 2, True)
    torch.library.opcheck(torch.ops.unif2ace.moe_gate_backward,
                          (logits.detach(), gid, None, ids, gc, torch.randn(20, 2), torch.randn(8), 2, 2, True))
    torch.library.opcheck(torch.ops.unif2ace.moe_sort, (ids, 8))
    offsets, ss = torch.ops.unif2ace.moe_sort(ids, 8)
    x = torch.randn(20, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.unif2ace.moe_permute, (x, ss, 2))
    ys = torch.randn(40, 6, requires_grad=True)
    g = gates.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.unif2ace.moe_unpermute, (ys, g, ss, 2))
    torch.library.opcheck(torch.ops.unif2ace.moe_unpermute, (ys, None, ss, 2))
    torch.library.opcheck(torch.ops.unif2ace.moe_unpermute_backward, (torch.randn(20, 6), ys.detach(), g.detach(), ss))


def test_torch_compile_smoke():
    def route(x, wr, gid):
        gates, ids, counts, pm = ops.moe_gate(x @ wr.t(), gid, num_groups=2, top_k=2)
        xs, off, ss = ops.moe_dispatch(x, ids, 8)
        return ops.moe_combine(xs * 2.0, gates, ss), ops.balance_loss(counts, pm, 2)

    g = _gen(13)
    x = torch.randn(32, 16, generator=g, requires_grad=True)
    wr = torch.randn(8, 16, generator=g, requires_grad=True)
    gid = torch.randint(0, 2, (32,), generator=g)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    y, aux = compiled(x, wr, gid)
    y_e, aux_e = route(x, wr, gid)
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(aux, aux_e)
    (y.sum() + aux).backward()
    assert x.grad is not None and wr.grad is not None


def test_bit_identical_runs():
    g = _gen(14)
    T, G, E, k, H = 1000, 2, 8, 4, 64
    logits = torch.randn(T, G * E, generator=g, requires_grad=True)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    gid = torch.randint(0, G, (T,), generator=g)
    dy = torch.randn(T, H, generator=g)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        logits.grad = x.grad = None
        gates, ids, counts, pm = ops.moe_gate(logits, gid, num_groups=G, top_k=k)
        xs, off, ss = ops.moe_dispatch(x, ids, G * E)
        y = ops.moe_combine(xs * 1.5, gates, ss)
        (y * dy).sum().add(pm.sum()).backward()
        results.append([t.detach().clone() for t in (gates, ids, counts, pm, xs, off, ss, y, logits.grad, x.grad)])
    torch.set_num_threads(2)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------
def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]])
    gid = torch.tensor([0, 1])
    gates, ids, counts, pm = ops.moe_gate(logits, gid, num_groups=2, top_k=2)
    assert ids.tolist() == [[1, 2], [4, 5]]
    torch.testing.assert_close(gates, torch.full((2, 2), 0.5))
    assert torch.equal(ids, ref.moe_gate(logits, gid, num_groups=2, top_k=2)[1])


def test_empty_group_and_empty_expert_and_k_equals_e():
    logits, _ = _inputs(9, 2, 4, seed=15)
    gid = torch.zeros(9, dtype=torch.int64)  # group 1 has no tokens
    gates, ids, counts, pm = ops.moe_gate(logits, gid, num_groups=2, top_k=4)
    assert counts[4:].sum() == 0 and torch.equal(pm[4:], torch.zeros(4))
    torch.testing.assert_close(gates.sum(1), torch.ones(9))
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]  # k = E: every expert of the group
    x = torch.randn(9, 5)
    xs, off, ss = ops.moe_dispatch(x, ids, 8)
    assert off.tolist() == [0, 9, 18, 27, 36, 36, 36, 36, 36]
    aux = ops.balance_loss(counts, pm, 2)
    torch.testing.assert_close(aux, ref.balance_loss(counts, pm, 2))


def test_all_tokens_to_one_expert_and_single_token():
    x = torch.randn(7, 3)
    ids = torch.full((7, 1), 5, dtype=torch.int64)
    xs, off, ss = ops.moe_dispatch(x, ids, 8)
    assert off.tolist() == [0, 0, 0, 0, 0, 0, 7, 7, 7] and ss.tolist() == list(range(7))
    torch.testing.assert_close(ops.moe_combine(xs, torch.ones(7, 1), ss), x)
    logits = torch.randn(1, 8, requires_grad=True)
    gates, ids, counts, pm = ops.moe_gate(logits, torch.tensor([1]), num_groups=2, top_k=3)
    assert counts.sum() == 3 and (ids >= 4).all()
    (gates.sum() + pm.sum()).backward()
    assert logits.grad[0, :4].abs().sum() == 0


def test_zero_tokens():
    gates, ids, counts, pm = ops.moe_gate(torch.randn(0, 8), torch.zeros(0, dtype=torch.int64), num_groups=2, top_k=2)
    assert gates.shape == (0, 2) and counts.sum() == 0 and torch.equal(pm, torch.zeros(8))
    xs, off, ss = ops.moe_dispatch(torch.randn(0, 4), ids, 8)
    assert xs.shape == (0, 4) and off.tolist() == [0] * 9
    assert ops.moe_combine(xs, gates, ss).shape == (0, 4)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    logits, gid = _inputs(6, 2, 4)
    with pytest.raises(ValueError, match="group_ids"):
        ops.moe_gate(logits, torch.tensor([0, 1, 2, 0, 0, 0]), num_groups=2, top_k=2)
    with pytest.raises(ValueError, match="group_ids"):
        ops.moe_gate(logits, gid[:5], num_groups=2, top_k=2)
    with pytest.raises(ValueError, match="group_ids"):
        ops.moe_gate(logits, gid.int(), num_groups=2, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_gate(logits, gid, num_groups=2, top_k=5)
    with pytest.raises(ValueError, match="router_logits"):
        ops.moe_gate(logits[:, :7], gid, num_groups=2, top_k=2)
    with pytest.raises(ValueError, match="router_logits"):
        ops.moe_gate(logits.int(), gid, num_groups=2, top_k=2)
    with pytest.raises(ValueError, match="token_mask"):
        ops.moe_gate(logits, gid, num_groups=2, top_k=2, token_mask=torch.ones(6))
    x = torch.randn(6, 3)
    ids = torch.zeros(6, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="expert_ids"):
        ops.moe_dispatch(x, ids + 8, 8)
    with pytest.raises(ValueError, match="expert_ids"):
        ops.moe_dispatch(x, ids - 1, 8)
    with pytest.raises(ValueError, match="expert_ids"):
        ops.moe_dispatch(x, ids[:5], 8)
    with pytest.raises(ValueError, match="x"):
        ops.moe_dispatch(x.int(), ids, 8)
    _, _, ss = ops.moe_dispatch(x, ids, 8)
    with pytest.raises(ValueError, match="y_sorted"):
        ops.moe_combine(torch.randn(11, 3), torch.rand(6, 2), ss)
    with pytest.raises(ValueError, match="sorted_slot"):
        ops.moe_combine(torch.randn(12, 3), torch.rand(6, 2), torch.zeros(12, dtype=torch.int64))
    with pytest.raises(ValueError, match="gates"):
        ops.moe_combine(torch.randn(12, 3), torch.ones(6, 2, dtype=torch.int64), ss)


@pytest.mark.parametrize("bad", [2**63, 2**64 + 1, True, 2.0, "2", None, 0, -1])
def test_int_arguments_are_checked_by_name(bad):
    """Sizes given as Python ints: too large for int64, bools, non-ints and non-positive values raise ValueError naming
    the argument (not a conversion error from the op layer)."""
    logits, gid = _inputs(6, 2, 4)
    ids = torch.zeros(6, 2, dtype=torch.int64)
    if not isinstance(bad, bool):  # True is a valid-looking 1 everywhere but must still be refused
        with pytest.raises(ValueError, match="num_groups"):
            ops.moe_gate(logits, gid, num_groups=bad, top_k=2)
    with pytest.raises(ValueError, match="num_groups"):
        ops.moe_gate(logits, gid, num_groups=True, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        ops.moe_gate(logits, gid, num_groups=2, top_k=bad)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_sort(ids, bad)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_dispatch(torch.randn(6, 3), ids, bad)
    with pytest.raises(ValueError, match="num_groups"):
        ops.balance_loss(torch.ones(8, dtype=torch.int64), torch.rand(8), bad)
    out = torch.zeros(6, 3)
    with pytest.raises(ValueError, match="top_k"):
        moe_ops.moe_scatter_add_rows_(out, torch.randn(2, 3), torch.tensor([0, 1]), bad)


def test_balance_loss_rejects_negative_counts():
    counts = torch.tensor([3, 1, 0, 4, 2, 2, 0, 0])
    pm = torch.rand(8)
    ops.balance_loss(counts, pm, 2)  # valid
    counts[5] = -2
    with pytest.raises(ValueError, match="expert_counts.*non-negative"):
        ops.balance_loss(counts, pm, 2)


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------
@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [64, 33])  # 16-byte vector row accesses, and the element-wise fallback
def test_cuda_matches_cpu(dtype, H):
    g = _gen(16)
    T, G, E, k = 3000, 2, 8, 4
    logits = torch.randn(T, G * E, generator=g).to(dtype)
    gid = torch.randint(0, G, (T,), generator=g)
    mask = torch.rand(T, generator=g) > 0.1
    x = torch.randn(T, H, generator=g).to(dtype)
    dy = torch.randn(T, H, generator=g).to(dtype)
    out = {}
    for dev in ("cpu", "cuda"):
        # Leaves on both devices: `.to("cpu")` of a CPU tensor is the tensor itself, and `.to("cuda")` of one that
        # requires grad is not a leaf (its .grad stays None).
        z = logits.to(dev).detach().requires_grad_()
        xx = x.to(dev).detach().requires_grad_()
        gates, ids, counts, pm = ops.moe_gate(z, gid.to(dev), num_groups=G, top_k=k, token_mask=mask.to(dev))
        xs, off, ss = ops.moe_dispatch(xx, ids, G * E)
        y = ops.moe_combine(xs * 2, gates, ss)
        (y.float() * dy.to(dev).float()).sum().add(pm.sum()).backward()
        out[dev] = [t.detach().cpu() for t in (gates, ids, counts, pm, off, ss, xs, y, z.grad, xx.grad)]
    for a, b in zip(out["cpu"], out["cuda"]):
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        else:
            assert torch.equal(a, b)


@cuda
@needs_gpu
def test_cuda_bit_identical():
    g = _gen(17)
    logits = torch.randn(5000, 16, generator=g).cuda().requires_grad_()
    gid = torch.randint(0, 2, (5000,), generator=g).cuda()
    x = torch.randn(5000, 32, generator=g).cuda().requires_grad_()
    runs = []
    for _ in range(2):
        logits.grad = x.grad = None
        gates, ids, counts, pm = ops.moe_gate(logits, gid, num_groups=2, top_k=4)
        xs, off, ss = ops.moe_dispatch(x, ids, 16)
        y = ops.moe_combine(xs, gates, ss)
        (y.sum() + pm.sum()).backward()
        runs.append([t.detach().clone() for t in (gates, ids, pm, ss, y, logits.grad, x.grad)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
