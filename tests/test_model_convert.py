"""Show-o import on a fabricated tiny checkpoint in Show-o's key layout (huggingface.co/showlab/show-o)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unif2ace.model import UniF2aceModel
from unif2ace.model.convert import main

LAYERS, HIDDEN, HEAD_DIM, DENSE, TEXT_VOCAB, CODEBOOK, N_IMG = 2, 64, 16, 128, 100, 32, 16
VOCAB = TEXT_VOCAB + 10 + CODEBOOK + 1


def fabricate_showo(directory):
    g = torch.Generator().manual_seed(0)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {"showo.model.embed_tokens.weight": r(VOCAB, HIDDEN, s=1.0),
             "showo.model.final_layernorm.weight": 1 + r(HIDDEN), "showo.model.final_layernorm.bias": r(HIDDEN),
             "showo.lm_head.weight": r(VOCAB, HIDDEN), "showo.lm_head.bias": r(VOCAB)}
    for i in range(LAYERS):
        p = f"showo.model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + r(HIDDEN), p + "input_layernorm.bias": r(HIDDEN),
                      p + "mlp.fc1.weight": r(DENSE, HIDDEN), p + "mlp.fc1.bias": r(DENSE),
                      p + "mlp.fc2.weight": r(HIDDEN, DENSE), p + "mlp.fc2.bias": r(HIDDEN)})
        for n in ("q_proj", "k_proj", "v_proj", "dense"):
            state[p + f"self_attn.{n}.weight"] = r(HIDDEN, HIDDEN, s=0.2)
            state[p + f"self_attn.{n}.bias"] = r(HIDDEN)
        for n in ("q_layernorm", "k_layernorm"):
            state[p + f"self_attn.{n}.weight"] = 1 + r(HEAD_DIM)
            state[p + f"self_attn.{n}.bias"] = r(HEAD_DIM)
    directory.mkdir()
    save_file(state, str(directory / "pytorch_model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "_class_name": "Showo", "codebook_size": CODEBOOK, "llm_vocab_size": TEXT_VOCAB,
        "mask_token_id": VOCAB - 1, "num_vq_tokens": N_IMG, "vocab_size": VOCAB, "w_clip_vit": False}))
    return state


def phi_reference_logits(state, ids, allowed):
    """Show-o's dense Phi forward (Phi-1.5 with QK-LayerNorm), written out independently: one shared pre-LayerNorm,
    parallel attention + MLP, QK-LayerNorm before partial rotary (first half of each head), lm_head."""
    L = ids.shape[0]
    heads, rot = HIDDEN // HEAD_DIM, HEAD_DIM // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.arange(L).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):  # t [heads, L, HEAD_DIM]
        a, b = t[..., :rot], t[..., rot:]
        x1, x2 = a[..., : rot // 2], a[..., rot // 2:]
        return torch.cat([a * cos + torch.cat([-x2, x1], -1) * sin, b], -1)

    x = state["showo.model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"showo.model.layers.{i}."
        w = lambda n: (state[p + n + ".weight"], state[p + n + ".bias"])  # noqa: E731
        h = F.layer_norm(x, (HIDDEN,), *w("input_layernorm"))
        q, k, v = (F.linear(h, *w(f"self_attn.{n}")).view(L, heads, HEAD_DIM).transpose(0, 1)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q = rope(F.layer_norm(q, (HEAD_DIM,), *w("self_attn.q_layernorm")))
        k = rope(F.layer_norm(k, (HEAD_DIM,), *w("self_attn.k_layernorm")))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        att = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
        a = F.linear(att.transpose(0, 1).reshape(L, HIDDEN), *w("self_attn.dense"))
        m = F.linear(F.gelu(F.linear(h, *w("mlp.fc1")), approximate="tanh"), *w("mlp.fc2"))
        x = x + a + m
    final = (state["showo.model.final_layernorm.weight"], state["showo.model.final_layernorm.bias"])
    x = F.layer_norm(x, (HIDDEN,), *final)
    return F.linear(x, state["showo.lm_head.weight"], state["showo.lm_head.bias"])


def showo_mask(ids, pad, soi, eoi):
    """Show-o's t2i / mmu semantics on real tokens: causal, plus the image block (soi..eoi) bidirectional."""
    L = len(ids)
    inside, block = False, []
    for t in ids:
        inside = inside or t == soi
        block.append(inside)
        inside = inside and t != eoi
    return torch.tensor([[ids[k] != pad and (k <= q or (block[q] and block[k])) or (ids[q] == pad and k == q)
                          for k in range(L)] for q in range(L)])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("showo")
    state = fabricate_showo(root / "showo")
    main([str(root / "showo"), str(root / "out"), "--max-shard-size", "200KB"])
    return state, UniF2aceModel.from_pretrained(str(root / "out"))


def test_copied_tensors_are_bit_exact(converted):
    state, model = converted
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.rotary_dim, c.vocab_size, c.mask_token_id) == (
        LAYERS, HIDDEN, HIDDEN // HEAD_DIM, HEAD_DIM // 2, VOCAB, VOCAB - 1)
    ours = model.state_dict()
    pairs = {"embed_tokens.weight": "showo.model.embed_tokens.weight", "lm_head.weight": "showo.lm_head.weight",
             "lm_head.bias": "showo.lm_head.bias", "final_layernorm.weight": "showo.model.final_layernorm.weight"}
    for i in range(LAYERS):
        for n in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                  "self_attn.q_layernorm", "self_attn.k_layernorm"):
            for t in ("weight", "bias"):
                pairs[f"layers.{i}.{n}.{t}"] = f"showo.model.layers.{i}.{n}.{t}"
        for g in range(2):  # the shared experts are the dense MLP
            moe = model.layers[i].token_moe
            assert torch.equal(moe.shared_w1[g], state[f"showo.model.layers.{i}.mlp.fc1.weight"])
            assert torch.equal(moe.shared_w2[g], state[f"showo.model.layers.{i}.mlp.fc2.weight"])
            assert torch.equal(moe.shared_b2[g], state[f"showo.model.layers.{i}.mlp.fc2.bias"])
    for ours_name, theirs in pairs.items():
        assert torch.equal(ours[ours_name], state[theirs]), ours_name


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_converted_model_reproduces_dense_show_o(converted, backend):
    state, model = converted
    model = UniF2aceModel(model.config, backend=backend).eval()
    model.load_state_dict(converted[1].state_dict())
    c = model.config
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, CODEBOOK, (N_IMG,), generator=g).tolist()
    img = [c.soi_token_id] + [c.image_token_offset + v for v in codes] + [c.eoi_token_id]
    t2i = [c.pad_token_id] * 3 + [c.t2i_token_id, c.sot_token_id, 5, 6, 7, c.eot_token_id] + img
    t2i[-5] = c.mask_token_id
    mmu = [c.mmu_token_id] + img + [c.sot_token_id, 8, 9, 10] + [c.pad_token_id] * 3
    for ids, task in ((t2i, 1), (mmu, 0)):
        ids_t = torch.tensor([ids])
        real = ids_t != c.pad_token_id
        task_t = torch.tensor([task])
        with torch.no_grad():
            hidden, _, _ = model.transformer(ids_t, real, task_t, context_mask=model.context_mask(ids_t, real, task_t),
                                             embeddings=model.image_embeddings(1, ids_t.device))
            ours = model.lm_head(hidden[0])
            ref = phi_reference_logits(state, ids_t[0], showo_mask(ids, c.pad_token_id, c.soi_token_id,
                                                                  c.eoi_token_id))
        torch.testing.assert_close(ours[real[0]], ref[real[0]], rtol=1e-4, atol=1e-4)
