"""Property-based fuzzing of the sampling op boundary (maskgit_step, maskgit_generate, sample_next_token,
philox_noise): random shapes (0- and 1-sized included), dtypes, non-contiguous views, out-of-range tokens and
mask ids, special logits (NaN, ±inf, ±1e4), bad scalars and shape mismatches. Every call must give the reference's
result (fed the same Philox noise) or a clean ValueError/RuntimeError naming the bad argument — never a crash,
never a change to the inputs; token ids always lie in [0, K) or equal mask_id."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unif2ace.ops import maskgit_generate, maskgit_step, philox_noise, sample_next_token
from unif2ace.ops import reference as ref

from fuzz_checks import assert_unchanged, call_checked, expect_error, snapshot

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOGITS = [torch.float32, torch.bfloat16, torch.float16]
SPECIALS = [1e4, -1e4, float("inf"), float("-inf"), float("nan")]
BAD_SEEDS = [-1, 2**63, 2**64]


def with_specials(draw, g, shape, dtype, scale):
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if z.numel() and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            z.view(-1)[draw(st.integers(0, z.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    if z.numel() and draw(st.integers(0, 7)) == 0:  # a whole row at -inf
        z.view(-1, shape[-1])[0] = float("-inf")
    return z.to(dtype) if dtype.is_floating_point else z.round().to(dtype)


def bad_rows(z, inv_t):
    """Rows the kernels reject: NaN or +inf after temperature, or only -inf."""
    z = z * torch.tensor(inv_t, dtype=torch.float32)
    return (z.isnan() | (z == math.inf)).any(-1) | (z == -math.inf).all(-1)


# ----------------------------------------------------------------------------------------------------------
# maskgit_step
# ----------------------------------------------------------------------------------------------------------
@st.composite
def step_case(draw):
    B, N, K = draw(st.integers(0, 3)), draw(st.integers(0, 13)), draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(LOGITS + [torch.float64, torch.int32]) if draw(st.integers(0, 7)) == 0
                 else st.sampled_from(LOGITS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bad = []
    if K == 0 or dtype not in LOGITS:
        bad.append("cond_logits")
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    cond = with_specials(draw, g, (B, N, K), dtype, scale)
    if B and N > 1 and K > 1 and draw(st.booleans()):  # non-contiguous: N and B strides swapped
        cond = cond.transpose(0, 1).contiguous().transpose(0, 1)
    guidance = draw(st.sampled_from([0.0, 0.0, 1.5, 3.0, -1.0, float("nan")]))
    uncond = None
    if guidance != 0 and draw(st.integers(0, 9)):
        uncond = with_specials(draw, g, (B, N, K), dtype, scale)
        ushape = draw(st.sampled_from(["ok"] * 6 + ["shape", "dtype"]))
        if ushape == "shape":
            uncond = uncond[:, :, :-1] if K else uncond.new_zeros(B, N, 1)
            bad.append("uncond_logits")
        elif ushape == "dtype":
            uncond = uncond.to(torch.float16 if dtype == torch.float32 else torch.float32)
            bad.append("uncond_logits")
    if guidance != 0 and not (guidance > 0):
        bad.append("guidance_scale")
    if guidance != 0 and uncond is None:
        bad.append("uncond_logits")
    mask_id = draw(st.sampled_from([K, K, K + 3, -1, 2**40] + ([0, K - 1] if K else [])))
    if 0 <= mask_id < K:
        bad.append("mask_id")
    tokens = torch.full((B, N), mask_id, dtype=torch.int64)
    known = torch.rand(B, N, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    if K:
        tokens[known] = torch.randint(0, K, (int(known.sum()),), generator=g)
    if B * N and draw(st.integers(0, 3)) == 0:
        bad_tok = draw(st.sampled_from([-2, K, K + 1, 2**40, -(2**40)]))
        if bad_tok != mask_id and not 0 <= bad_tok < K:
            tokens.view(-1)[draw(st.integers(0, B * N - 1))] = bad_tok
            bad.append("tokens")
    tshape = draw(st.sampled_from(["ok"] * 8 + ["int32", "short", "3d"]))
    if tshape == "int32":
        tokens = tokens.int()
    elif tshape == "short":
        tokens = tokens[:, :-1] if N else tokens.new_zeros(B, 1)
    elif tshape == "3d":
        tokens = tokens[..., None]
    if tshape != "ok":
        bad.append("tokens")
    num_steps = draw(st.integers(0, 12))
    step = draw(st.integers(-1, num_steps))
    if num_steps < 1:
        bad.append("num_steps")
    elif not 0 <= step < num_steps:
        bad.append("step")
    temperature = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.0, -1.0, float("inf"), float("nan")]))
    if not (math.isfinite(temperature) and temperature > 0):
        bad.append("temperature")
    tau = draw(st.sampled_from([1.0, 0.0, 4.5, -0.5]))
    if tau < 0:
        bad.append("choice_temperature")
    seed = draw(st.sampled_from([0, 7, 2**63 - 1] + BAD_SEEDS))
    offset = draw(st.sampled_from([0, 3, 2**40] + BAD_SEEDS[:1]))
    if not 0 <= seed < 2**63:
        bad.append("seed")
    if not 0 <= offset < 2**63:
        bad.append("offset")
    kw = dict(uncond_logits=uncond, guidance_scale=guidance, temperature=temperature, choice_temperature=tau,
              schedule=draw(st.sampled_from(["cosine", "linear"])), mask_id=mask_id)
    return cond, tokens, step, num_steps, seed, offset, kw, bad


@FUZZ
@given(step_case())
def test_maskgit_step_fuzz(case):
    cond, tokens, step, num_steps, seed, offset, kw, bad = case
    uncond, mask_id = kw["uncond_logits"], kw["mask_id"]
    if not bad:  # rows the kernel must reject: masked rows whose guided, tempered logits are NaN / +inf / all -inf
        z = cond.float()
        if kw["guidance_scale"] != 0:
            z = z + kw["guidance_scale"] * (z - uncond.float())
        if (bad_rows(z, 1.0 / kw["temperature"]) & (tokens == mask_id)).any():
            bad.append("cond_logits")
    accepted, out = call_checked(
        lambda: maskgit_step(cond, tokens, step, num_steps, seed=seed, offset=offset, return_confidence=True, **kw),
        (cond, tokens, uncond), bad)
    if not accepted:
        return
    new_tokens, sampled, conf = out
    B, N, K = cond.shape
    assert new_tokens.shape == sampled.shape == conf.shape == (B, N) and conf.dtype == torch.float32
    assert ((sampled >= 0) & (sampled < K)).all()
    assert (((new_tokens >= 0) & (new_tokens < K)) | (new_tokens == mask_id)).all()
    known = tokens != mask_id
    assert torch.equal(sampled[known], tokens[known]) and torch.equal(new_tokens[known], tokens[known])
    uni = philox_noise((B, N), seed, offset, kind="uniform")
    gum = philox_noise((B, N), seed, offset, kind="gumbel")
    want = ref.maskgit_step(cond, tokens, step, num_steps, uniform=uni, gumbel=gum, return_confidence=True, **kw)
    assert torch.equal(sampled, want[1])
    assert torch.equal(new_tokens, want[0])
    finite = torch.isfinite(want[2])
    assert torch.equal(finite, torch.isfinite(conf))
    torch.testing.assert_close(conf[finite], want[2][finite], rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# sample_next_token
# ----------------------------------------------------------------------------------------------------------
@FUZZ
@given(
    st.integers(0, 6), st.integers(0, 70), st.sampled_from(LOGITS + [torch.float64, torch.int64]),
    st.sampled_from([1.0, 0.7, 1.6, 0.0, -0.5, float("nan"), float("inf")]),
    st.sampled_from([0, 1, 2, 5, 31, 100, -1]), st.sampled_from([1.0, 0.9, 0.5, 1e-6, 0.0, 1.5, float("nan")]),
    st.sampled_from([0, 5, 2**63 - 1] + BAD_SEEDS), st.sampled_from(["ok", "ok", "ok", "1d", "3d", "strided"]),
    st.data(),
)
def test_sample_next_token_fuzz(B, V, dtype, temperature, top_k, top_p, seed, shape, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    logits = with_specials(data.draw, g, (B, V), dtype, data.draw(st.sampled_from([0.1, 3.0, 30.0])))
    bad = []
    if V == 0 or dtype not in LOGITS:
        bad.append("logits")
    if shape == "1d":
        logits = logits.view(-1)
        bad.append("logits")
    elif shape == "3d":
        logits = logits[None]
        bad.append("logits")
    elif shape == "strided" and B > 1 and V > 1:
        logits = logits.t().contiguous().t()
    if not (math.isfinite(temperature) and temperature >= 0):
        bad.append("temperature")
    if top_k < 0:
        bad.append("top_k")
    if not (0 < top_p <= 1):
        bad.append("top_p")
    if not 0 <= seed < 2**63:
        bad.append("seed")
    greedy = temperature == 0 or top_k == 1
    maybe_bad = False  # greedy rows with NaN / +inf / only -inf: a clean error or an id in range
    if not bad and logits.numel():
        rows = bad_rows(logits.float(), 1.0 if greedy else 1.0 / temperature)
        if rows.any():
            if greedy:
                maybe_bad = True
            else:
                bad.append("logits")
    accepted, out = call_checked(
        lambda: sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=3),
        (logits,), bad, may_reject_for=["logits"] if maybe_bad else [])
    if not accepted:
        return
    assert out.shape == (B,) and out.dtype == torch.int64
    assert ((out >= 0) & (out < V)).all()
    if maybe_bad:
        return
    uni = philox_noise(B, seed, 3, kind="uniform")
    want = ref.sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uni)
    assert torch.equal(out, want)


# ----------------------------------------------------------------------------------------------------------
# philox_noise
# ----------------------------------------------------------------------------------------------------------
@FUZZ
@given(
    st.lists(st.integers(0, 9), min_size=0, max_size=3), st.sampled_from(["uniform", "gumbel", "uniform64", "normal"]),
    st.sampled_from([0, 1, 2**63 - 1] + BAD_SEEDS), st.sampled_from([0, 9, 2**62] + BAD_SEEDS),
    st.sampled_from([None, -1]),
)
def test_philox_noise_fuzz(shape, kind, seed, offset, negative):
    bad = []
    if negative is not None and shape:
        shape = shape[:-1] + [negative]
        bad.append("shape")
    if kind == "normal":
        bad.append("kind")
    if not 0 <= seed < 2**63:
        bad.append("seed")
    if not 0 <= offset < 2**63:
        bad.append("offset")
    try:
        out = philox_noise(shape, seed, offset, kind=kind)
    except Exception as e:  # noqa: BLE001
        expect_error(e, bad)
        return
    assert not bad, f"bad input accepted: {bad}"
    assert list(out.shape) == shape
    assert out.dtype == {"uniform": torch.float64, "gumbel": torch.float32, "uniform64": torch.int64}[kind]
    assert torch.equal(out, philox_noise(shape, seed, offset, kind=kind))  # deterministic
    flat = philox_noise(out.numel() + 2, seed, offset, kind=kind)  # element i is block i, whatever the shape
    assert torch.equal(out.reshape(-1), flat[: out.numel()])
    if kind == "uniform":
        assert ((out >= 0) & (out < 1)).all()
        bits = philox_noise(shape, seed, offset, kind="uniform64").double()
        as_unsigned = torch.where(bits < 0, bits + 2.0**64, bits) / 2.0**64
        torch.testing.assert_close(out, as_unsigned, rtol=0, atol=1e-15)
    elif kind == "gumbel":
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------------
# maskgit_generate (small)
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2), st.integers(0, 7), st.integers(1, 12), st.integers(0, 4), st.sampled_from([0.0, 2.0]),
    st.sampled_from([None, "ok", "shape", "bad_token"]), st.sampled_from(["ok", "ok", "ok", "shape", "single"]),
    st.sampled_from(["K", "K+2", "-1", "in"]), st.integers(0, 2**31 - 1),
)
def test_maskgit_generate_fuzz(B, N, K, num_steps, guidance, init, fn_kind, mask_kind, seed):
    mask_id = {"K": K, "K+2": K + 2, "-1": -1, "in": K - 1}[mask_kind]
    bad = []
    if num_steps < 1:
        bad.append("num_steps")
    if mask_kind == "in":
        bad.append("mask_id")
    g = torch.Generator().manual_seed(seed)
    init_tokens = None
    if init is not None:
        init_tokens = torch.full((B, N), mask_id, dtype=torch.int64)
        keep = torch.rand(B, N, generator=g) < 0.4
        init_tokens[keep] = torch.randint(0, K, (int(keep.sum()),), generator=g)
        if init == "shape":
            init_tokens = init_tokens[:, :0] if N else init_tokens.new_zeros(B, 1)
            bad.append("init_tokens")
        elif init == "bad_token" and B * N:
            init_tokens.view(-1)[0] = K + 5 if mask_id != K + 5 else -3
            bad.append("tokens")
    if fn_kind == "shape":
        bad.append("logits_fn")
    elif fn_kind == "single" and guidance > 0:
        bad.append("logits_fn")

    def make_fn():
        calls = [0]

        def fn(tokens):
            gg = torch.Generator().manual_seed(seed + calls[0])
            calls[0] += 1
            shape = (B, N, K + (fn_kind == "shape"))
            cond = torch.randn(shape, generator=gg) * 3
            if fn_kind == "single" or guidance == 0:
                return cond
            return cond, torch.randn(shape, generator=gg) * 3
        return fn

    before = snapshot(init_tokens)
    outs = []
    for backend in ("kernels", "reference"):
        try:
            outs.append(maskgit_generate(make_fn(), B, N, K, num_steps=num_steps, mask_id=mask_id, seed=seed,
                                         init_tokens=init_tokens, guidance_scale=guidance, backend=backend))
        except Exception as e:  # noqa: BLE001
            if backend == "kernels":
                expect_error(e, bad)
                assert_unchanged(before, (init_tokens,))
                return
            raise
        assert not bad, f"bad input accepted: {bad}"
    assert_unchanged(before, (init_tokens,))
    out = outs[0]
    assert out.shape == (B, N) and out.dtype == torch.int64
    assert ((out >= 0) & (out < K)).all()
    if init_tokens is not None:
        kept = init_tokens != mask_id
        assert torch.equal(out[kept], init_tokens[kept])
    assert torch.equal(out, outs[1])
