"""Property-based fuzzing of the MoE op boundary (moe_gate, moe_dispatch, moe_combine, grouped_mlp, moe_experts,
moe_scatter_add_rows_, balance_loss):
random shapes (0- and 1-sized included), dtypes, non-contiguous views, out-of-range ids, k > E, special values and
shape mismatches. Every call must give the reference's result or a clean ValueError/RuntimeError naming the bad
argument — never a crash, never a change to the inputs (under .ci/sanitize.sh AddressSanitizer watches every
access)."""
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from unif2ace.ops import balance_loss, grouped_mlp, moe_combine, moe_dispatch, moe_experts, moe_gate, moe_sort
from unif2ace.ops.moe import moe_scatter_add_rows_
from unif2ace.ops import reference as ref

from fuzz_checks import call_checked

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
WRONG = [torch.int32, torch.int64, torch.bool]
SPECIALS = [1e4, -1e4, float("inf"), float("-inf"), float("nan")]
BAD_IDS = [-1, "size", 2**40, -(2**40), 2**62]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rand_float(g, shape, dtype, scale=2.0):
    if dtype in WRONG:
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def maybe_strided(draw, t):
    """The same values as a non-contiguous (column-major) view, sometimes."""
    if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and draw(st.booleans()):
        out = t.t().contiguous().t()
        assert not out.is_contiguous()
        return out
    return t


def put_bad(draw, g, ids, size):
    """Sets one entry of a non-empty id tensor out of [0, size). Returns whether it did."""
    if ids.numel() == 0 or not draw(st.booleans()):
        return False
    bad = draw(st.sampled_from(BAD_IDS))
    ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = size if bad == "size" else bad
    return True


# ----------------------------------------------------------------------------------------------------------
# moe_gate
# ----------------------------------------------------------------------------------------------------------
@st.composite
def gate_case(draw):
    t = draw(st.integers(0, 37))
    groups = draw(st.integers(1, 4))
    experts = draw(st.integers(1, 9))
    cols = groups * experts
    num_groups = groups
    bad = []
    if draw(st.integers(0, 9)) == 0:  # a column count that is not a multiple, or a non-positive num_groups
        num_groups = draw(st.sampled_from([0, -1, cols + 1] + ([groups + 1] if cols % (groups + 1) else [])))
        bad += ["num_groups", "router_logits"]
    dtype = draw(st.sampled_from(FLOATS + [torch.int32]) if draw(st.integers(0, 9)) == 0 else st.sampled_from(FLOATS))
    if dtype not in FLOATS:
        bad.append("router_logits")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = rand_float(g, (t, cols), torch.float64, draw(st.sampled_from([0.1, 2.0, 50.0])))
    special = False
    if t and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            logits[draw(st.integers(0, t - 1)), draw(st.integers(0, cols - 1))] = draw(st.sampled_from(SPECIALS))
        special = True
    if draw(st.integers(0, 5)) == 0 and t:  # ties
        logits = logits.round()
    logits = logits.to(dtype)
    logits = maybe_strided(draw, logits)
    top_k = draw(st.one_of(st.integers(1, experts), st.sampled_from([0, -1, experts + 1, experts + 7])))
    if not 1 <= top_k <= experts:
        bad.append("top_k")
    group_ids = torch.randint(0, groups, (t,), generator=g)
    if put_bad(draw, g, group_ids, groups):
        bad.append("group_ids")
    gid_shape = draw(st.sampled_from(["ok"] * 8 + ["long", "2d", "int32"]))
    if gid_shape == "long":
        group_ids = torch.cat([group_ids, group_ids.new_zeros(1)])
    elif gid_shape == "2d":
        group_ids = group_ids[:, None]
    elif gid_shape == "int32":
        group_ids = group_ids.int()
    if gid_shape != "ok":
        bad.append("group_ids")
    mask_kind = draw(st.sampled_from([None, None, "ok", "short", "int"]))
    token_mask = None
    if mask_kind is not None:
        token_mask = torch.rand(t + (mask_kind == "short"), generator=g) < 0.7
        if mask_kind == "int":
            token_mask = token_mask.long()
        if mask_kind != "ok":
            bad.append("token_mask")
    return dict(logits=logits, group_ids=group_ids, token_mask=token_mask, num_groups=num_groups, top_k=top_k,
                renormalize=draw(st.booleans()), groups=groups, experts=experts, special=special, bad=bad)


def group_of_rows(c):
    cols = torch.arange(c["logits"].shape[1]) // c["experts"]
    return cols[None, :] == c["group_ids"][:, None]


@FUZZ
@given(gate_case())
def test_moe_gate_fuzz(c):
    logits, group_ids, token_mask = c["logits"], c["group_ids"], c["token_mask"]
    accepted, out = call_checked(
        lambda: moe_gate(logits, group_ids, num_groups=c["num_groups"], top_k=c["top_k"],
                         renormalize=c["renormalize"], token_mask=token_mask),
        (logits, group_ids, token_mask), c["bad"])
    if not accepted:
        return
    gates, ids, counts, prob_mean = out
    t, k, e, ne = logits.shape[0], c["top_k"], c["experts"], logits.shape[1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert gates.shape == (t, k) and gates.dtype == acc and ids.shape == (t, k) and ids.dtype == torch.int64
    assert counts.shape == (ne,) and prob_mean.shape == (ne,) and prob_mean.dtype == acc
    # Expert ids always in the token's group and distinct per token.
    lo = (group_ids * e)[:, None]
    assert ((ids >= lo) & (ids < lo + e)).all()
    if k > 1 and t:
        assert (ids.sort(1).values.diff(dim=1) > 0).all()
    counted = torch.ones(t, dtype=torch.bool) if token_mask is None else token_mask
    assert int(counts.sum()) == int(counted.sum()) * k
    z = logits.to(acc)
    in_group = group_of_rows(c)
    clean_rows = (~((z.isnan() | (z == float("inf"))) & in_group).any(1)
                  & (((z > float("-inf")) & in_group).sum(1) >= k))
    # The reference agrees on every row without NaN / +inf in its group (+inf makes the softmax NaN) and with at
    # least k logits above -inf there (with fewer, the reference's stable sort fills the top k with -inf columns of
    # other groups).
    r_gates, r_ids, r_counts, r_mean = ref.moe_gate(logits, group_ids, num_groups=c["num_groups"], top_k=k,
                                                    renormalize=c["renormalize"], token_mask=token_mask)
    assert torch.equal(ids[clean_rows], r_ids[clean_rows])
    torch.testing.assert_close(gates[clean_rows], r_gates[clean_rows], rtol=TOL[acc], atol=TOL[acc],
                               equal_nan=True)
    if clean_rows.all():
        assert torch.equal(counts, r_counts)
        torch.testing.assert_close(prob_mean, r_mean, rtol=TOL[acc], atol=TOL[acc])
        gfin = gates.isfinite().all(1)
        assert ((gates[gfin] >= 0) & (gates[gfin] <= 1 + 1e-6)).all()
    # Gradients of the differentiable outputs against the reference's, on clean float32/float64 cases.
    if clean_rows.all() and not c["special"] and logits.dtype in (torch.float32, torch.float64) and t:
        x = logits.detach().clone().requires_grad_()
        xr = logits.detach().clone().requires_grad_()
        w = torch.randn(t, k, dtype=acc)
        out = moe_gate(x, group_ids, num_groups=c["num_groups"], top_k=k, renormalize=c["renormalize"],
                       token_mask=token_mask)
        rout = ref.moe_gate(xr, group_ids, num_groups=c["num_groups"], top_k=k, renormalize=c["renormalize"],
                            token_mask=token_mask)
        ((out[0] * w).sum() + (out[3] * torch.arange(ne, dtype=acc)).sum()).backward()
        ((rout[0] * w).sum() + (rout[3] * torch.arange(ne, dtype=acc)).sum()).backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# moe_dispatch
# ----------------------------------------------------------------------------------------------------------
@FUZZ
# Regressions: tensors without elements (T = 0 or H = 0) were rejected as non-contiguous by the C++ binding; with
# H = 0 the row gather passed null pointers to memcpy (undefined behaviour, caught by .ci/sanitize.sh).
@example(t=0, k=1, h=0, dtype=torch.float32, num_experts=1, bad_id=None, shape="ok", strided=False, seed=0)
@example(t=3, k=2, h=0, dtype=torch.bfloat16, num_experts=2, bad_id=None, shape="ok", strided=False, seed=0)
@given(
    st.integers(0, 33), st.integers(1, 5), st.integers(0, 19), st.sampled_from(FLOATS + [torch.int32]),
    st.one_of(st.integers(1, 11), st.sampled_from([0, -3])), st.sampled_from([None] * 4 + BAD_IDS),
    st.sampled_from(["ok"] * 8 + ["rows", "k0", "1d", "int32"]), st.booleans(), st.integers(0, 2**31 - 1),
)
def test_moe_dispatch_fuzz(t, k, h, dtype, num_experts, bad_id, shape, strided, seed):
    g = torch.Generator().manual_seed(seed)
    bad = []
    if dtype not in FLOATS:
        bad.append("x")
    x = rand_float(g, (t, h), dtype)
    if strided and t > 1 and h > 1:
        x = x.t().contiguous().t()
    ids = torch.randint(0, max(num_experts, 1), (t, k), generator=g)
    if bad_id is not None and t:
        ids.view(-1)[seed % ids.numel()] = max(num_experts, 1) if bad_id == "size" else bad_id
        bad.append("expert_ids")
    if num_experts <= 0:
        bad += ["num_experts", "expert_ids"]
    if shape == "rows":
        ids = torch.cat([ids, ids[:1] if t else ids.new_zeros(1, k)])
    elif shape == "k0":
        ids = ids[:, :0]
    elif shape == "1d":
        ids = ids.view(-1)
    elif shape == "int32":
        ids = ids.int()
    if shape != "ok":
        bad.append("expert_ids")
    if strided and ids.dim() == 2 and t > 1 and k > 1:
        ids = ids.t().contiguous().t()
    accepted, out = call_checked(lambda: moe_dispatch(x, ids, num_experts), (x, ids), bad)
    if not accepted:
        return
    x_sorted, offsets, sorted_slot = out
    r_sorted, r_offsets, r_slot = ref.moe_dispatch(x, ids, num_experts)
    assert torch.equal(sorted_slot, r_slot) and torch.equal(offsets, r_offsets)
    assert x_sorted.dtype == x.dtype and torch.equal(x_sorted, r_sorted)
    if t and h and dtype in (torch.float32, torch.float64):  # the backward sums each token's k rows
        xg = x.detach().clone().requires_grad_()
        w = torch.randn(t * k, h, generator=g, dtype=dtype)
        (moe_dispatch(xg, ids, num_experts)[0] * w).sum().backward()
        want = torch.zeros(t, h, dtype=dtype).index_add_(0, sorted_slot // k, w)
        torch.testing.assert_close(xg.grad, want)


# ----------------------------------------------------------------------------------------------------------
# moe_combine
# ----------------------------------------------------------------------------------------------------------
@FUZZ
@example(t=2, k=2, h=3, dtype=torch.float32, gdtype=torch.float32, corrupt="dup", shape="ok", seed=0)
@given(
    st.integers(0, 21), st.integers(0, 5), st.integers(0, 17), st.sampled_from(FLOATS + [torch.int32]),
    st.sampled_from(FLOATS + [torch.int64]), st.sampled_from([None] * 4 + ["dup", -1, "size", 2**40, -(2**40)]),
    st.sampled_from(["ok"] * 8 + ["y_rows", "slot_len", "slot_int32", "gates_1d"]), st.integers(0, 2**31 - 1),
)
def test_moe_combine_fuzz(t, k, h, dtype, gdtype, corrupt, shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = t * k
    bad = []
    if dtype not in FLOATS:
        bad.append("y_sorted")
    if gdtype not in FLOATS:
        bad.append("gates")
    if k == 0:
        bad += ["y_sorted", "gates", "top_k"]
    y = rand_float(g, (n, h), dtype)
    gates = rand_float(g, (t, k), gdtype).abs()
    slot = torch.randperm(n, generator=g)
    if corrupt is not None and n:
        i = int(torch.randint(0, n, (1,), generator=g))
        if corrupt == "dup":
            if n > 1:
                slot[i] = slot[(i + 1) % n]
                bad.append("sorted_slot")
        else:
            slot[i] = n if corrupt == "size" else corrupt
            bad.append("sorted_slot")
    if shape == "y_rows":
        y = torch.cat([y, y.new_zeros(1, h)])
        bad.append("y_sorted")
    elif shape == "slot_len":
        slot = torch.cat([slot, slot.new_zeros(1)])
        bad.append("sorted_slot")
    elif shape == "slot_int32":
        slot = slot.int()
        bad.append("sorted_slot")
    elif shape == "gates_1d":
        gates = gates.view(-1)
        bad.append("gates")
    if y.dim() == 2 and y.shape[0] > 1 and y.shape[1] > 1 and seed % 2:
        y = y.t().contiguous().t()
    accepted, out = call_checked(lambda: moe_combine(y, gates, slot), (y, gates, slot), bad)
    if not accepted:
        return
    assert out.shape == (t, h) and out.dtype == y.dtype
    if out.numel() == 0:
        return
    want = ref.moe_combine(y, gates, slot)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])


# ----------------------------------------------------------------------------------------------------------
# grouped_mlp
# ----------------------------------------------------------------------------------------------------------
GM_BAD = ["offsets_len", "offsets_start", "offsets_desc", "offsets_past", "b1_experts", "b2_width", "w2_inner",
          "x_width", "x_dtype", "w1_1d", "activation"]


@FUZZ
# Regressions: the weights were not validated (b1 with too few experts was silently indexed short or raised
# IndexError, a 1-D w1 raised IndexError, no experts at all raised IndexError).
@example(n=0, ne=1, h=1, f=1, h_out=1, dtype=torch.float32, fault="b1_experts", seed=0, full=False)
@example(n=5, ne=2, h=3, f=2, h_out=1, dtype=torch.float32, fault="b1_experts", seed=1, full=True)
@example(n=4, ne=3, h=2, f=2, h_out=2, dtype=torch.float64, fault="w1_1d", seed=0, full=True)
@example(n=4, ne=2, h=2, f=2, h_out=2, dtype=torch.float32, fault="b2_width", seed=0, full=True)
@given(
    st.integers(0, 25), st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.integers(1, 7),
    st.sampled_from([torch.float32, torch.float64]), st.sampled_from([None] * 10 + GM_BAD),
    st.integers(0, 2**31 - 1), st.booleans(),
)
def test_grouped_mlp_fuzz(n, ne, h, f, h_out, dtype, fault, seed, full):
    g = torch.Generator().manual_seed(seed)
    x = rand_float(g, (n, h), dtype)
    cuts = torch.randint(0, n + 1, (ne - 1,), generator=g).sort().values.tolist()
    last = n if full else int(torch.randint(0, n + 1, (1,), generator=g))
    cuts = [min(c, last) for c in cuts]
    offsets = torch.tensor([0] + cuts + [last], dtype=torch.int64)
    w1, b1 = rand_float(g, (ne, f, h), dtype, 0.5), rand_float(g, (ne, f), dtype, 0.5)
    w2, b2 = rand_float(g, (ne, h_out, f), dtype, 0.5), rand_float(g, (ne, h_out), dtype, 0.5)
    activation = "gelu_tanh" if seed % 2 else "gelu"
    names = {"offsets_len": "expert_offsets", "offsets_start": "expert_offsets", "offsets_desc": "expert_offsets",
             "offsets_past": "expert_offsets", "b1_experts": "b1", "b2_width": "b2", "w2_inner": "w2",
             "x_width": "x_sorted", "x_dtype": "x_sorted", "w1_1d": "w1", "activation": "activation"}
    bad = [names[fault]] if fault else []
    if fault == "offsets_len":
        offsets = torch.cat([offsets, offsets[-1:]])
    elif fault == "offsets_start":
        offsets[0] = 1
    elif fault == "offsets_desc":
        offsets[1] = offsets[1] + 2 if ne > 1 else -1
    elif fault == "offsets_past":
        offsets[-1] = n + 1
    elif fault == "b1_experts":
        b1 = b1[:-1]
    elif fault == "b2_width":
        b2 = torch.cat([b2, b2[:, :1]], 1)
    elif fault == "w2_inner":
        w2 = torch.cat([w2, w2[:, :, :1]], 2)
    elif fault == "x_width":
        x = torch.cat([x, x[:, :1]], 1)
    elif fault == "x_dtype":
        x = x.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif fault == "w1_1d":
        w1 = w1.reshape(-1)
    elif fault == "activation":
        activation = "relu"
    if fault == "offsets_desc" and ne > 1 and offsets[1] <= offsets[2] and offsets[1] <= n:
        bad = []  # still a valid rising sequence within the rows
    accepted, out = call_checked(lambda: grouped_mlp(x, offsets, w1, b1, w2, b2, activation=activation),
                                 (x, offsets, w1, b1, w2, b2), bad)
    if not accepted:
        return
    want = ref.grouped_mlp(x, offsets, w1, b1, w2, b2, activation=activation)
    m = int(offsets[-1])
    assert out.shape == (n, h_out) and out.dtype == x.dtype
    torch.testing.assert_close(out[:m], want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    assert (out[m:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# balance_loss
# ----------------------------------------------------------------------------------------------------------
@FUZZ
# Regressions: a router_prob_mean shorter than expert_counts was broadcast into a wrong loss; a num_groups not
# dividing the length gave a view error naming no argument.
@example(groups=1, experts=2, dtype=torch.float32, fault="mean_len", seed=0)
@example(groups=2, experts=1, dtype=torch.float32, fault="groups", seed=0)
@given(
    st.integers(1, 5), st.integers(1, 9), st.sampled_from(FLOATS),
    st.sampled_from([None] * 6 + ["groups", "groups0", "mean_len", "counts_len", "counts_2d", "counts_float"]),
    st.integers(0, 2**31 - 1),
)
def test_balance_loss_fuzz(groups, experts, dtype, fault, seed):
    g = torch.Generator().manual_seed(seed)
    ne = groups * experts
    counts = torch.randint(0, 6, (ne,), generator=g)
    mean = torch.rand(ne, generator=g, dtype=torch.float64).to(dtype)
    num_groups = groups
    bad = []
    if fault == "groups":
        num_groups = groups + 1 if ne % (groups + 1) else ne + 1
        bad = ["num_groups", "expert_counts"]
    elif fault == "groups0":
        num_groups = 0
        bad = ["num_groups"]
    elif fault == "mean_len":
        mean = mean[:-1] if ne > 1 else torch.cat([mean, mean])
        bad = ["router_prob_mean"]
    elif fault == "counts_len":
        counts = torch.cat([counts, counts])
        bad = ["expert_counts"]
    elif fault == "counts_2d":
        counts = counts.view(groups, experts)
        if groups == 1:
            counts = counts[None]
        bad = ["expert_counts"]
    elif fault == "counts_float":
        counts = counts.double()
        bad = ["expert_counts"]
    accepted, loss = call_checked(lambda: balance_loss(counts, mean, num_groups), (counts, mean), bad)
    if not accepted:
        return
    want = ref.balance_loss(counts, mean, num_groups)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, want)



# ----------------------------------------------------------------------------------------------------------
# moe_scatter_add_rows_ and moe_experts
# ----------------------------------------------------------------------------------------------------------
@FUZZ
@example(t=3, k=2, n=2, h=2, dtype=torch.float32, weighted=True, fault="dup_token", seed=0)
@example(t=0, k=1, n=0, h=3, dtype=torch.bfloat16, weighted=False, fault=None, seed=0)
@given(
    st.integers(0, 20), st.integers(1, 4), st.integers(0, 20), st.integers(0, 9), st.sampled_from(FLOATS + [torch.int32]),
    st.booleans(), st.sampled_from([None] * 6 + ["dup_token", "slot_neg", "slot_size", "out_dtype", "out_width",
                                                 "weights_len", "slots_len"]),
    st.integers(0, 2**31 - 1),
)
def test_scatter_add_rows_fuzz(t, k, n, h, dtype, weighted, fault, seed):
    g = torch.Generator().manual_seed(seed)
    n = min(n, t)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = rand_float(g, (t, h), acc)
    rows = rand_float(g, (n, h), dtype)
    slots = torch.randperm(t, generator=g)[:n] * k + torch.randint(0, k, (n,), generator=g)
    weights = rand_float(g, (t * k,), acc) if weighted else None
    bad = [] if dtype in FLOATS else ["rows"]
    if fault == "dup_token" and n > 1:
        slots[1] = slots[0] // k * k + (slots[1] % k)
        bad.append("slots")
    elif fault in ("slot_neg", "slot_size") and n:
        slots[n - 1] = -1 if fault == "slot_neg" else t * k
        bad.append("slots")
    elif fault == "out_dtype":
        out = out.to(torch.float16)
        bad.append("out")
    elif fault == "out_width":
        out = torch.cat([out, out.new_zeros(t, 1)], 1)
        bad.append("out")
    elif fault == "weights_len" and weighted:
        weights = torch.cat([weights, weights.new_zeros(1)])
        bad.append("weights")
    elif fault == "slots_len":
        slots = torch.cat([slots, slots.new_zeros(1)])
        bad.append("slots")
    out_before = out.clone()
    accepted, _ = call_checked(lambda: moe_scatter_add_rows_(out, rows, slots, k, weights),
                               (out, rows, slots, weights), bad, written=(0,))
    if not accepted:
        return
    scale = weights[slots, None] if weighted else 1
    want = out_before.index_add(0, slots // k, rows.to(acc) * scale)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


@FUZZ
@example(t=1, ne=1, k=1, h=1, f=1, dtype=torch.float32, gated=True, fault=None, seed=0)
@example(t=0, ne=2, k=1, h=3, f=2, dtype=torch.float64, gated=False, fault=None, seed=0)
@given(
    st.integers(0, 16), st.integers(1, 5), st.integers(1, 3), st.integers(1, 8), st.integers(1, 6),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), st.booleans(),
    st.sampled_from([None] * 6 + ["offsets_past", "slot_dup", "gates_rows", "w2_out", "b1_experts"]),
    st.integers(0, 2**31 - 1),
)
def test_moe_experts_fuzz(t, ne, k, h, f, dtype, gated, fault, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(k, ne) if gated else 1
    x = rand_float(g, (t, h), dtype)
    ids = torch.stack([torch.randperm(ne, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.int64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gates = torch.rand(t, k, generator=g, dtype=acc) if gated else None
    w = [rand_float(g, s, dtype, 0.5) for s in ((ne, f, h), (ne, f), (ne, h, f), (ne, h))]
    offsets, slot = moe_sort(ids, ne)
    bad = []
    if fault == "offsets_past":
        offsets = offsets.clone()
        offsets[-1] = t * k + 1
        bad.append("expert_offsets")
    elif fault == "slot_dup" and t > 1 and k > 1:
        slot = slot.clone()
        a, b = int(offsets[0]), int(offsets[1])  # expert 0's rows; make two of them the same token
        if b - a > 1:
            slot[a + 1] = slot[a] // k * k + (slot[a + 1] % k)
            bad.append("slots")
    elif fault == "gates_rows" and gated:
        gates = torch.cat([gates, gates.new_zeros(1, k)])
        bad.append("gates")
    elif fault == "w2_out":
        w[2], w[3] = torch.cat([w[2], w[2][:, :1]], 1), torch.cat([w[3], w[3][:, :1]], 1)
        bad.append("w2")
    elif fault == "b1_experts":
        w[1] = w[1][:-1]
        bad.append("b1")
    accepted, y = call_checked(lambda: moe_experts(x, gates, slot, offsets, *w), (x, gates, slot, offsets, *w), bad)
    if not accepted:
        return
    assert y.shape == (t, h) and y.dtype == x.dtype
    if t == 0:
        return
    x_sorted = x.index_select(0, slot // k)
    y_sorted = ref.grouped_mlp(x_sorted, offsets, *w)
    want = ref.moe_combine(y_sorted, gates if gated else torch.ones(t, 1, dtype=acc), slot)
    torch.testing.assert_close(y, want, rtol=TOL[dtype] * 5, atol=TOL[dtype] * 5)
