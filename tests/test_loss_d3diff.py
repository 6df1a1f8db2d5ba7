"""The D3Diff loss and its fused linear form against the fp64 plain-PyTorch reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from unif2ace.ops import d3diff_loss, linear_d3diff_loss
from unif2ace.ops import reference as ref

SCORES = ["normalized", "sedd"]
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
    low-precision input (the CCE criterion), plus 1e-6 of the largest gradient entry (DESIGN §3 allows 1e-5)."""
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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
def test_fused_equals_unfused_fp64(reduction, score, with_bias, chunk_size):
    n, h, k = 29, 16, 45
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True) if with_bias else None
    _, target, gamma = make_batch(n, k)
    kw = dict(score=score, reduction=reduction, alpha=0.1)
    out = linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, chunk_size=chunk_size, **kw)
    exp = ref.linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, **kw)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)
    params = [p for p in (hidden, weight, bias) if p is not None]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(exp, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


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


def test_fused_gradcheck_fp64():
    n, h, k = 9, 4, 11
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(k, dtype=torch.float64, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    for reduction in ("mean", "none"):
        fn = lambda a, b, c: linear_d3diff_loss(a, b, target, gamma, bias=c, score="sedd", alpha=0.2,  # noqa: E731
                                                reduction=reduction, chunk_size=4)
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_opcheck():
    n, h, k = 12, 8, 19
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(k, h, requires_grad=True)
    bias = torch.randn(k, requires_grad=True)
    _, target, gamma = make_batch(n, k)
    gamma = gamma.float()
    for grad_in_forward, reduction in ((True, "mean"), (False, "none"), (False, "sum")):
        args = (hidden, weight, bias, target, gamma, 0.01, "sedd", "cosine", 1000.0, -100, reduction, 5,
                grad_in_forward)
        torch.library.opcheck(torch.ops.unif2ace.linear_d3diff_loss.default, args)
    torch.library.opcheck(torch.ops.unif2ace.linear_d3diff_loss_backward.default,
                          (torch.rand(n), hidden.detach(), weight.detach(), None, target, gamma, 0.01, "sedd",
                           "cosine", 1000.0, -100, 5))


def test_torch_compile_fullgraph_forward_and_backward():
    n, h, k = 33, 8, 50
    _, target, gamma = make_batch(n, k)
    gamma = gamma.float()
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(k, h, requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fused(hd, w):
        return linear_d3diff_loss(hd, w, target, gamma, score="sedd")

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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_cpu(dtype):
    n, h, k = 512, 64, 1000
    hidden = (torch.randn(n, h) / 4).to(dtype)
    weight = (torch.randn(k, h) / 4).to(dtype)
    _, target, gamma = make_batch(n, k)
    gamma = gamma.float()
    results = []
    for device in ("cpu", "cuda"):
        hd = hidden.to(device).requires_grad_()
        w = weight.to(device).requires_grad_()
        out = linear_d3diff_loss(hd, w, target.to(device), gamma.to(device), score="sedd")
        results.append([out.detach().cpu().double()] + [g.cpu().double() for g in torch.autograd.grad(out, (hd, w))])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
