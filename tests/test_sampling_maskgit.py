"""The fused MaskGIT step (docs/design.md §6): against the eager Show-o-style reference fed the same Philox noise,
the law of the draw, the re-masking invariants, determinism, edge cases and bad inputs."""
import math

import numpy as np
import pytest
import torch

from unif2ace import ops
from unif2ace.ops import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(B, N, K, dtype=torch.float32, known_frac=0.3, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, N, K, generator=g) * scale).to(dtype)
    uncond = (torch.randn(B, N, K, generator=g) * scale).to(dtype)
    tokens = torch.full((B, N), K, dtype=torch.int64)
    known = torch.rand(B, N, generator=g) < known_frac
    tokens[known] = torch.randint(0, K, (int(known.sum()),), generator=g)
    return cond, uncond, tokens


def run_both(cond, tokens, step, num_steps, *, seed, offset=0, **kw):
    B, N, K = cond.shape
    out = ops.maskgit_step(cond, tokens, step, num_steps, mask_id=K, seed=seed, offset=offset,
                           return_confidence=True, **kw)
    uni = ops.philox_noise((B, N), seed, offset, kind="uniform")
    gum = ops.philox_noise((B, N), seed, offset, kind="gumbel")
    want = ref.maskgit_step(cond, tokens, step, num_steps, mask_id=K, uniform=uni, gumbel=gum,
                            return_confidence=True, **kw)
    return out, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K", [(1, 1, 5), (2, 17, 33), (3, 64, 100), (1, 300, 1000)])
@pytest.mark.parametrize("guided", [False, True])
def test_matches_reference_given_same_noise(B, N, K, dtype, guided):
    cond, uncond, tokens = make_case(B, N, K, dtype)
    kw = dict(uncond_logits=uncond, guidance_scale=1.75) if guided else {}
    for step, num_steps, temp, tau in [(0, 12, 1.0, 1.0), (5, 12, 0.7, 4.5), (11, 12, 1.3, 1.0)]:
        (nt, s, c), (rnt, rs, rc) = run_both(cond, tokens, step, num_steps, seed=3, offset=step,
                                             temperature=temp, choice_temperature=tau, **kw)
        assert torch.equal(s, rs)
        assert torch.equal(nt, rnt)
        finite = torch.isfinite(rc)
        assert torch.equal(finite, torch.isfinite(c))
        torch.testing.assert_close(c[finite], rc[finite], rtol=1e-5, atol=2e-5)


def test_linear_schedule_matches_reference():
    cond, uncond, tokens = make_case(2, 40, 50)
    (nt, s, _), (rnt, rs, _) = run_both(cond, tokens, 2, 8, seed=1, schedule="linear")
    assert torch.equal(nt, rnt) and torch.equal(s, rs)


@pytest.mark.parametrize("temperature,guidance", [(1.0, 0.0), (0.6, 0.0), (1.0, 2.0)])
def test_law_of_the_draw(temperature, guidance):
    from scipy import stats

    K, draws = 7, 20000
    z_c = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.5, 1.2])
    z_u = torch.tensor([0.2, 0.9, -0.3, 1.0, 0.4, -1.0, 0.0])
    cond = z_c.expand(1, draws, K).contiguous()
    uncond = z_u.expand(1, draws, K).contiguous()
    tokens = torch.full((1, draws), K, dtype=torch.int64)
    _, sampled = ops.maskgit_step(cond, tokens, 0, 10, uncond_logits=uncond, guidance_scale=guidance,
                                  temperature=temperature, mask_id=K, seed=2024)
    z = (z_c + guidance * (z_c - z_u)).double() / temperature
    p = torch.softmax(z, 0).numpy()
    counts = np.bincount(sampled.view(-1).numpy(), minlength=K)
    assert stats.chisquare(counts, p * draws).pvalue > 1e-3


def test_peaked_logits_are_nan_free():
    B, N, K = 2, 50, 64
    cond = torch.full((B, N, K), -3.0e4)
    cond[:, :, 5] = 3.0e4
    uncond = torch.zeros(B, N, K)
    tokens = torch.full((B, N), K, dtype=torch.int64)
    for dtype in DTYPES:
        c = cond.to(dtype) if dtype != torch.float16 else cond.clamp(-6e4, 6e4).to(dtype)
        nt, s, conf = ops.maskgit_step(c, tokens, 0, 4, uncond_logits=uncond.to(dtype), guidance_scale=1.0,
                                       mask_id=K, seed=0, return_confidence=True)
        assert bool((s == 5).all())
        assert not bool(torch.isnan(conf).any())
        assert bool(((nt == 5) | (nt == K)).all())


def check_step_invariants(tokens, new_tokens, sampled, conf, K, n_base, last):
    mask_id = K
    known = tokens != mask_id
    assert torch.equal(new_tokens[known], tokens[known])  # known tokens never change
    assert torch.equal(sampled[known], tokens[known])
    assert bool(((sampled >= 0) & (sampled < K)).all())
    assert bool(((new_tokens >= 0) & (new_tokens < K) | (new_tokens == mask_id)).all())
    remasked = new_tokens == mask_id
    masked_before = (~known).sum(1)
    n = ref.remask_counts(masked_before, n_base, last)
    assert torch.equal(remasked.sum(1), n)  # exactly n per row
    assert torch.equal(new_tokens[~remasked], sampled[~remasked])
    for b in range(tokens.shape[0]):  # the re-masked set = the n lowest (confidence, position)
        order = sorted(range(tokens.shape[1]), key=lambda i: (conf[b, i].item(), i))
        assert set(order[: int(n[b])]) == set(torch.nonzero(remasked[b]).view(-1).tolist())


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_invariants_over_a_full_generation(schedule):
    B, N, K, S = 3, 48, 40, 7
    g = torch.Generator().manual_seed(5)
    tokens = torch.full((B, N), K, dtype=torch.int64)
    tokens[1, :10] = torch.randint(0, K, (10,), generator=g)  # some pre-filled (inpainting)
    start = tokens.clone()
    for step in range(S):
        cond = torch.randn(B, N, K, generator=g) * 2
        nt, s, conf = ops.maskgit_step(cond, tokens, step, S, choice_temperature=4.5, schedule=schedule,
                                       mask_id=K, seed=9, offset=step, return_confidence=True)
        sc = ref.maskgit_step_scalars(N, step, S, 1.0, 4.5, schedule)
        check_step_invariants(tokens, nt, s, conf, K, sc["n_base"], sc["last_step"])
        tokens = nt
    assert bool(((tokens >= 0) & (tokens < K)).all())  # nothing masked after the last step
    assert torch.equal(tokens[1, :10], start[1, :10])


def test_ties_are_broken_by_position():
    # identical rows and zero choice temperature: every masked confidence is equal in a row
    B, N, K = 2, 20, 9
    cond = torch.zeros(B, N, K)
    cond[..., 3] = 50.0
    tokens = torch.full((B, N), K, dtype=torch.int64)
    tokens[0, 2] = 1
    nt, s, conf = ops.maskgit_step(cond, tokens, 0, 5, choice_temperature=0.0, mask_id=K, seed=0,
                                   return_confidence=True)
    n = ref.remask_counts((tokens == K).sum(1), ref.maskgit_step_scalars(N, 0, 5, 1, 0, "cosine")["n_base"], False)
    for b in range(B):
        masked_pos = [i for i in range(N) if tokens[b, i] == K]
        want = set(masked_pos[: int(n[b])])
        assert set(torch.nonzero(nt[b] == K).view(-1).tolist()) == want


def test_guidance_zero_equals_no_uncond():
    cond, uncond, tokens = make_case(2, 30, 50)
    a = ops.maskgit_step(cond, tokens, 1, 6, mask_id=50, seed=4)
    b = ops.maskgit_step(cond, tokens, 1, 6, uncond_logits=uncond, guidance_scale=0.0, mask_id=50, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_determinism_and_thread_independence():
    cond, uncond, tokens = make_case(4, 128, 300, torch.bfloat16)
    kw = dict(uncond_logits=uncond, guidance_scale=3.0, mask_id=300, seed=123, offset=4)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.maskgit_step(cond, tokens, 2, 10, **kw)
        torch.set_num_threads(max(2, prev))
        b = ops.maskgit_step(cond, tokens, 2, 10, **kw)
        c = ops.maskgit_step(cond, tokens, 2, 10, **kw)
    finally:
        torch.set_num_threads(prev)
    for x, y in ((a, b), (b, c)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    d = ops.maskgit_step(cond, tokens, 2, 10, **{**kw, "seed": 124})
    assert not torch.equal(d[1], a[1])


def test_edge_cases():
    K = 33
    # N = 1, masked: kept masked before the last step (n = 1), filled at the last step
    cond = torch.randn(2, 1, K)
    tok = torch.full((2, 1), K, dtype=torch.int64)
    nt, s = ops.maskgit_step(cond, tok, 0, 3, mask_id=K, seed=0)
    assert bool((nt == K).all()) and bool(((s >= 0) & (s < K)).all())
    nt, s = ops.maskgit_step(cond, tok, 2, 3, mask_id=K, seed=0)
    assert torch.equal(nt, s) and bool(((nt >= 0) & (nt < K)).all())
    # all known: nothing changes
    tok = torch.randint(0, K, (3, 10))
    nt, s = ops.maskgit_step(torch.randn(3, 10, K), tok, 0, 4, mask_id=K, seed=0)
    assert torch.equal(nt, tok) and torch.equal(s, tok)
    # exactly one masked: stays masked before the last step, filled at the last step
    tok[:, 4] = K
    nt, _ = ops.maskgit_step(torch.randn(3, 10, K), tok, 1, 4, mask_id=K, seed=0)
    assert bool((nt[:, 4] == K).all()) and torch.equal(nt[:, :4], tok[:, :4])
    nt, _ = ops.maskgit_step(torch.randn(3, 10, K), tok, 3, 4, mask_id=K, seed=0)
    assert bool((nt < K).all())
    # empty batch
    nt, s = ops.maskgit_step(torch.randn(0, 5, K), torch.empty(0, 5, dtype=torch.int64), 0, 2, mask_id=K, seed=0)
    assert nt.shape == (0, 5)
    # mask_id may be any id outside [0, K), including negative
    tok = torch.full((1, 6), -1, dtype=torch.int64)
    nt, s = ops.maskgit_step(torch.randn(1, 6, K), tok, 5, 6, mask_id=-1, seed=0)
    assert bool(((nt >= 0) & (nt < K)).all())


def test_neg_inf_logits_mean_probability_zero():
    K = 40
    cond = torch.randn(2, 500, K)
    cond[..., ::2] = -math.inf
    tok = torch.full((2, 500), K, dtype=torch.int64)
    _, s = ops.maskgit_step(cond, tok, 0, 2, mask_id=K, seed=1)
    assert bool((s % 2 == 1).all())


def test_bad_inputs():
    K = 20
    cond = torch.randn(2, 5, K)
    tok = torch.full((2, 5), K, dtype=torch.int64)
    kw = dict(mask_id=K, seed=0)
    with pytest.raises(ValueError, match="mask_id"):
        ops.maskgit_step(cond, tok, 0, 4, mask_id=3, seed=0)
    bad = tok.clone()
    bad[1, 2] = K + 5
    with pytest.raises(ValueError, match=r"tokens\[1, 2\]"):
        ops.maskgit_step(cond, bad, 0, 4, **kw)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match="tokens"):
        ops.maskgit_step(cond, bad, 0, 4, **kw)
    for v in (math.nan, math.inf):
        c = cond.clone()
        c[1, 3, 7] = v
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            ops.maskgit_step(c, tok, 0, 4, **kw)
    c = cond.clone()
    c[0, 0, :] = -math.inf
    with pytest.raises(ValueError, match="all -inf"):
        ops.maskgit_step(c, tok, 0, 4, **kw)
    u = torch.randn(2, 5, K)
    u[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.maskgit_step(cond, tok, 0, 4, uncond_logits=u, guidance_scale=1.0, **kw)
    # a NaN in a known position's logits is never read
    c = cond.clone()
    c[0, 0, 0] = math.nan
    known = tok.clone()
    known[0, 0] = 1
    ops.maskgit_step(c, known, 0, 4, **kw)
    with pytest.raises(ValueError, match="tokens"):
        ops.maskgit_step(cond, tok[:, :4], 0, 4, **kw)
    with pytest.raises(ValueError, match="tokens"):
        ops.maskgit_step(cond, tok.int(), 0, 4, **kw)
    with pytest.raises(ValueError, match="uncond_logits"):
        ops.maskgit_step(cond, tok, 0, 4, uncond_logits=torch.randn(2, 5, K + 1), guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match="uncond_logits"):
        ops.maskgit_step(cond, tok, 0, 4, uncond_logits=u.double(), guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match="uncond_logits"):
        ops.maskgit_step(cond, tok, 0, 4, guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match="cond_logits"):
        ops.maskgit_step(cond.double(), tok, 0, 4, **kw)
    with pytest.raises(ValueError, match="cond_logits"):
        ops.maskgit_step(cond[0], tok, 0, 4, **kw)
    for step, num_steps in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="step"):
            ops.maskgit_step(cond, tok, step, num_steps, **kw)
    with pytest.raises(ValueError, match="temperature"):
        ops.maskgit_step(cond, tok, 0, 4, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="schedule"):
        ops.maskgit_step(cond, tok, 0, 4, schedule="cubic", **kw)
    with pytest.raises(ValueError, match="seed"):
        ops.maskgit_step(cond, tok, 0, 4, mask_id=K, seed=-5)


def test_opcheck():
    cond, uncond, tokens = make_case(2, 9, 17)
    for unc, g in ((None, 0.0), (uncond, 2.0)):
        args = (cond, tokens, unc, 17, g, 1.0, 0.5, 3, False, 7, 1)
        torch.library.opcheck(torch.ops.unif2ace.maskgit_step.default, args)


def test_torch_compile_fullgraph():
    cond, uncond, tokens = make_case(2, 16, 24)

    def f(c, u, t):
        return ops.maskgit_step(c, t, 3, 8, uncond_logits=u, guidance_scale=1.5, mask_id=24, seed=5, offset=3)

    want = f(cond, uncond, tokens)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(cond, uncond, tokens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def toy_logits_fn(K, guided):
    w = torch.randn(K, K, generator=torch.Generator().manual_seed(1))

    def fn(tokens):
        x = torch.nn.functional.one_hot(tokens.clamp(max=K - 1), K).float()
        cond = x.roll(1, dims=1) @ w * 2
        if guided:
            return cond, cond * 0.5
        return cond

    return fn


@pytest.mark.parametrize("guided", [False, True])
def test_generate_kernels_match_reference_backend(guided):
    B, N, K = 2, 64, 30
    kw = dict(num_steps=8, mask_id=K, seed=11, guidance_scale=2.0 if guided else 0.0, choice_temperature=4.5)
    a = ops.maskgit_generate(toy_logits_fn(K, guided), B, N, K, **kw)
    b = ops.maskgit_generate(toy_logits_fn(K, guided), B, N, K, backend="reference", **kw)
    assert torch.equal(a, b)
    assert bool(((a >= 0) & (a < K)).all())


def test_generate_inpainting_keeps_given_tokens():
    B, N, K = 2, 40, 25
    init = torch.full((B, N), K, dtype=torch.int64)
    init[:, ::3] = torch.randint(0, K, (B, len(range(0, N, 3))))
    out = ops.maskgit_generate(toy_logits_fn(K, False), B, N, K, num_steps=5, mask_id=K, seed=0,
                               init_tokens=init, progress=False)
    assert torch.equal(out[:, ::3], init[:, ::3])
    assert bool(((out >= 0) & (out < K)).all())
    with pytest.raises(ValueError, match="logits_fn"):
        ops.maskgit_generate(toy_logits_fn(K, False), B, N, K, num_steps=5, mask_id=K, seed=0, guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------------------
# CUDA: same results as the CPU kernel
# ---------------------------------------------------------------------------------------------------------
# K picks the CUDA row kernel: one warp per row (K <= 1024), 4 / 8 / 16 warps per row (<= 4096 / 8192 / 16384),
# the generic kernel above; K not a multiple of 8 (bf16/fp16) or 4 (fp32) takes scalar loads.
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,K", [(1, 1, 5), (2, 17, 33), (3, 256, 1000), (2, 9, 1024), (2, 40, 1025), (1, 33, 3000),
                                   (2, 1024, 8192), (1, 20, 12004), (1, 7, 16384), (1, 8, 20000), (1, 5000, 16)])
def test_cuda_matches_cpu(B, N, K, dtype):
    cond, uncond, tokens = make_case(B, N, K, dtype)
    for step, guided in ((0, True), (3, False), (7, True)):
        kw = dict(mask_id=K, seed=17, offset=step, choice_temperature=2.0, return_confidence=True)
        if guided:
            kw.update(uncond_logits=uncond, guidance_scale=1.5)
        a = ops.maskgit_step(cond, tokens, step, 8, **kw)
        kw_cuda = dict(kw)
        if guided:
            kw_cuda["uncond_logits"] = uncond.cuda()
        b = ops.maskgit_step(cond.cuda(), tokens.cuda(), step, 8, **kw_cuda)
        assert torch.equal(a[1], b[1].cpu())
        assert torch.equal(a[0], b[0].cpu())
        assert torch.equal(a[2], b[2].cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_rows_and_ties_match_cpu(dtype):
    B, N, K = 2, 300, 1024
    cond, uncond, tokens = make_case(B, N, K, dtype, seed=3)
    # Logits starting one element past a 16-byte boundary: the kernel must fall back to scalar loads.
    flat = torch.empty(B * N * K + 1, dtype=dtype, device="cuda")
    flat[1:] = cond.cuda().view(-1)
    shifted = flat[1:].view(B, N, K)
    assert shifted.data_ptr() % 16 != 0
    kw = dict(mask_id=K, seed=5, offset=2, return_confidence=True)
    a = ops.maskgit_step(cond, tokens, 2, 8, **kw)
    b = ops.maskgit_step(shifted, tokens.cuda(), 2, 8, **kw)
    assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b))
    # Equal rows and no confidence noise: every masked position ties, the re-masked ones are the lowest positions.
    flat_rows = torch.zeros(B, N, K, dtype=dtype)
    kw = dict(mask_id=K, seed=1, choice_temperature=0.0, return_confidence=True)
    a = ops.maskgit_step(flat_rows, tokens, 0, 8, **kw)
    b = ops.maskgit_step(flat_rows.cuda(), tokens.cuda(), 0, 8, **kw)
    assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b))


@pytest.mark.cuda
def test_cuda_bad_values_are_safe():
    K = 16
    cond = torch.randn(2, 6, K, device="cuda")
    cond[0, 1, 3] = math.nan
    cond[1, 2, :] = -math.inf
    tok = torch.full((2, 6), K, dtype=torch.int64, device="cuda")
    tok[0, 5] = 99  # out of range: resampled
    nt, s, conf = ops.maskgit_step(cond, tok, 0, 4, mask_id=K, seed=0, return_confidence=True)
    s, nt = s.cpu(), nt.cpu()
    assert bool(((s >= 0) & (s < K)).all())
    assert bool((((nt >= 0) & (nt < K)) | (nt == K)).all())
    assert s[0, 1] == 0 and s[1, 2] == 0 and conf[0, 1].item() == -math.inf


@pytest.mark.cuda
def test_cuda_generate_matches_cpu():
    B, N, K = 2, 64, 30
    kw = dict(num_steps=8, mask_id=K, seed=11, guidance_scale=2.0)
    fn = toy_logits_fn(K, True)
    a = ops.maskgit_generate(fn, B, N, K, **kw)
    w_fn = lambda t: tuple(x.cuda() for x in fn(t.cpu()))  # noqa: E731
    b = ops.maskgit_generate(w_fn, B, N, K, device="cuda", **kw)
    assert torch.equal(a, b.cpu())
