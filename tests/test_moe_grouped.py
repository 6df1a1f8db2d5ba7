"""The grouped expert pass (ops.moe_mlp, impl="grouped": device-driven grouped products, the CUDA default)
against the fused per-expert pass and the plain loop a user writes: forward and gradients (gradcheck in fp64), both
grouped-product backends (the expert loop, and torch._grouped_mm's call layouts run on the CPU), rows past the last
offset, empty experts, one expert for every token, a single token, no host reads inside the pass. The CUDA tests
check the layers without host synchronisation and under CUDA-graph capture."""
import pytest
import torch
import torch.nn.functional as F

import unif2ace
from unif2ace.nn.moe import GroupedSequenceMoE, GroupedTokenMoE
from unif2ace.ops import moe as moe_ops
from unif2ace.ops import moe_mlp as mx

from moe_cases import expert_inputs as _inputs, gen as _gen, plain_experts as _plain_experts

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and unif2ace.WITH_CUDA), reason="needs a CUDA device")
needs_sm90 = pytest.mark.skipif(
    not (torch.cuda.is_available() and unif2ace.WITH_CUDA and torch.cuda.get_device_capability()[0] in (9, 10)),
    reason="needs an sm90/sm100 CUDA device (torch._grouped_mm's bf16 kernel)",
)


def _run(fn, x, gates, weights, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
    y = fn(leaves[0], leaves[1], leaves[2:])
    (y.to(torch.float64) * dy.to(torch.float64)).sum().backward()
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def _assert_close(got, want, tol, names=("y", "x", "gates", "w1", "b1", "w2", "b2")):
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        scale = b.abs().max().double().clamp(min=1)
        assert ((a.double() - b.double()).abs().max() / scale).item() <= tol, name


@pytest.fixture(params=["loop", "torch"])
def grouped_mm_backend(request, monkeypatch):
    """Both grouped-product backends: the expert loop, and torch._grouped_mm with the exact CUDA call layouts (its
    CPU implementation; forward calls only, the backward calls it directly as well)."""
    monkeypatch.setattr(mx, "_FORCE_GROUPED_MM", request.param)
    return request.param


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("T,H,F_,NE,k,empty", [(61, 24, 16, 6, 2, (1, 4)), (1, 8, 8, 3, 3, ()),
                                               (200, 32, 24, 16, 4, (0, 15)), (37, 13, 7, 5, 1, (2,))])
def test_grouped_matches_fused_and_reference(grouped_mm_backend, dtype, tol, recompute, T, H, F_, NE, k, empty):
    x, gates, ids, weights = _inputs(T, H, F_, NE, k, dtype, seed=T + NE, empty_experts=empty)
    offsets, sorted_slot = moe_ops.moe_sort(ids, NE)
    dy = torch.randn(T, H, generator=_gen(5)).to(dtype)

    def run(impl):
        return lambda x, g, w: mx.moe_experts(x, g, sorted_slot, offsets, *w, recompute=recompute, impl=impl)

    grouped = _run(run("grouped"), x, gates, weights, dy)
    _assert_close(grouped, _run(lambda x, g, w: _plain_experts(x, g, ids, w), x, gates, weights, dy), tol)
    _assert_close(grouped, _run(run("fused"), x, gates, weights, dy), tol)
    assert grouped[0].dtype == dtype and all(t.dtype == dtype for t in grouped[3:])
    for e in empty:  # experts without rows get exact zero gradients
        assert all(torch.count_nonzero(g[e]) == 0 for g in grouped[3:])


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_grouped_without_gates_and_one_expert_for_all(grouped_mm_backend, activation):
    # The shared-expert pass: k = 1, weights of 1; every token on expert 2 of 4.
    x, _, ids, weights = _inputs(23, 16, 8, 4, 1, torch.float64, seed=3, one_expert=2)
    offsets, sorted_slot = moe_ops.moe_sort(ids, 4)
    dy = torch.randn(23, 16, generator=_gen(6), dtype=torch.float64)
    got = _run(lambda x, g, w: mx.moe_experts(x, None, sorted_slot, offsets, *w, activation, impl="grouped"),
               x, None, weights, dy)
    want = _run(lambda x, g, w: _plain_experts(x, None, ids, w, activation), x, None, weights, dy)
    _assert_close(got, want, 1e-11)
    for e in (0, 1, 3):
        assert all(torch.count_nonzero(g[e]) == 0 for g in got[3:])


def test_grouped_gradcheck(grouped_mm_backend):
    x, gates, ids, weights = _inputs(13, 8, 8, 4, 2, torch.float64, seed=4, empty_experts=(2,))
    offsets, sorted_slot = moe_ops.moe_sort(ids, 4)
    for recompute, activation in ((False, "gelu_tanh"), (True, "gelu"), (True, "gelu_tanh")):
        def f(x, gates, *w):
            return mx.moe_experts(x, gates, sorted_slot, offsets, *w, activation, recompute=recompute, impl="grouped")

        leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]
        assert torch.autograd.gradcheck(f, leaves)


def test_grouped_rows_past_the_last_offset_count_zero(grouped_mm_backend):
    """Slots sorted past expert_offsets[-1] (invalid expert ids; only CUDA produces them, here made by truncating the
    offsets) are left out exactly as the fused pass leaves them out, with zero gate gradients."""
    x, gates, ids, weights = _inputs(30, 16, 8, 4, 2, torch.float64, seed=7)
    offsets, sorted_slot = moe_ops.moe_sort(ids, 4)
    cut = offsets.clone()
    cut[-1] = cut[-2] + 3  # the last expert keeps 3 of its rows
    dy = torch.randn(30, 16, generator=_gen(8), dtype=torch.float64)
    got = _run(lambda x, g, w: mx.moe_experts(x, g, sorted_slot, cut, *w, impl="grouped"), x, gates, weights, dy)
    want = _run(lambda x, g, w: mx.moe_experts(x, g, sorted_slot, cut, *w, impl="fused"), x, gates, weights, dy)
    _assert_close(got, want, 1e-11)
    dropped = sorted_slot[int(cut[-1]):]
    assert dropped.numel() > 0 and torch.count_nonzero(got[2].reshape(-1)[dropped]) == 0


def test_grouped_mlp_grouped_matches_fused(grouped_mm_backend):
    x, _, ids, weights = _inputs(40, 16, 8, 5, 2, torch.float64, seed=9, empty_experts=(3,))
    x_sorted, offsets, _ = moe_ops.moe_dispatch(x, ids, 5)
    offsets[-1] -= 4  # 4 rows past the last offset: zeros
    dy = torch.randn(80, 16, generator=_gen(10), dtype=torch.float64)
    names = ("y", "x", "gates", "w1", "b1", "w2", "b2")
    runs = [_run(lambda xs, g, w, impl=impl: mx.grouped_mlp(xs, offsets, *w, impl=impl), x_sorted, None, weights, dy)
            for impl in ("grouped", "fused")]
    _assert_close(runs[0], runs[1], 1e-11, names)
    assert torch.count_nonzero(runs[0][0][-4:]) == 0 and torch.count_nonzero(runs[0][1][-4:]) == 0
    leaves = [t.detach().clone().requires_grad_() for t in (x_sorted, *weights)]
    assert torch.autograd.gradcheck(lambda xs, *w: mx.grouped_mlp(xs, offsets, *w, impl="grouped"), leaves)


def test_grouped_is_deterministic_and_recompute_bit_identical():
    x, gates, ids, weights = _inputs(300, 32, 24, 8, 4, torch.float32, seed=11)
    offsets, sorted_slot = moe_ops.moe_sort(ids, 8)
    dy = torch.randn(300, 32, generator=_gen(12))
    runs = [_run(lambda x, g, w, r=r: mx.moe_experts(x, g, sorted_slot, offsets, *w, recompute=r, impl="grouped"),
                 x, gates, weights, dy) for r in (False, True, False)]
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_grouped_pass_reads_nothing_on_the_host(monkeypatch):
    """With torch._grouped_mm's layouts the pass itself (forward and backward) never reads a tensor's values into
    Python: on CUDA that is what keeps it free of synchronisation."""
    x, gates, ids, weights = _inputs(50, 16, 8, 6, 2, torch.float32, seed=13, empty_experts=(1,))
    offsets, sorted_slot = moe_ops.moe_sort(ids, 6)
    leaves = [t.detach().clone().requires_grad_() for t in (x, gates, *weights)]

    def refuse(*_a, **_k):
        raise AssertionError("host read of a tensor inside the grouped pass")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        y = mx._GroupedExperts.apply(leaves[0], leaves[1], sorted_slot, offsets, 2, "gelu_tanh", False, "torch",
                                     *leaves[2:])
        y.sum().backward()
    want = _plain_experts(x, gates, ids, weights)
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)
    assert all(t.grad is not None for t in leaves)


def test_grouped_empty_batch_and_bad_inputs():
    _, _, _, weights = _inputs(1, 8, 8, 3, 1, torch.float32, seed=14)
    x = torch.zeros(0, 8, requires_grad=True)
    offsets = torch.zeros(4, dtype=torch.int64)
    y = mx.moe_experts(x, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), offsets, *weights, impl="grouped")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    x, gates, ids, weights = _inputs(10, 8, 8, 4, 2, torch.float32, seed=15)
    offsets, ss = moe_ops.moe_sort(ids, 4)
    bad = ss.clone()
    bad[0] = bad[1]
    with pytest.raises(ValueError, match="sorted_slot"):
        mx.moe_experts(x, gates, bad, offsets, *weights, impl="grouped")
    bad[0] = 20
    with pytest.raises(ValueError, match="sorted_slot"):
        mx.moe_experts(x, gates, bad, offsets, *weights, impl="grouped")
    with pytest.raises(ValueError, match="expert_offsets"):
        mx.moe_experts(x, gates, ss, offsets.flip(0), *weights, impl="grouped")
    with pytest.raises(ValueError, match="impl"):
        mx.moe_experts(x, gates, ss, offsets, *weights, impl="loop")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 8e-3),
                                       (torch.float16, 2e-3)])
@pytest.mark.parametrize("n,width,groups", [(37, 19, 5), (1, 1, 1), (0, 5, 2), (64, 256, 16), (5, 300, 3)])
def test_bias_gelu_tanh_rows_matches_torch(dtype, tol, n, width, groups):
    g = _gen(n * 7 + width)
    pre = (torch.randn(n, width, generator=g, dtype=torch.float64) * 3)
    if pre.numel() > 4:  # saturated and zero inputs
        pre.view(-1)[:4] = torch.tensor([1e4, -1e4, 0.0, -0.0], dtype=torch.float64)
    pre = pre.to(dtype)
    bias = torch.randn(groups, width, generator=g).to(dtype)
    row_expert = torch.randint(0, groups, (n,), generator=g)
    before = pre.clone()
    got_pre, got_act = moe_ops.moe_bias_gelu_tanh_rows(pre, bias, row_expert)
    assert torch.equal(pre, before)  # the op is functional; the grouped pass calls the kernel in place
    want_pre = pre + bias[row_expert]  # torch's add in the same dtype: the same rounding
    assert got_pre.dtype == dtype and got_act.dtype == dtype
    assert torch.equal(got_pre, want_pre)
    torch.testing.assert_close(got_act.double(), F.gelu(want_pre.double(), approximate="tanh"), rtol=tol, atol=tol)


def test_bias_gelu_tanh_rows_opcheck_and_bad_inputs():
    g = _gen(16)
    pre, bias = torch.randn(6, 8, generator=g), torch.randn(3, 8, generator=g)
    rows = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.library.opcheck(torch.ops.unif2ace.moe_bias_gelu_tanh_rows, (pre, bias, rows))
    with pytest.raises(ValueError, match="row_expert"):
        moe_ops.moe_bias_gelu_tanh_rows(pre, bias, torch.tensor([0, 2, 3, 1, 0, 2]))
    with pytest.raises(ValueError, match="row_expert"):
        moe_ops.moe_bias_gelu_tanh_rows(pre, bias, torch.tensor([0, 2, -1, 1, 0, 2]))
    with pytest.raises(ValueError, match="row_expert"):
        moe_ops.moe_bias_gelu_tanh_rows(pre, bias, rows[:5])
    with pytest.raises(ValueError, match="bias"):
        moe_ops.moe_bias_gelu_tanh_rows(pre, bias.double(), rows)
    with pytest.raises(ValueError, match="bias"):
        moe_ops.moe_bias_gelu_tanh_rows(pre, bias[:, :7], rows)
    with pytest.raises(ValueError, match="pre"):
        moe_ops.moe_bias_gelu_tanh_rows(pre.long(), bias, rows)


def test_public_names_still_importable_from_ops_moe():
    assert moe_ops.moe_experts is mx.moe_experts and moe_ops.grouped_mlp is mx.grouped_mlp


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------
@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["random", "empty_experts", "one_expert"])
def test_grouped_cuda_matches_cpu_and_reference(dtype, case):
    kw = {"random": {}, "empty_experts": {"empty_experts": (0, 5, 7)}, "one_expert": {"one_expert": 3}}[case]
    k = 1 if case == "one_expert" else 4  # a token's k slots go to k distinct experts
    x, gates, ids, weights = _inputs(1000, 64, 48, 8, k, dtype, seed=20, **kw)
    dy = torch.randn(1000, 64, generator=_gen(21)).to(dtype)
    out = {}
    for dev, impl in (("cpu", "fused"), ("cuda", "grouped")):
        offsets, sorted_slot = moe_ops.moe_sort(ids.to(dev), 8)
        out[dev] = [t.float().cpu() for t in _run(
            lambda x, g, w: mx.moe_experts(x, g, sorted_slot, offsets, *w, impl=impl),
            x.to(dev), gates.to(dev), [w.to(dev) for w in weights], dy.to(dev))]
    want = [t.float() for t in _run(lambda x, g, w: _plain_experts(x, g, ids, w),
                                    x.double(), gates.double(), [w.double() for w in weights], dy)]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    _assert_close(out["cuda"], out["cpu"], tol)
    _assert_close(out["cuda"], want, tol)


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [257, 256])  # the element-wise path, and 16-byte vector accesses
def test_bias_gelu_tanh_rows_cuda_match_cpu(dtype, width):
    g = _gen(22)
    pre = (torch.randn(300, width, generator=g) * 3).to(dtype)
    bias = torch.randn(6, width, generator=g).to(dtype)
    rows = torch.randint(0, 6, (300,), generator=g)
    cpu = moe_ops.moe_bias_gelu_tanh_rows(pre, bias, rows)
    gpu = moe_ops.moe_bias_gelu_tanh_rows(pre.cuda(), bias.cuda(), rows.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0])  # one rounding of the same float sum on both devices
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(gpu[1].cpu().float(), cpu[1].float(), rtol=tol, atol=tol)


def _token_layer(dtype, recompute=False):
    torch.manual_seed(0)
    return GroupedTokenMoE(256, 128, num_groups=2, experts_per_group=8, top_k=4, recompute=recompute,
                           device="cuda", dtype=dtype)


def _token_batch(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 96, 256, device="cuda", generator=g).to(dtype)
    gid = torch.tensor([0, 1, 1, 0], device="cuda")
    mask = torch.ones(4, 96, dtype=torch.bool, device="cuda")
    mask[1, 70:] = False
    mask[3, 5:] = False
    return x, gid, mask


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_token_layer_cuda_matches_reference_backend(dtype):
    layer = _token_layer(dtype)
    x, gid, mask = _token_batch(dtype)
    res = {}
    for backend in ("kernels", "reference"):
        layer.zero_grad()
        xx = x.detach().requires_grad_()
        y, aux = layer(xx, gid, mask, backend=backend)
        (y.float().square().mean() + aux).backward()
        res[backend] = [y.float(), aux.float(), xx.grad.float()] + [p.grad.float() for p in layer.parameters()]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(res["kernels"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@cuda
@needs_sm90
@pytest.mark.parametrize("recompute", [False, True])
def test_token_and_sequence_layers_run_without_host_sync(recompute):
    layer = _token_layer(torch.bfloat16, recompute)
    seq = GroupedSequenceMoE(256, device="cuda", dtype=torch.bfloat16)
    x, gid, mask = _token_batch(torch.bfloat16)
    emb = {"clip": torch.randn(4, 512, device="cuda", dtype=torch.bfloat16),
           "face": torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)}
    xx = x.detach().requires_grad_()
    for _ in range(2):  # the first run warms up allocator and libraries; both must be sync-free
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, aux = layer(xx, gid, mask)
            y2, aux2 = seq(y, gid, mask, emb)
            (y2.float().square().mean() + aux + aux2).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(xx.grad.float()).all()


@cuda
@needs_sm90
def test_token_layer_fwd_bwd_captured_in_a_cuda_graph():
    layer = _token_layer(torch.bfloat16)
    x, gid, mask = _token_batch(torch.bfloat16)
    static_x = x.detach().clone().requires_grad_()
    params = list(layer.parameters())

    def step():
        y, aux = layer(static_x, gid, mask)
        (y.float().square().mean() + aux).backward()
        return y, aux

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, cuBLAS handles, lazy inits)
        for _ in range(2):
            static_x.grad = None
            layer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_x.grad = None
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g, aux_g = step()
    grads_g = [static_x.grad] + [p.grad for p in params]

    for seed in (3, 4):
        new_x = torch.randn(x.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        static_x.data.copy_(new_x.to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        ref_x = static_x.detach().clone().requires_grad_()
        layer.zero_grad(set_to_none=True)  # the graph's gradient tensors stay alive in grads_g
        y_e, aux_e = layer(ref_x, gid, mask)
        (y_e.float().square().mean() + aux_e).backward()
        assert torch.equal(y_g, y_e) and torch.equal(aux_g, aux_e)
        assert torch.equal(grads_g[0], ref_x.grad)
        for g_graph, p in zip(grads_g[1:], params):
            assert torch.equal(g_graph, p.grad)
