import pytest
import torch

from unif2ace.model import UniF2aceConfig, UniF2aceModel, build_batch, mask_image_tokens
from unif2ace.model.attention import KVCache

CFG = UniF2aceConfig.preset("tiny")
N, K = CFG.num_image_tokens, CFG.codebook_size


def make_batch(seed: int, n_und: int = 3, n_gen: int = 3, images: bool = False, **kw):
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, CFG.text_vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    und = [(torch.randint(0, K, (N,), generator=g), text(2 + i), text(3 + i)) for i in range(n_und)]
    gen = [(text(1 + 2 * i), torch.randint(0, K, (N,), generator=g)) for i in range(n_gen)]
    imgs = torch.rand(n_und + n_gen, 3, CFG.image_size, CFG.image_size, generator=g) * 2 - 1 if images else None
    return build_batch(CFG, understanding=und, generation=gen, generator=g, images=imgs, **kw)


def test_mask_image_tokens():
    codes = torch.randint(0, K, (64, N))
    ids, targets, gamma = mask_image_tokens(codes, CFG, generator=torch.Generator().manual_seed(0))
    masked = ids == CFG.mask_token_id
    assert masked.sum(-1).min() >= 1
    assert torch.equal(masked, targets != -100)
    assert torch.equal(targets[masked], codes[masked])
    assert torch.equal(ids[~masked], codes[~masked] + CFG.image_token_offset)
    assert ((gamma > 0) & (gamma <= 1)).all()
    assert torch.equal(masked.sum(-1), torch.round(N * gamma).long().clamp(1, N))


def test_batch_layout_and_caption_dropout():
    b = make_batch(0, caption_dropout=1.0)
    c = CFG
    assert b["task"].tolist() == [0, 0, 0, 1, 1, 1]
    assert (b["input_ids"][:3, 0] == c.mmu_token_id).all() and (b["input_ids"][3:, -1] == c.eoi_token_id).all()
    for row in b["input_ids"][3:]:  # empty captions: pads, <|t2i|> <|sot|> <|eot|> <|soi|>
        real = row[row != c.pad_token_id].tolist()
        assert real[:4] == [c.t2i_token_id, c.sot_token_id, c.eot_token_id, c.soi_token_id]
    assert (b["labels"][3:] == -100).all() and (b["image_targets"][:3] == -100).all()


@pytest.mark.parametrize("images", [False, True])
def test_backends_agree(images):
    kern = UniF2aceModel(CFG, backend="kernels")
    ref = UniF2aceModel(CFG, backend="reference")
    ref.load_state_dict(kern.state_dict())
    batch = make_batch(1, images=images)
    outs = []
    for m in (kern, ref):
        torch.manual_seed(0)  # the Noise expert draws from the global generator
        out = m(batch)
        out.loss.backward()
        # An unchosen expert may get a zero gradient from one backend and none from the other: compare as zeros.
        outs.append((out, {n: p.grad if p.grad is not None else torch.zeros_like(p)
                           for n, p in m.named_parameters() if p.requires_grad}))
    (ok, gk), (orf, gr) = outs
    torch.testing.assert_close(ok.loss, orf.loss, rtol=1e-5, atol=1e-5)
    for k in ok.parts:
        torch.testing.assert_close(ok.parts[k], orf.parts[k], rtol=1e-5, atol=1e-5)
    assert gk.keys() == gr.keys()
    for n in gk:
        torch.testing.assert_close(gk[n], gr[n], rtol=1e-4, atol=1e-5, msg=n)


def test_every_trainable_parameter_gets_a_gradient():
    # Every expert is chosen (top-k = all experts), so each one must receive a gradient from one mixed batch;
    # the routers still get theirs through the gates. (test_backends_agree covers the default top-k gradients.)
    model = UniF2aceModel(CFG.replace(moe_top_k=CFG.experts_per_group, seq_top_k=4))
    torch.manual_seed(0)
    model(make_batch(0, n_und=2, n_gen=2, images=True)).loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    frozen = [(n, p) for n, p in model.named_parameters() if n.startswith(("clip_encoder.", "face_encoder."))]
    assert frozen and all(not p.requires_grad and p.grad is None for _, p in frozen)


def test_overfits_a_handful_of_samples():
    torch.manual_seed(0)
    model = UniF2aceModel(CFG)
    batch = make_batch(2, n_und=2, n_gen=2)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        torch.manual_seed(0)
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or {k: v.item() for k, v in out.parts.items()}
    last = {k: v.item() for k, v in out.parts.items()}
    assert last["text"] < 0.2 * first["text"], (first, last)
    assert last["image"] < 0.5 * first["image"], (first, last)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = UniF2aceModel(CFG).eval()
    c = CFG
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (3, 6):  # prefixes of different lengths → left padding
        codes = torch.randint(0, K, (N,), generator=g).tolist()
        rows.append([c.mmu_token_id, c.soi_token_id] + [c.image_token_offset + v for v in codes]
                    + [c.eoi_token_id, c.sot_token_id] + torch.randint(0, 1000, (n,), generator=g).tolist())
    ids, real = model._pad_left(rows)
    B, P = ids.shape
    new = torch.randint(0, 1000, (B, 4), generator=g)
    task = torch.zeros(B, dtype=torch.long)
    emb = model.image_embeddings(B, ids.device, torch.rand(B, 3, c.image_size, c.image_size, generator=g))
    with torch.no_grad():
        cache = KVCache(c.num_layers)
        cached = [model.transformer(ids, real, task, context_mask=real, embeddings=emb, cache=cache)[0][:, -1]]
        for t in range(new.shape[1]):
            h, _, _ = model.transformer(new[:, t:t + 1], torch.ones(B, 1, dtype=torch.bool), task,
                                        context_mask=real, embeddings=emb, cache=cache)
            cached.append(h[:, -1])
        full_ids = torch.cat([ids, new], 1)
        full_real = torch.cat([real, torch.ones_like(new, dtype=torch.bool)], 1)
        context = torch.cat([real, torch.zeros_like(new, dtype=torch.bool)], 1)
        full, _, _ = model.transformer(full_ids, full_real, task, context_mask=context, embeddings=emb)
    weight, bias = model.text_head()
    for t in range(new.shape[1] + 1):
        torch.testing.assert_close(torch.nn.functional.linear(cached[t], weight, bias),
                                   torch.nn.functional.linear(full[:, P - 1 + t], weight, bias),
                                   rtol=1e-4, atol=1e-4)


def test_generate_text_greedy_matches_uncached_loop():
    torch.manual_seed(0)
    model = UniF2aceModel(CFG).eval()
    prompts = [[5, 6, 7], [9]]
    codes = torch.randint(0, K, (2, N))
    got = model.generate_text(prompts, max_new_tokens=6, temperature=0, image_codes=codes)
    c = CFG
    for b in range(2):
        seq = ([c.mmu_token_id, c.soi_token_id] + (codes[b] + c.image_token_offset).tolist()
               + [c.eoi_token_id, c.sot_token_id] + prompts[b])
        P = len(seq)
        out = []
        for _ in range(6):
            ids = torch.tensor([seq])
            real = torch.ones_like(ids, dtype=torch.bool)
            context = torch.arange(len(seq))[None] < P
            emb = model.image_embeddings(1, ids.device)
            with torch.no_grad():
                h, _, _ = model.transformer(ids, real, torch.zeros(1, dtype=torch.long), context_mask=context,
                                            embeddings=emb)
            w, bias = model.text_head()
            tok = int(torch.nn.functional.linear(h[0, -1], w, bias).argmax())
            if tok == c.eot_token_id:
                break
            out.append(tok)
            seq.append(tok)
        assert got[b] == out


def test_generate_text_stops_at_eot_and_is_reproducible():
    torch.manual_seed(0)
    model = UniF2aceModel(CFG)
    prompts = torch.randint(0, 1000, (3, 5))
    a = model.generate_text(prompts, max_new_tokens=5, seed=7, top_k=20)
    assert a == model.generate_text(prompts, max_new_tokens=5, seed=7, top_k=20)
    assert all(len(r) == 5 and all(0 <= t < CFG.image_token_offset for t in r) for r in a)
    with torch.no_grad():
        model.lm_head.bias[CFG.eot_token_id] = 100.0
    assert model.generate_text(prompts, max_new_tokens=5, seed=7) == [[], [], []]


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_generate_images(guidance):
    torch.manual_seed(0)
    model = UniF2aceModel(CFG)
    prompts = [[1, 2, 3], [4], []]
    a = model.generate_images(prompts, steps=4, guidance_scale=guidance, seed=3)
    assert a.shape == (3, N) and a.dtype == torch.long
    assert ((a >= 0) & (a < K)).all()
    assert torch.equal(a, model.generate_images(prompts, steps=4, guidance_scale=guidance, seed=3))
    assert not torch.equal(a, model.generate_images(prompts, steps=4, guidance_scale=guidance, seed=4))


def test_generation_backends_agree():
    torch.manual_seed(0)
    kern = UniF2aceModel(CFG)
    ref = UniF2aceModel(CFG, backend="reference")
    ref.load_state_dict(kern.state_dict())
    prompts = [[1, 2, 3], [4]]
    kw = dict(steps=3, guidance_scale=1.5, seed=5)
    assert torch.equal(kern.generate_images(prompts, **kw), ref.generate_images(prompts, **kw))
    codes = torch.randint(0, K, (2, N))
    kw = dict(max_new_tokens=4, top_k=50, top_p=0.9, seed=5, image_codes=codes)
    assert kern.generate_text(prompts, **kw) == ref.generate_text(prompts, **kw)
