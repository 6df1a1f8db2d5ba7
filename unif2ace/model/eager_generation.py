"""The straightforward generation loops: the baseline of benchmarks/bench_generate.py and the reference of the
generation tests.

They compute what UniF2aceModel.generate_text / generate_images compute, the plain way: text decoding grows its
KV cache by concatenation every step (KVCache) and asks the host after every token whether all rows have finished;
image generation casts every step's logits to fp32 and runs each forward eagerly; both use SDPA with the dense
omni-attention mask. Same seed, same tokens as the
model's methods (the tests check it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unif2ace import ops
from unif2ace.model.attention import KVCache, omni_attention_mask
from unif2ace.model.batch import generation_prefix


@torch.no_grad()
def generate_text_eager(model, prefix_ids, *, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, seed: int = 0, image_codes: Optional[Tensor] = None,
                        images: Optional[Tensor] = None, embeddings: Optional[dict] = None) -> list[list[int]]:
    """model.generate_text with a growing cache and one host check per token."""
    c = model.config
    ids, real = model._pad_left(model._text_rows(prefix_ids, image_codes))
    B, P = ids.shape
    device = ids.device
    task = torch.zeros(B, dtype=torch.long, device=device)
    emb = model.image_embeddings(B, device, images, embeddings)
    cache = KVCache(len(model.layers))
    with model._eval_mode():
        mask = omni_attention_mask(ids, real, c.soi_token_id, c.eoi_token_id)
        hidden, _, _ = model.transformer(ids, real, task, context_mask=real, embeddings=emb, attn_mask=mask,
                                         cache=cache)
        weight, bias = model.text_head()
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            logits = F.linear(hidden[:, -1], weight, bias).float()
            token = model._sample_next_token(logits, temperature, top_k, top_p, seed, step)
            token = torch.where(done, torch.full_like(token, c.pad_token_id), token)
            out.append(token)
            done = done | (token == c.eot_token_id)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            hidden, _, _ = model.transformer(token[:, None], torch.ones_like(token[:, None], dtype=torch.bool),
                                             task, context_mask=real, embeddings=emb, cache=cache)
    tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    return [row[:row.index(c.eot_token_id)] if c.eot_token_id in row else row for row in tokens]


@torch.no_grad()
def generate_images_eager(model, prompt_ids: Sequence[Sequence[int]], *, steps: int = 18,
                          guidance_scale: float = 0.0, temperature: float = 1.0, choice_temperature: float = 1.0,
                          seed: int = 0, init_codes: Optional[Tensor] = None) -> Tensor:
    """model.generate_images with eager forwards and fp32 logits."""
    c = model.config
    B, N, K = len(prompt_ids), c.num_image_tokens, c.codebook_size
    prefixes = [generation_prefix(c, p) for p in prompt_ids]
    if guidance_scale > 0:
        prefixes += [generation_prefix(c, [])] * B
    prefix_ids, prefix_real = model._pad_left([p + [c.soi_token_id] for p in prefixes])
    rows, P = prefix_ids.shape
    device = prefix_ids.device
    tail = torch.full((rows, N + 1), c.mask_token_id, device=device)
    tail[:, -1] = c.eoi_token_id
    input_ids = torch.cat([prefix_ids, tail], dim=1)
    padding_mask = torch.cat([prefix_real, torch.ones_like(tail, dtype=torch.bool)], dim=1)
    task = torch.ones(rows, dtype=torch.long, device=device)
    attn_mask = omni_attention_mask(input_ids, padding_mask, c.soi_token_id, c.eoi_token_id)
    context = model.context_mask(input_ids, padding_mask, task)
    embeddings = model.image_embeddings(rows, device)
    weight, bias = model.image_head()

    def logits_fn(tokens: Tensor):
        img = torch.where(tokens == K, c.mask_token_id, tokens + c.image_token_offset)
        ids = input_ids.clone()
        ids[:, P:P + N] = img.repeat(rows // B, 1)
        hidden, _, _ = model.transformer(ids, padding_mask, task, context_mask=context, embeddings=embeddings,
                                         attn_mask=attn_mask)
        logits = F.linear(hidden[:, P:P + N], weight, bias).float()
        return logits.chunk(2) if guidance_scale > 0 else logits

    if init_codes is None:
        init_codes = torch.full((B, N), K, dtype=torch.long, device=device)
    with model._eval_mode():
        return ops.maskgit_generate(
            logits_fn, B, N, K, num_steps=steps, mask_id=K, seed=seed, init_tokens=init_codes.to(device),
            guidance_scale=guidance_scale, temperature=temperature, choice_temperature=choice_temperature,
            schedule=c.schedule, backend=c.backend,
        )
