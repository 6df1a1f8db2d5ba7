"""GroupedTokenMoE and GroupedSequenceMoE: kernels backend against the reference backend, gradients, edge cases."""
import pytest
import torch

import unif2ace
from unif2ace.nn import GroupedSequenceMoE, GroupedTokenMoE

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and unif2ace.WITH_CUDA), reason="needs a CUDA device")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _token_moe(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(num_groups=2, experts_per_group=4, top_k=2)
    args.update(kw)
    m = GroupedTokenMoE(16, 12, **args).to(dtype)
    with torch.no_grad():  # larger router weights so routing is not nearly uniform
        m.router.normal_(0, 0.5, generator=_gen(seed + 100))
    return m


def _params_grads(m, backend, x, gid, mask=None, dy=None):
    m.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_()
    y, aux = m(xx, gid, mask, backend=backend)
    dy = torch.ones_like(y) if dy is None else dy
    ((y * dy).sum() + 3.0 * aux).backward()
    return y.detach(), aux.detach(), xx.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


# ---------------------------------------------------------------------------------------------------------
# Token level
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol,per_token", [(torch.float64, 1e-10, True), (torch.float32, 2e-5, False),
                                                   (torch.bfloat16, 6e-2, True)])
def test_token_moe_backends_match(dtype, tol, per_token):
    m = _token_moe(dtype)
    g = _gen(1)
    x = torch.randn(3, 10, 16, generator=g).to(dtype)
    gid = torch.randint(0, 2, (3, 10), generator=g) if per_token else torch.tensor([0, 1, 1])
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    dy = torch.randn(3, 10, 16, generator=g).to(dtype)
    k = _params_grads(m, "kernels", x, gid, mask, dy)
    r = _params_grads(m, "reference", x, gid, mask, dy)
    torch.testing.assert_close(k[0].double(), r[0].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(k[1].double(), r[1].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(k[2].double(), r[2].double(), rtol=tol, atol=tol)
    for name in k[3]:
        torch.testing.assert_close(k[3][name].double(), r[3][name].double(), rtol=tol, atol=tol, msg=name)


def test_token_moe_gradcheck_through_layer():
    torch.manual_seed(2)
    m = GroupedTokenMoE(4, 3, num_groups=2, experts_per_group=3, top_k=2, shared_hidden_size=2).double()
    with torch.no_grad():
        m.router.normal_(0, 1.0, generator=_gen(3))
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=_gen(4), requires_grad=True)
    gid = torch.tensor([0, 1])
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (x, gid))
        return out[0], out[1]

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in m.parameters()]), 
                                   fast_mode=True)


def test_token_moe_no_shared_no_renormalize_and_k_equals_e():
    m = _token_moe(shared_expert=False, renormalize=False, top_k=4)
    x = torch.randn(2, 5, 16, generator=_gen(5), dtype=torch.float64)
    gid = torch.tensor([1, 1])  # group 0 has no tokens: its balance term is 0
    yk, ak = m(x, gid)
    yr, ar = m(x, gid, backend="reference")
    torch.testing.assert_close(yk, yr)
    torch.testing.assert_close(ak, ar)
    # k = E with all experts chosen: f_e = 1/E, so the balance loss is Σ_e P_e = 1 for the one active group.
    torch.testing.assert_close(ak, torch.tensor(1.0, dtype=torch.float64))


def test_token_moe_padding_excluded_from_statistics():
    m = _token_moe()
    x = torch.randn(2, 6, 16, generator=_gen(6), dtype=torch.float64)
    gid = torch.tensor([0, 1])
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3:] = False
    _, aux_masked = m(x, gid, mask)
    # The same as a batch that holds only the real tokens (outputs of the real tokens are unchanged too).
    y_full, _ = m(x, gid, mask)
    y_a, aux_a = m(x[:1, :3], gid[:1])
    y_b, aux_b = m(x[1:], gid[1:])
    torch.testing.assert_close(aux_masked, aux_a + aux_b)
    torch.testing.assert_close(y_full[0, :3], y_a[0])


def test_token_moe_bit_identical_runs():
    m = _token_moe(torch.float32)
    x = torch.randn(4, 64, 16, generator=_gen(7))
    gid = torch.randint(0, 2, (4, 64), generator=_gen(8))
    a = _params_grads(m, "kernels", x, gid)
    b = _params_grads(m, "kernels", x, gid)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    for n in a[3]:
        assert torch.equal(a[3][n], b[3][n]), n


def test_token_moe_bad_inputs():
    m = _token_moe()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="group_ids"):
        m(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="group_ids"):
        m(x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="group_ids"):
        m(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="padding_mask"):
        m(x, torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 3, 8, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="backend"):
        m(x, torch.tensor([0, 1]), backend="fast")
    with pytest.raises(ValueError, match="top_k"):
        GroupedTokenMoE(16, 8, experts_per_group=4, top_k=5)


# ---------------------------------------------------------------------------------------------------------
# Sequence level
# ---------------------------------------------------------------------------------------------------------
DIMS = {"clip": 10, "face": 6}


def _seq_moe(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = GroupedSequenceMoE(16, embedding_dims=DIMS, noise_dim=5, resampler_hidden=8, **kw).to(dtype)
    with torch.no_grad():
        m.router.normal_(0, 1.0, generator=_gen(seed + 200))
        for p in m.mix_logits.values():
            p.normal_(0, 1.0, generator=_gen(seed + 300))
    return m


def _seq_inputs(dtype=torch.float64, b=6, l=5, seed=9):
    g = _gen(seed)
    x = torch.randn(b, l, 16, generator=g).to(dtype)
    gid = torch.tensor([0, 1, 0, 1, 0, 1][:b])
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[2, 3:] = False
    emb = {k: torch.randn(b, d, generator=g).to(dtype) for k, d in DIMS.items()}
    return x, gid, mask, emb


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_sequence_moe_backends_match(dtype, tol):
    m = _seq_moe(dtype)
    x, gid, mask, emb = _seq_inputs(dtype)
    results = []
    for backend in ("kernels", "reference"):
        m.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_()
        y, aux = m(xx, gid, mask, emb, generator=_gen(10), backend=backend)
        (y.float().square().sum() + aux).backward()
        results.append((y.detach(), aux.detach(), xx.grad, {n: p.grad for n, p in m.named_parameters()
                                                             if p.grad is not None}))
    k, r = results
    torch.testing.assert_close(k[0].double(), r[0].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(k[1].double(), r[1].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(k[2].double(), r[2].double(), rtol=tol, atol=tol * 4)  # grad of Σy²: 2y amplifies
    assert k[3].keys() == r[3].keys() and "router" in k[3]
    for n in k[3]:
        torch.testing.assert_close(k[3][n].double(), r[3][n].double(), rtol=tol, atol=tol * 10, msg=n)


def test_sequence_moe_gradcheck():
    m = _seq_moe()
    m.eval()  # noise embedding = 0: deterministic
    x, gid, mask, emb = _seq_inputs(b=4, l=3)
    x.requires_grad_()
    names = [n for n, _ in m.named_parameters()]

    def f(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x, gid, mask, emb))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in m.parameters()]), 
                                   fast_mode=True)


def test_sequence_moe_copy_zero_and_padding_only():
    m = GroupedSequenceMoE(8, groups=(("copy", "copy", "zero"), ("zero", "zero", "zero")), top_k=2,
                           embedding_dims={}).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64, generator=_gen(11))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False  # padding only: zero mean -> uniform router -> experts 0 and 1 (copy, copy)
    gid = torch.tensor([1, 0, 0])
    for backend in ("kernels", "reference"):
        y, aux = m(x, gid, mask, backend=backend)
        torch.testing.assert_close(y[0], torch.zeros_like(y[0]))
        torch.testing.assert_close(y[2], x[2])
    # The padding-only sequence is not in the statistics: aux equals that of the batch without it.
    _, aux_all = m(x, gid, mask)
    _, aux_two = m(x[:2], gid[:2], mask[:2])
    torch.testing.assert_close(aux_all, aux_two)


def test_sequence_moe_noise_and_missing_embeddings():
    m = _seq_moe()
    x, gid, mask, emb = _seq_inputs()
    y1, _ = m(x, gid, mask, emb, generator=_gen(12))
    y2, _ = m(x, gid, mask, emb, generator=_gen(12))
    assert torch.equal(y1, y2)
    m.eval()
    y3, _ = m(x, gid, mask, emb)
    y4, _ = m(x, gid, mask, emb)
    assert torch.equal(y3, y4)
    # A missing embedding is a zero embedding.
    ya, _ = m(x, gid, mask, {"clip": emb["clip"]})
    yb, _ = m(x, gid, mask, {"clip": emb["clip"], "face": torch.zeros_like(emb["face"])})
    torch.testing.assert_close(ya, yb)
    with pytest.raises(ValueError, match="embeddings\\['clip'\\]"):
        m(x, gid, mask, {"clip": emb["clip"][:, :3]})
    with pytest.raises(ValueError, match="group_ids"):
        m(x, gid + 1, mask, emb)
    with pytest.raises(ValueError, match="groups"):
        GroupedSequenceMoE(16, groups=(("copy", "bogus"),))
    with pytest.raises(ValueError, match="top_k"):
        GroupedSequenceMoE(16, groups=(("copy", "zero"),), top_k=3)


@pytest.mark.cuda
@needs_gpu
def test_layers_cuda_match_cpu():
    m = _token_moe(torch.float32)
    x = torch.randn(2, 128, 16, generator=_gen(13))
    gid = torch.randint(0, 2, (2, 128), generator=_gen(14))
    y_cpu, aux_cpu = m(x, gid)
    m_cuda = m.cuda()
    y_gpu, aux_gpu = m_cuda(x.cuda(), gid.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux_gpu.cpu(), aux_cpu, rtol=1e-4, atol=1e-4)
