"""Generation paths: the static-cache decoder and the MaskGIT loop against the plain loops (eager_generation), the
block mask of flex_attention against the dense omni-attention mask, and the CUDA-graph paths on a GPU."""
import os

import pytest
import torch
import torch.nn.functional as F

from unif2ace.model import UniF2aceConfig, UniF2aceModel
from unif2ace.model.attention import StaticKVCache, image_block_ids, omni_attention_mask, omni_mask_mod
from unif2ace.model.eager_generation import generate_images_eager, generate_text_eager

CFG = UniF2aceConfig.preset("tiny")
N, K = CFG.num_image_tokens, CFG.codebook_size
# The model-level CUDA tests exercise torch's code (graphs, compiled flex_attention), not this project's kernels:
# they are left out of the compute-sanitizer pass (UNIF2ACE_SMALL=1), where they would take minutes.
not_under_sanitizer = pytest.mark.skipif(os.environ.get("UNIF2ACE_SMALL") == "1",
                                         reason="model-level CUDA test, not run under compute-sanitizer")


def ragged_prompts(seed: int, lengths=(1, 6, 3)):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]
    codes = torch.randint(0, K, (len(lengths), N), generator=g)
    return prompts, codes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast on an idle machine and much faster on a busy one. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniF2aceModel(CFG)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(top_k=20, seed=3),
                                      dict(temperature=0.7, top_p=0.9, seed=4), dict(seed=5)])
def test_generate_text_matches_the_plain_loop(model, sampling):
    prompts, codes = ragged_prompts(1)
    got = model.generate_text(prompts, max_new_tokens=7, image_codes=codes, **sampling)
    assert got == generate_text_eager(model, prompts, max_new_tokens=7, image_codes=codes, **sampling)
    assert [len(r) for r in got] == [7, 7, 7]


def test_generate_text_reference_backend_matches_the_plain_loop(model):
    ref = UniF2aceModel(CFG, backend="reference")
    ref.load_state_dict(model.state_dict())
    prompts, codes = ragged_prompts(2, (4, 2))
    kw = dict(max_new_tokens=5, top_k=30, seed=9, image_codes=codes)
    assert ref.generate_text(prompts, **kw) == generate_text_eager(ref, prompts, **kw)


def test_generate_text_rows_finishing_at_different_steps(model):
    # A large <|eot|> bias makes rows stop after a few tokens each, at different steps; the host checks every
    # eot_check_every steps, which must not change the result.
    prompts, codes = ragged_prompts(3, (2, 5, 1, 4))
    kw = dict(max_new_tokens=16, seed=14, image_codes=codes)
    saved = float(model.lm_head.bias.detach()[CFG.eot_token_id])
    with torch.no_grad():
        model.lm_head.bias[CFG.eot_token_id] = 5.0
    try:
        want = generate_text_eager(model, prompts, **kw)
        assert len({len(r) for r in want}) == 4 and max(len(r) for r in want) < 15, want  # all stop, at 4 steps
        for every in (1, 3, 100):
            assert model.generate_text(prompts, eot_check_every=every, **kw) == want
    finally:
        with torch.no_grad():
            model.lm_head.bias[CFG.eot_token_id] = saved


def test_generate_text_edge_cases(model):
    prompts, codes = ragged_prompts(4, (3,))
    assert model.generate_text(prompts, max_new_tokens=0, image_codes=codes) == [[]]
    one = model.generate_text(prompts, max_new_tokens=1, image_codes=codes, seed=2)
    assert one == generate_text_eager(model, prompts, max_new_tokens=1, image_codes=codes, seed=2)
    with pytest.raises(ValueError, match="eot_check_every"):
        model.generate_text(prompts, max_new_tokens=2, eot_check_every=0)
    with pytest.raises(ValueError, match="positions"):
        model.generate_text(prompts, max_new_tokens=CFG.max_position_embeddings)


def test_static_cache_decoding_matches_the_full_forward(model):
    """Hidden states of prefill + decode steps through the StaticKVCache against one forward over the whole
    sequence, for left-padded rows of different lengths (the device-side position and the key masks)."""
    c = CFG
    prompts, codes = ragged_prompts(5, (3, 7))
    ids, real = model._pad_left(model._text_rows(prompts, codes))
    B, P = ids.shape
    new = torch.randint(0, 1000, (B, 4), generator=torch.Generator().manual_seed(6))
    task = torch.zeros(B, dtype=torch.long)
    emb = model.image_embeddings(B, ids.device, torch.rand(B, 3, c.image_size, c.image_size))
    model.eval()
    with torch.no_grad():
        cache = StaticKVCache(c.num_layers, B, P + new.shape[1] + 2, ids.device)  # 2 slots never written
        steps = [model.transformer(ids, real, task, context_mask=real, embeddings=emb, cache=cache)[0][:, -1]]
        for t in range(new.shape[1]):
            h, _, _ = model.transformer(new[:, t:t + 1], torch.ones(B, 1, dtype=torch.bool), task,
                                        context_mask=real, embeddings=emb, cache=cache)
            steps.append(h[:, -1])
        assert int(cache.position) == P + new.shape[1]
        full_ids = torch.cat([ids, new], 1)
        full_real = torch.cat([real, torch.ones_like(new, dtype=torch.bool)], 1)
        context = torch.cat([real, torch.zeros_like(new, dtype=torch.bool)], 1)
        full, _, _ = model.transformer(full_ids, full_real, task, context_mask=context, embeddings=emb)
    model.train()
    for t, h in enumerate(steps):
        torch.testing.assert_close(h, full[:, P - 1 + t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_generate_images_matches_the_plain_loop(model, guidance):
    prompts = [[1, 2, 3], [4], [], [5, 6, 7, 8, 9]]
    kw = dict(steps=4, guidance_scale=guidance, seed=3, temperature=0.9, choice_temperature=2.0)
    assert torch.equal(model.generate_images(prompts, **kw), generate_images_eager(model, prompts, **kw))
    init = torch.full((4, N), K)
    init[:, :5] = torch.arange(5)
    kw["init_codes"] = init
    got = model.generate_images(prompts, **kw)
    assert torch.equal(got, generate_images_eager(model, prompts, **kw))
    assert torch.equal(got[:, :5], init[:, :5])


def _stub_token_moe(model):
    """Replaces the token MoE by a data-independent stand-in: in fp32 the MoE layer's expert products read their
    offsets on the host (torch._grouped_mm's device-driven kernel is bf16 on sm90/sm100 only), and these tests are
    about everything around it."""
    for block in model.layers:
        block.token_moe.forward = lambda h, task, mask=None: (h * 0.5, h.new_zeros((), dtype=torch.float32))


def test_decode_step_and_maskgit_forward_read_nothing_on_the_host():
    """The decode step and the MaskGIT forward on meta tensors: any data-dependent host read (.item(), .tolist(),
    a branch on a value) fails there — a CPU proxy of 'no host sync, capturable as a CUDA graph'."""
    with torch.device("meta"):
        model = UniF2aceModel(CFG).eval()
    _stub_token_moe(model)
    B, P, dev = 3, 20, torch.device("meta")
    ids = torch.zeros(B, P, dtype=torch.long, device=dev)
    real = torch.ones(B, P, dtype=torch.bool, device=dev)
    task = torch.zeros(B, dtype=torch.long, device=dev)
    emb = model.image_embeddings(B, dev)
    cache = StaticKVCache(CFG.num_layers, B, P + 4, dev)
    with torch.no_grad():
        model.transformer(ids, real, task, context_mask=real, embeddings=emb, cache=cache)
        h, _, _ = model.transformer(ids[:, :1], real[:, :1], task, context_mask=real, embeddings=emb, cache=cache)
        weight, bias = model.text_head()
        assert F.linear(h[:, -1], weight, bias).shape == (B, CFG.image_token_offset)
        gen_ids = torch.zeros(2 * B, P + N + 1, dtype=torch.long, device=dev)
        gen_real = torch.ones_like(gen_ids, dtype=torch.bool)
        gen_task = torch.ones(2 * B, dtype=torch.long, device=dev)
        h, _, _ = model.transformer(gen_ids, gen_real, gen_task, context_mask=gen_real,
                                    embeddings=model.image_embeddings(2 * B, dev))
        assert h.shape == (2 * B, P + N + 1, CFG.hidden_size)


# ----------------------------------------------------------------------------------------------------------
# flex_attention block mask
# ----------------------------------------------------------------------------------------------------------
def _mixed_layout():
    """Understanding rows (right-padded) and generation rows (left-padded) of one training batch."""
    from unif2ace.model import build_batch

    g = torch.Generator().manual_seed(7)
    text = lambda n: torch.randint(0, CFG.text_vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    und = [(torch.randint(0, K, (N,), generator=g), text(2 + 3 * i), text(1 + i)) for i in range(3)]
    gen = [(text(5 * i), torch.randint(0, K, (N,), generator=g)) for i in range(3)]
    return build_batch(CFG, understanding=und, generation=gen, generator=g)


def test_flex_availability_check_passes_where_flex_runs():
    from unif2ace.model.attention import flex_available

    assert flex_available(torch.device("cpu"), backward=False)  # the CPU's eager flex_attention, forward only


def test_block_mask_rule_equals_the_dense_mask():
    batch = _mixed_layout()
    ids, real = batch["input_ids"], batch["padding_mask"]
    B, L = ids.shape
    mod = omni_mask_mod(image_block_ids(ids, CFG.soi_token_id, CFG.eoi_token_id), real)
    b, q, kv = torch.meshgrid(torch.arange(B), torch.arange(L), torch.arange(L), indexing="ij")
    dense = mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(dense, omni_attention_mask(ids, real, CFG.soi_token_id, CFG.eoi_token_id)[:, 0])


def _flex_and_sdpa_models(device="cpu"):
    torch.manual_seed(0)
    sdpa = UniF2aceModel(CFG.replace(attention="sdpa")).to(device)
    flex = UniF2aceModel(CFG.replace(attention="flex")).to(device)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def test_flex_attention_matches_sdpa_on_the_model_masks():
    """The model's loss with flex_attention and the block mask against SDPA with the dense mask, and MaskGIT
    generation, on the CPU's eager flex_attention (which has no backward on the CPU: gradients are a CUDA test)."""
    sdpa, flex = _flex_and_sdpa_models()
    batch = _mixed_layout()
    losses = []
    for m in (sdpa, flex):
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(m(batch).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    prompts = [[1, 2, 3], [4]]
    kw = dict(steps=3, guidance_scale=2.0, seed=5)
    assert torch.equal(flex.generate_images(prompts, **kw), sdpa.generate_images(prompts, **kw))


@pytest.mark.cuda
@not_under_sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flex_attention_matches_sdpa_with_gradients(dtype):
    sdpa, flex = _flex_and_sdpa_models("cuda")
    batch = _mixed_layout()
    out = []
    for m in (sdpa, flex):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            o = m(batch)
        o.loss.backward()
        out.append((o.loss.detach(), m.layers[0].self_attn.q_proj.weight.grad))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[1][0], out[0][0], **tol)
    torch.testing.assert_close(out[1][1], out[0][1], **tol)


# ----------------------------------------------------------------------------------------------------------
# CUDA: graphs against eager, the same tokens
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@not_under_sanitizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_same_tokens(dtype):
    torch.manual_seed(0)
    model = UniF2aceModel(CFG).to("cuda", dtype)
    prompts, codes = ragged_prompts(8, (2, 9, 4))
    for kw in (dict(temperature=0.0), dict(top_k=40, top_p=0.95, seed=2)):
        a = model.generate_text(prompts, max_new_tokens=10, image_codes=codes, cuda_graphs=True, **kw)
        b = model.generate_text(prompts, max_new_tokens=10, image_codes=codes, cuda_graphs=False, **kw)
        assert a == b
    kw = dict(steps=5, guidance_scale=3.0, seed=4)
    a = model.generate_images([[1, 2], [3, 4, 5, 6]], cuda_graphs=True, **kw)
    assert torch.equal(a, model.generate_images([[1, 2], [3, 4, 5, 6]], cuda_graphs=False, **kw))


def _assert_graphs_captured_and_replayed(model):
    """Both generation steps are recorded as CUDA graphs (a fallback warning fails) and replay to the tokens of the
    uncaptured path."""
    import warnings

    prompts, codes = ragged_prompts(10, (3, 8))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not captured as a CUDA graph.*")
        kw = dict(max_new_tokens=12, image_codes=codes, seed=3, top_k=30)
        assert model.generate_text(prompts, **kw) == model.generate_text(prompts, cuda_graphs=False, **kw)
        kw = dict(steps=6, guidance_scale=2.0, seed=7)
        assert torch.equal(model.generate_images(prompts, **kw), model.generate_images(prompts, cuda_graphs=False, **kw))


@pytest.mark.cuda
@not_under_sanitizer
def test_cuda_graphs_are_captured_and_replayed_when_the_moe_is_sync_free():
    """With a data-independent stand-in for the token MoE (in fp32 the MoE layer reads its expert offsets on the
    host), both steps must be recorded as CUDA graphs — no fallback warning — and replay to the same tokens."""
    torch.manual_seed(0)
    model = UniF2aceModel(CFG).cuda()
    _stub_token_moe(model)
    _assert_graphs_captured_and_replayed(model)


@pytest.mark.cuda
@not_under_sanitizer
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)),
                    reason="the token MoE is sync-free where torch._grouped_mm's bf16 kernel runs (sm90/sm100)")
def test_cuda_graphs_are_captured_with_the_real_token_moe_in_bf16():
    """The real token MoE in bf16 reads nothing on the host (grouped expert products over device offsets), so both
    generation steps are recorded as CUDA graphs — no fallback warning — and replay to the same tokens. (In fp32 its
    expert products fall back to a loop over host offsets: the stand-in test above covers that case.)"""
    torch.manual_seed(0)
    model = UniF2aceModel(CFG).cuda().to(torch.bfloat16).eval()
    _assert_graphs_captured_and_replayed(model)


@pytest.mark.cuda
@not_under_sanitizer
def test_cuda_matches_the_plain_loops_with_sdpa():
    torch.manual_seed(0)
    model = UniF2aceModel(CFG.replace(attention="sdpa")).cuda()
    prompts, codes = ragged_prompts(9, (5, 1))
    kw = dict(max_new_tokens=8, image_codes=codes, seed=6, top_k=50)
    assert model.generate_text(prompts, **kw) == generate_text_eager(model, prompts, **kw)
    kw = dict(steps=4, guidance_scale=2.0, seed=1)
    assert torch.equal(model.generate_images(prompts, **kw), generate_images_eager(model, prompts, **kw))


@pytest.mark.cuda
@not_under_sanitizer
def test_cuda_graph_recording_of_a_syncing_step_falls_back():
    from unif2ace.model.graphs import GraphedCall

    x = torch.arange(4.0, device="cuda")
    call = GraphedCall(lambda: x * float(x.sum().item()), enabled=True, name="syncing step")
    with pytest.warns(UserWarning, match="not captured"):
        first = call()
    assert not call.captured and torch.equal(call(), first)
    y = torch.zeros(3, device="cuda")
    step = GraphedCall(lambda: y + 1, enabled=True, name="pure step")
    assert torch.equal(step(), torch.ones(3, device="cuda")) and step.captured
    y.fill_(5)
    assert torch.equal(step(), torch.full((3,), 6.0, device="cuda"))
