"""The D3Diff loss and its fused linear form against the fp64 plain-PyTorch reference."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from unif2ace.ops import d3diff_loss, linear_d3diff_loss
from unif2ace.ops import reference as ref

SCORES = ["normalized", "sedd"]
SMALL = bool(os.environ.get("UNIF2ACE_SMALL"))  # small CUDA cases only (the compute-sanitizer pass)
REDUCTIONS = ["mean", "sum", "none"]


def make_batch(n, k, dtype=torch.float64, scale=3.0, ignore_frac=0.35, requires_grad=True):
    logits = (torch.randn(n, k, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)
    target = torch.randint(0, k, (n,))
    target[torch.rand(n) < ignore_frac] = -100
    gamma = torch.rand(n, dtype=torch.float64).clamp(min=1e-3)
    return logits, target, gamma


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (23, 37), (64, 1000)])
def test_d3diff_matches_reference_fp64(score, reduction, schedule, shape):
    logits, target, gamma = make_batch(*shape)
    kw = dict(alpha=0.05, score=score, schedule=schedule, reduction=reduction)
    out = d3diff_loss(logits, target, gamma, **kw)
    exp = ref.d3diff_loss(logits, target, gamma, **kw)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (gk,) = torch.autograd.grad(out, logits, g)
    (gr,) = torch.autograd.grad(exp, logits, g)
    torch.testing.assert_close(gk, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score", SCORES)
def test_d3diff_low_precision_no_worse_than_torch(dtype, score):
    """Against fp64 truth, the kernel's error is within twice the error plain torch makes on the same
    low-precision input (the CCE criterion), plus 1e-6 of the largest gradient entry (docs/design.md §3
    allows 1e-5)."""
    logits, target, gamma = make_batch(300, 777, dtype=dtype)
    kw = dict(score=score, alpha=0.02)
    logits64 = logits.detach().double().requires_grad_()
    truth = ref.d3diff_loss(logits64, target, gamma, **kw)
    (g_truth,) = torch.autograd.grad(truth, logits64)
    ours = d3diff_loss(logits, target, gamma, **kw)
    (g_ours,) = torch.autograd.grad(ours, logits)
    plain = ref.d3diff_loss(logits, target, gamma.to(torch.float32), **kw)  # torch on the same input
    (g_plain,) = torch.autograd.grad(plain, logits)
    assert abs(ours.item() - truth.item()) <= 2 * abs(plain.item() - truth.item()) + 1e-6 * abs(truth.item())
    err_ours = (g_ours.double() - g_truth).abs().max()
    err_plain = (g_plain.double() - g_truth).abs().max()
    assert err_ours <= 2 * err_plain + 1e-6 * g_truth.abs().max()
    assert g_ours.dtype == dtype


def test_alpha_zero_is_masked_cross_entropy():
    logits, target, gamma = make_batch(50, 97)
    for score in SCORES:
        out = d3diff_loss(logits, target, gamma, alpha=0.0, score=score)
        torch.testing.assert_close(out, F.cross_entropy(logits, target, ignore_index=-100), rtol=1e-12, atol=0)


def test_no_masked_rows_gives_zero_loss_and_zero_grad():
    logits, target, gamma = make_batch(7, 11, ignore_frac=1.0)
    for reduction in REDUCTIONS:
        out = d3diff_loss(logits, target, gamma, score="sedd", reduction=reduction)
        assert torch.count_nonzero(out) == 0
        (g,) = torch.autograd.grad(out.sum(), logits)
        assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    out = linear_d3diff_loss(hidden, weight, target, gamma, score="sedd")
    gh, gw = torch.autograd.grad(out, (hidden, weight))
    assert out.item() == 0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_every_row_masked_and_large_logits():
    logits, target, gamma = make_batch(16, 40, ignore_frac=0.0, scale=1e4)
    for dtype in (torch.float64, torch.float32):
        z = logits.detach().to(dtype).requires_grad_()
        out = d3diff_loss(z, target, gamma, score="normalized", alpha=0.01)
        exp = ref.d3diff_loss(z.detach().double(), target, gamma, score="normalized", alpha=0.01)
        assert torch.isfinite(out)
        torch.testing.assert_close(out.double(), exp, rtol=1e-6, atol=0)
        (g,) = torch.autograd.grad(out, z)
        assert torch.isfinite(g).all()
    # SEDD's unnormalised score grows as exp(LSE - log K): at logits of 1e4 the definition itself is +inf.
    out = d3diff_loss(logits, target, gamma, score="sedd", alpha=0.01)
    assert out == ref.d3diff_loss(logits, target, gamma, score="sedd", alpha=0.01) == float("inf")


def test_gradcheck_d3diff_fp64():
    logits, target, gamma = make_batch(6, 9)
    for score in SCORES:
        fn = lambda z: d3diff_loss(z, target, gamma, score=score, alpha=0.3, reduction="none")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,))


def test_sedd_matches_score_entropy_definition():
    """ℓ − CE = α·w/a · SEDD's score entropy Σ_v s_v − a·log s_y + a(log a − 1), with SEDD's unnormalised
    log-scores log s_v = z_v − log(e^σ − 1) − log K, σ = −log(1 − γ), a = 1/(e^σ − 1) (written out here,
    independent of the package)."""
    n, k, alpha = 40, 53, 0.07
    logits, target, gamma = make_batch(n, k, ignore_frac=0.0)
    z = logits.detach()
    sigma = -torch.log1p(-gamma.clamp(max=1 - 1e-9))
    em1 = torch.expm1(sigma)
    a = 1 / em1
    log_s = z - torch.log(em1)[:, None] - math.log(k)
    se = log_s.exp().sum(-1) - a * log_s.gather(1, target[:, None]).squeeze(1) + a * (torch.log(a) - 1)
    w = torch.clamp((math.pi / 2) * torch.sqrt(1 - gamma**2) / gamma, max=1000.0)
    ce = torch.logsumexp(z, -1) - z.gather(1, target[:, None]).squeeze(1)
    expected = ce + alpha * w / a * se
    got = d3diff_loss(z, target, gamma, alpha=alpha, score="sedd", reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# (strategy, rows per chunk, vocabulary columns per chunk): several chunks of each kind, one row per chunk, one
# chunk covering everything, and the defaults.
CHUNKINGS = [("rows", 1, None), ("rows", 7, None), ("rows", None, None), ("rows", 1000, None),
             ("vocab", 7, 5), ("vocab", 1, 64), ("vocab", None, None), ("vocab", 1000, 1000)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("strategy, chunk_size, vocab_chunk_size", CHUNKINGS)
def test_fused_equals_unfused_fp64(reduction, score, with_bias, strategy, chunk_size, vocab_chunk_size):
    n, h, k = 29, 16, 45
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True) if with_bias else None
    _, target, gamma = make_batch(n, k)
    kw = dict(score=score, reduction=reduction, alpha=0.1)
    out = linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, chunk_size=chunk_size,
                             vocab_chunk_size=vocab_chunk_size, strategy=strategy, **kw)
    exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, **kw)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    params = [p for p in (hidden, weight, bias) if p is not None]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(exp, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_fused_unpadded_logits_buffers(strategy, monkeypatch):
    """LOGITS_ALIGN = 1 (contiguous [rows, K] chunks, the fallback) gives the same results as padded chunks."""
    import unif2ace.ops.loss as loss_mod

    n, h, k = 20, 8, 45
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    results = []
    for align in (64, 1):
        monkeypatch.setattr(loss_mod, "LOGITS_ALIGN", align)
        out = linear_d3diff_loss(hidden, weight, target, gamma, strategy=strategy, chunk_size=6, vocab_chunk_size=7)
        results.append([out, *torch.autograd.grad(out, (hidden, weight))])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
@pytest.mark.parametrize("needs", ["hidden", "weight", "bias"])
def test_fused_partial_gradients(strategy, needs):
    """Only some inputs need a gradient: the others get none, and the requested one is right."""
    n, h, k = 21, 8, 30
    tensors = {"hidden": torch.randn(n, h, dtype=torch.float64), "weight": torch.randn(k, h, dtype=torch.float64),
               "bias": torch.randn(k, dtype=torch.float64)}
    tensors[needs].requires_grad_()
    _, target, gamma = make_batch(n, k)
    kw = dict(score="sedd", alpha=0.1, bias=tensors["bias"])
    out = linear_d3diff_loss(tensors["hidden"], tensors["weight"], target, gamma, strategy=strategy, chunk_size=8,
                             vocab_chunk_size=7, **kw)
    exp = ref.linear_d3diff_loss(tensors["hidden"], tensors["weight"], target, gamma, **kw)
    (ours,) = torch.autograd.grad(out, tensors[needs])
    (theirs,) = torch.autograd.grad(exp, tensors[needs])
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_fused_retained_graph_and_scaled_backward(strategy):
    """The first backward hands out the forward's gradients scaled in place; a second backward through the
    retained graph (another scale) forms them again from the row statistics; .grad accumulates both."""
    n, h, k = 19, 6, 23
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    kw = dict(score="sedd", alpha=0.2)
    out = linear_d3diff_loss(hidden, weight, target, gamma, strategy=strategy, chunk_size=5, vocab_chunk_size=6, **kw)
    exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, **kw)
    first = torch.autograd.grad(out, (hidden, weight), torch.tensor(2.5, dtype=torch.float64), retain_graph=True)
    second = torch.autograd.grad(out, (hidden, weight), torch.tensor(-0.5, dtype=torch.float64), retain_graph=True)
    truth = torch.autograd.grad(exp, (hidden, weight), retain_graph=True)
    for ours, t in zip(first, truth):
        torch.testing.assert_close(ours, 2.5 * t, rtol=1e-10, atol=1e-12)
    for ours, t in zip(second, truth):
        torch.testing.assert_close(ours, -0.5 * t, rtol=1e-10, atol=1e-12)
    out2 = linear_d3diff_loss(hidden, weight, target, gamma, strategy=strategy, chunk_size=5, **kw)
    out2.backward(retain_graph=True)
    out2.backward()
    torch.testing.assert_close(weight.grad, 2 * truth[1], rtol=1e-10, atol=1e-12)


def test_fused_gradients_are_adopted_without_a_copy():
    """The gradients formed in the forward become .grad themselves: the backward allocates nothing of their size."""
    from torch.profiler import ProfilerActivity, profile

    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    _, target, gamma = make_batch(40, 50)
    loss = linear_d3diff_loss(hidden, weight, target, gamma.float(), strategy="vocab")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    assert not [e for e in prof.events() if e.cpu_memory_usage >= hidden.numel() * 4]
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_written_into_the_padded_buffer_without_a_copy(dtype):
    """torch.mm/addmm(out=<column view of a padded buffer>) writes in place: no temporary of the output's size."""
    from torch.profiler import ProfilerActivity, profile

    from unif2ace.ops.loss import _project

    h, w, b = (torch.randn(*s).to(dtype) for s in ((300, 64), (1001, 64), (1001,)))
    buf = torch.full((300, 1024), float("nan"), dtype=dtype)
    for bias in (None, b):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _project(h, w, bias, buf[:, :1001])
        assert not [e for e in prof.events() if e.cpu_memory_usage >= buf.numel() // 4 * buf.element_size()]
        exact = torch.nn.functional.linear(h.double(), w.double(), None if bias is None else bias.double())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(buf[:, :1001].double(), exact, rtol=tol, atol=tol * exact.abs().max().item())
        assert buf[:, 1001:].isnan().all()


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_fused_pass_makes_no_data_dependent_host_calls(strategy, monkeypatch):
    """CPU proxy of "no host synchronisation on CUDA": forward and backward run with every Python route from device
    data to the host (item, tolist, bool, int, float, nonzero) raising. The CPU-only compaction of the rows strategy
    and the CPU-only gamma check are turned off, as on CUDA."""
    import unif2ace.ops.loss as loss_mod

    monkeypatch.setattr(loss_mod, "_compacts", lambda hidden, strategy: False)
    monkeypatch.setattr(loss_mod, "_check_gamma", lambda gamma, n, device: None)
    n, h, k = 33, 8, 70
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(k, h, requires_grad=True)
    bias = torch.randn(k, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    gamma = gamma.float()

    def forbidden(*args, **kwargs):
        raise AssertionError("data-dependent host call")

    results = {}
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, forbidden)
        m.setattr(torch, "nonzero", forbidden)
        for reduction in REDUCTIONS:
            out = linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, score="sedd", strategy=strategy,
                                     chunk_size=16, vocab_chunk_size=32, reduction=reduction)
            results[reduction] = torch.autograd.grad(out.sum(), (hidden, weight, bias))
    exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, score="sedd", reduction="sum")
    for a, b in zip(results["sum"], torch.autograd.grad(exp, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(results["none"], results["sum"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_low_precision_close_to_eager(dtype):
    n, h, k = 256, 64, 1001
    hidden = (torch.randn(n, h) / 4).to(dtype).requires_grad_()
    weight = (torch.randn(k, h) / 4).to(dtype).requires_grad_()
    _, target, gamma = make_batch(n, k)
    out = linear_d3diff_loss(hidden, weight, target, gamma, score="sedd", chunk_size=50)
    truth = ref.linear_d3diff_loss(hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(),
                                   target, gamma, score="sedd")
    eager = ref.linear_d3diff_loss(hidden, weight, target, gamma, score="sedd")  # torch in the same dtype
    assert abs(out.item() - truth.item()) <= 2 * abs(eager.item() - truth.item()) + 1e-5 * abs(truth.item())
    gh, gw = torch.autograd.grad(out, (hidden, weight))
    eh, ew = torch.autograd.grad(eager, (hidden, weight))
    assert gh.dtype == dtype and gw.dtype == dtype
    for ours, theirs in ((gh, eh), (gw, ew)):
        scale = theirs.double().abs().max()
        assert (ours.double() - theirs.double()).abs().max() <= (0.05 if dtype == torch.bfloat16 else 1e-4) * scale


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_fused_gradcheck_fp64(strategy):
    n, h, k = 9, 4, 11
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    for reduction in ("mean", "none"):
        fn = lambda a, b, c: linear_d3diff_loss(a, b, target, gamma, bias=c, score="sedd", alpha=0.2,  # noqa: E731
                                                reduction=reduction, chunk_size=4, vocab_chunk_size=3,
                                                strategy=strategy)
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_opcheck():
    n, h, k = 12, 8, 19
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(k, h, requires_grad=True)
    bias = torch.randn(k, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    w = ref.time_weight(gamma.float()) * (target != -100)
    for strategy in ("rows", "vocab"):
        for grads, reduction in (((True, True), "mean"), ((False, True), "sum"), ((True, True), "none"),
                                 ((False, False), "sum")):
            args = (hidden, weight, bias, target, w, 0.01, True, -100, reduction, strategy, 5, 7, *grads)
            torch.library.opcheck(torch.ops.unif2ace.linear_d3diff_loss.default, args)
        _, m, l, *_ = torch.ops.unif2ace.linear_d3diff_loss(hidden.detach(), weight.detach(), None, target, w, 0.01,
                                                           True, -100, "none", strategy, 5, 7, False, False)
        torch.library.opcheck(torch.ops.unif2ace.linear_d3diff_loss_backward.default,
                              (torch.rand(n), hidden.detach(), weight.detach(), None, target, w, m, l, 0.01, True,
                               -100, strategy, 5, 7, True, True))


def test_d3diff_rows_opcheck():
    logits, target, gamma = make_batch(9, 37, dtype=torch.float32)
    w = ref.time_weight(gamma.float())
    torch.library.opcheck(torch.ops.unif2ace.d3diff_rows.default, (logits, target, w, 0.1, True, -100))
    _, m, l = torch.ops.unif2ace.d3diff_rows(logits.detach(), target, w, 0.1, True, -100)
    torch.library.opcheck(torch.ops.unif2ace.d3diff_rows_grad.default,
                          (logits.detach(), target, w, m, l, torch.randn(9), 0.1, True, -100))


@pytest.mark.parametrize("strategy", ["rows", "vocab"])
def test_torch_compile_fullgraph_forward_and_backward(strategy):
    n, h, k = 33, 8, 50
    _, target, gamma = make_batch(n, k)
    gamma = gamma.float()
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(k, h, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fused(hd, w):
        return linear_d3diff_loss(hd, w, target, gamma, score="sedd", strategy=strategy, vocab_chunk_size=16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def unfused(hd, w):
        return d3diff_loss(hd @ w.t(), target, gamma, score="sedd")

    for fn in (fused, unfused):
        out = fn(hidden, weight)
        exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, score="sedd")
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out, (hidden, weight)), torch.autograd.grad(exp, (hidden, weight))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deterministic_bits():
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(500, 32, requires_grad=True)
    _, target, gamma = make_batch(300, 500)
    runs = []
    for _ in range(2):
        out = linear_d3diff_loss(hidden, weight, target, gamma, score="sedd", chunk_size=64)
        runs.append((out, *torch.autograd.grad(out, (hidden, weight))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(logits=a["logits"][0]), "logits"),
        (lambda a: a.update(target=a["target"][:-1]), "target"),
        (lambda a: a.update(gamma=a["gamma"][:-1]), "gamma"),
        (lambda a: a["gamma"].__setitem__(0, 0.0), "gamma"),
        (lambda a: a["gamma"].__setitem__(0, 1.5), "gamma"),
        (lambda a: a["gamma"].__setitem__(0, float("nan")), "gamma"),
        (lambda a: a["target"].__setitem__(0, 11), r"target\[0\]"),
        (lambda a: a["target"].__setitem__(0, -3), r"target\[0\]"),
        (lambda a: a.update(target=a["target"].float()), "target"),
        (lambda a: a.update(logits=a["logits"].long()), "logits"),
        (lambda a: a.update(score="exact"), "score"),
        (lambda a: a.update(schedule="sqrt"), "schedule"),
        (lambda a: a.update(reduction="avg"), "reduction"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    logits, target, gamma = make_batch(6, 11, requires_grad=False)
    args = dict(logits=logits, target=target, gamma=gamma, score="sedd", schedule="cosine", reduction="mean")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        d3diff_loss(args.pop("logits"), args.pop("target"), args.pop("gamma"), **args)


def test_fused_bad_inputs():
    hidden, weight = torch.randn(6, 4), torch.randn(11, 4)
    _, target, gamma = make_batch(6, 11, requires_grad=False)
    with pytest.raises(ValueError, match="weight"):
        linear_d3diff_loss(hidden, torch.randn(11, 5), target, gamma)
    with pytest.raises(ValueError, match="dtype"):
        linear_d3diff_loss(hidden, weight.double(), target, gamma)
    with pytest.raises(ValueError, match="bias"):
        linear_d3diff_loss(hidden, weight, target, gamma, bias=torch.randn(10))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_d3diff_loss(hidden, weight, target, gamma, chunk_size=0)
    target[3] = 11
    with pytest.raises(ValueError, match=r"target\["):
        linear_d3diff_loss(hidden, weight, target, gamma)


# ----------------------------------------------------------------------------------------------------------
# Numerics at large magnitudes and special values
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, value", [(torch.float32, 1e8), (torch.bfloat16, 1e8), (torch.float16, 6e4),
                                          (torch.float32, 3e38), (torch.float64, 1e300)])
def test_ten_equal_huge_logits(dtype, value):
    """CE of ten equal logits is log 10 at any magnitude (lse − z_y gives 0 once ulp(lse) > log 10), the gradient
    0.1 − onehot; the same through the fused linear form (a one-hot hidden picks the weight's column)."""
    z = torch.full((1, 10), value, dtype=dtype, requires_grad=True)
    target, gamma = torch.tensor([4]), torch.ones(1)
    loss = d3diff_loss(z, target, gamma, alpha=0.0)
    assert abs(loss.item() - math.log(10)) < 1e-6
    expected = torch.full((1, 10), 0.1, dtype=torch.float64)
    expected[0, 4] -= 1
    (g,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(g.double(), expected.to(dtype).double(), rtol=0, atol=1e-7)
    for strategy in ("rows", "vocab"):
        hidden = torch.ones(1, 1, dtype=dtype, requires_grad=True)
        weight = torch.full((10, 1), value, dtype=dtype, requires_grad=True)
        fused = linear_d3diff_loss(hidden, weight, target, gamma, alpha=0.0, strategy=strategy)
        assert abs(fused.item() - math.log(10)) < 1e-6
        (gw,) = torch.autograd.grad(fused, weight)
        torch.testing.assert_close(gw.double().squeeze(1), expected.to(dtype).double().squeeze(0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("score", SCORES)
def test_large_magnitude_rows_match_fp64(score):
    """Rows near 1e8 that differ by a few ulps (8 in fp32): exact inputs, so the fp64 reference is the truth; the
    loss keeps its precision (a single-LSE formula would be off by up to ~4) and the gradient too."""
    n, k = 24, 37
    offsets = torch.randint(-40, 40, (n, k)).double() * 8
    logits = (1e8 + offsets).float().requires_grad_()
    target = torch.randint(0, k, (n,))
    gamma = torch.rand(n, dtype=torch.float64).clamp(min=0.05)
    kw = dict(alpha=0.0 if score == "sedd" else 0.05, score=score)  # sedd at 1e8 is +inf by definition
    out = d3diff_loss(logits, target, gamma, reduction="none", **kw)
    z64 = logits.detach().double().requires_grad_()
    exp = ref.d3diff_loss(z64, target, gamma, reduction="none", **kw)
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (ge,) = torch.autograd.grad(exp.sum(), z64)
    torch.testing.assert_close(g.double(), ge, rtol=1e-5, atol=1e-6)


def test_special_values_agree_with_the_reference():
    """+inf or NaN in a contributing row: NaN loss row and NaN gradient row, as the reference and torch give; a
    −inf target logit: +inf; ignored rows are not read (loss and gradient 0 whatever they hold)."""
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(6, 5, dtype=torch.float64)
    logits[0, 2] = inf
    logits[1, 3] = nan
    logits[2, 1] = -inf
    logits[3, 0] = inf
    logits[4] = nan
    target = torch.tensor([1, 1, 1, 0, -100, 2])
    gamma = torch.full((6,), 0.5, dtype=torch.float64)
    for score in SCORES:
        z = logits.clone().requires_grad_()
        out = d3diff_loss(z, target, gamma, score=score, alpha=0.1, reduction="none")
        exp = ref.d3diff_loss(logits, target, gamma, score=score, alpha=0.1, reduction="none")
        assert torch.equal(out.isnan(), exp.isnan()) and torch.equal(out.isinf(), exp.isinf())
        finite = torch.isfinite(exp)
        torch.testing.assert_close(out[finite], exp[finite], rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(out.sum(), z)
        assert g[[0, 1, 3]].isnan().all() and torch.isfinite(g[[2, 5]]).all() and (g[4] == 0).all()
        assert out[2] == inf and out[4] == 0
    ce = F.cross_entropy(logits[[0, 1, 2, 3, 5]], target[[0, 1, 2, 3, 5]], reduction="none")
    plain = d3diff_loss(logits, target, gamma, alpha=0.0, reduction="none")[[0, 1, 2, 3, 5]]
    assert torch.equal(plain.isnan(), ce.isnan()) and plain[2] == ce[2] == inf


# ----------------------------------------------------------------------------------------------------------
# Scalar arguments
# ----------------------------------------------------------------------------------------------------------
BAD_SCALARS = [
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=-5.0), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha="0.1"), "alpha"), (dict(alpha=True), "alpha"),
    (dict(w_max=-1.0), "w_max"), (dict(w_max=0.0), "w_max"), (dict(w_max=float("nan")), "w_max"),
    (dict(ignore_index=2**63), "ignore_index"), (dict(ignore_index=-(2**63) - 1), "ignore_index"),
    (dict(ignore_index=-100.0), "ignore_index"),
]
FUSED_BAD_SCALARS = BAD_SCALARS + [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=-3), "chunk_size"), (dict(chunk_size=2**63), "chunk_size"),
    (dict(chunk_size=8.0), "chunk_size"), (dict(vocab_chunk_size=0), "vocab_chunk_size"),
    (dict(vocab_chunk_size=2**64), "vocab_chunk_size"), (dict(strategy="columns"), "strategy"),
]


@pytest.mark.parametrize("kwargs, match", BAD_SCALARS)
def test_d3diff_bad_scalars_raise(kwargs, match):
    logits, target, gamma = make_batch(6, 11, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        d3diff_loss(logits, target, gamma, **kwargs)


@pytest.mark.parametrize("kwargs, match", FUSED_BAD_SCALARS)
def test_fused_bad_scalars_raise(kwargs, match):
    hidden, weight = torch.randn(6, 4), torch.randn(11, 4)
    _, target, gamma = make_batch(6, 11, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        linear_d3diff_loss(hidden, weight, target, gamma, **kwargs)


def test_large_w_max_and_zero_alpha_are_fine():
    logits, target, gamma = make_batch(6, 11)
    out = d3diff_loss(logits, target, gamma, w_max=float("inf"), alpha=0, score="sedd")
    torch.testing.assert_close(out, F.cross_entropy(logits, target), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------
# CUDA: both strategies against the CPU kernels and the fp64 reference
# ----------------------------------------------------------------------------------------------------------
def _cuda_case(n, h, k, dtype, ignore_frac=0.35, with_bias=False):
    hidden = (torch.randn(n, h) / 4).to(dtype)
    weight = (torch.randn(k, h) / 4).to(dtype)
    bias = (torch.randn(k) / 4).to(dtype) if with_bias else None
    _, target, gamma = make_batch(n, k, ignore_frac=ignore_frac)
    return hidden, weight, bias, target, gamma.float()


def _run_fused(device, hidden, weight, bias, target, gamma, reduction="mean", **kw):
    hd = hidden.to(device).requires_grad_()
    w = weight.to(device).requires_grad_()
    b = bias.to(device).requires_grad_() if bias is not None else None
    out = linear_d3diff_loss(hd, w, target.to(device), gamma.to(device), bias=b, score="sedd", alpha=0.05,
                             reduction=reduction, **kw)
    grad_out = torch.linspace(0.5, 1.5, out.numel(), device=device).reshape(out.shape)
    params = [p for p in (hd, w, b) if p is not None]
    return [out.detach().cpu().double()] + [g.cpu().double() for g in torch.autograd.grad(out, params, grad_out)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", ["rows", "vocab"])
@pytest.mark.parametrize("shape, ignore_frac", [((512, 64, 1000), 0.35), ((1, 32, 1001), 0.0),
                                                ((64, 32, 997), 1.0)]
                         + ([] if SMALL else [((300, 40, 8193), 0.35), ((77, 16, 58498), 0.5)]))
def test_cuda_fused_matches_cpu_and_fp64(dtype, strategy, shape, ignore_frac):
    """K not a multiple of 8, N = 1, all rows ignored, both strategies, several chunks of each kind, all reductions
    and a bias: CUDA against the CPU kernels in the same dtype, and both against fp64 truth (within twice the error
    torch makes in the same dtype)."""
    n, h, k = shape
    case = _cuda_case(n, h, k, dtype, ignore_frac, with_bias=(k == 1000))
    for reduction in REDUCTIONS:
        kw = dict(strategy=strategy, chunk_size=128, vocab_chunk_size=384, reduction=reduction)
        dev = _run_fused("cuda", *case, **kw)
        cpu = _run_fused("cpu", *case, **kw)
        truth = _run_fused("cpu", *[t.double() if t is not None and t.is_floating_point() else t for t in case], **kw)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for a, b, t in zip(dev, cpu, truth):
            scale = t.abs().max().item() + 1e-30
            assert (a - t).abs().max().item() <= 2 * (b - t).abs().max().item() + tol * 1e-2 * scale, reduction
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.cuda
def test_cuda_fused_is_deterministic_and_sync_free():
    """Bit-identical on repeat, and no host synchronisation in the forward or the backward (any sync raises)."""
    case = _cuda_case(700, 64, 3001, torch.bfloat16, with_bias=True)
    hidden, weight, bias, target, gamma = (t.cuda() if t is not None else t for t in case)
    torch.cuda.synchronize()
    for strategy in ("vocab", "rows"):
        runs = []
        for _ in range(2):
            hd, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
            torch.cuda.set_sync_debug_mode("error")
            try:
                for reduction in ("mean", "none"):
                    out = linear_d3diff_loss(hd, w, target, gamma, bias=b, score="sedd", strategy=strategy,
                                             chunk_size=256, vocab_chunk_size=1024, reduction=reduction)
                    out.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            runs.append((out, hd.grad, w.grad, b.grad))
        assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.cuda
def test_cuda_padded_logits_view_needs_no_copy():
    """mm/addmm into the column view of a padded buffer add no allocation on CUDA (cuBLAS takes ldc = padded)."""
    from unif2ace.ops.loss import _project

    h = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(58498, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(58498, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty(384, 58560, device="cuda", dtype=torch.bfloat16)
    _project(h, w, None, buf[:, :58498])  # warm-up (cuBLAS workspace)
    _project(h, w, b, buf[:, :58498])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for bias in (None, b):
        _project(h, w, bias, buf[:, :58498])
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base < 2**20
        exact = torch.nn.functional.linear(h.float(), w.float(), None if bias is None else bias.float())
        torch.testing.assert_close(buf[:, :58498].float(), exact, rtol=2e-2, atol=2e-2 * exact.abs().max().item())


@pytest.mark.cuda
def test_cuda_huge_equal_logits():
    z = torch.full((3, 10), 1e8, device="cuda", requires_grad=True)
    loss = d3diff_loss(z, torch.tensor([0, 5, 9], device="cuda"), torch.ones(3, device="cuda"), alpha=0.0)
    assert abs(loss.item() - math.log(10)) < 1e-6
    (g,) = torch.autograd.grad(loss, z)
    assert abs(g[0, 1].item() - 0.1 / 3) < 1e-7 and abs(g[0, 0].item() + 0.9 / 3) < 1e-7
