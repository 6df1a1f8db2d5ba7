"""The assembled UniF2ace model: embeddings → N blocks → final LayerNorm → one output head.

Block (a Phi-1.5 block whose dense MLP is the grouped token MoE, followed by the grouped sequence MoE):

    h  = LN_in(x)
    x  = x + Attn(h) + TokenMoE(h, group)               Phi's parallel residual: both branches read one LayerNorm
    h2 = LN_seq(x)
    x  = x + (SeqMoE(h2, group) − h2)                   config.seq_moe_residual = "delta" (default)
       | x + SeqMoE(h2, group)                          config.seq_moe_residual = "add"

The sequence MoE returns a gated mixture of expert outputs that already contains the identity (Copy(h2) = h2), so
adding it to the stream as it is would add h2 again for every Copy choice. With "delta" the stream receives only
what the chosen experts change: Copy experts leave the block exactly the dense Phi-style block, Zero removes the
normalised stream (−h2), and CLIP/Face/Noise experts add (1 − w)·(S(f) − h2). A block whose sequence router picks
Copy therefore starts as, and can always fall back to, the plain transformer block.

Routing: the group of a sequence is its task (0 = understanding, 1 = generation) for both MoEs. The sequence
router pools over the sequence's *context* tokens only: for understanding rows the tokens before the first
supervised answer token (task token, image block, prompt), for generation rows the text before the image block
(task token, caption). So the router never sees the answer it helps to predict (no leakage through the pooled
gate), generation routing stays fixed across MaskGIT steps, and incremental decoding with a KV cache reproduces
the full forward exactly (the context is the prompt, known at prefill).

Heads: one output Linear over the whole vocabulary (Show-o's lm_head, with bias). The text head is its first
image_token_offset rows (text + special tokens); the generation head is the K image-code rows
weight[offset : offset + K]. The losses pass these row slices to the fused `linear_d3diff_loss`, so neither the
text nor the image logits are ever materialised in full during training (backend="kernels").
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unif2ace import ops
from unif2ace.model import checkpoint
from unif2ace.model.attention import (Attention, StaticKVCache, flex_available, omni_attention_mask,
                                      omni_block_mask)
from unif2ace.model.graphs import GraphedCall
from unif2ace.model.batch import IGNORE_INDEX, generation_prefix
from unif2ace.model.config import UniF2aceConfig
from unif2ace.model.encoders import BuiltinImageEncoder, freeze
from unif2ace.nn.moe import GroupedSequenceMoE, GroupedTokenMoE
from unif2ace.ops import reference

ENCODER_PREFIXES = ("clip_encoder.", "face_encoder.")
_CLIP_SEED, _FACE_SEED = 1001, 1002
MIX_LOGIT_INIT = 3.0  # initial logit of w (the input's share) in the mixing sequence experts


@dataclass
class ModelOutput:
    loss: Tensor
    parts: dict = field(default_factory=dict)  # unweighted terms: text, image, token_balance, seq_balance


class Block(nn.Module):
    def __init__(self, config: UniF2aceConfig):
        super().__init__()
        c = config
        self.seq_moe_residual = c.seq_moe_residual
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.rotary_dim, c.rope_theta, c.qk_layernorm,
                                   c.layer_norm_eps, c.backend)
        self.token_moe = GroupedTokenMoE(
            c.hidden_size, c.expert_hidden_size, num_groups=c.num_expert_groups,
            experts_per_group=c.experts_per_group, top_k=c.moe_top_k, shared_expert=True,
            shared_hidden_size=c.shared_hidden_size, renormalize=c.moe_renormalize, activation=c.moe_activation,
            recompute=c.moe_recompute, backend=c.backend,
        )
        self.seq_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.seq_moe = GroupedSequenceMoE(
            c.hidden_size, groups=c.seq_experts, top_k=c.seq_top_k,
            embedding_dims={"clip": c.clip_embed_dim, "face": c.face_embed_dim}, noise_dim=c.noise_dim,
            resampler_hidden=c.resampler_hidden_size, backend=c.backend,
        )

    def forward(self, x: Tensor, positions: Tensor, attn_mask, padding_mask: Tensor, task: Tensor,
                context_mask: Tensor, embeddings: dict, cache=None, layer: int = 0
                ) -> tuple[Tensor, Tensor, Tensor]:
        h = self.input_layernorm(x)
        moe_out, token_balance = self.token_moe(h, task, padding_mask)  # pads stay out of the balance statistics
        x = x + self.self_attn(h, positions, attn_mask, cache, layer) + moe_out
        h2 = self.seq_layernorm(x)
        if cache is not None and cache.seq_context[layer] is not None:
            # Decoding: route on the cached context exactly as at prefill; the new tokens are not context.
            ctx = cache.seq_context[layer]
            both = torch.cat([ctx, h2], dim=1)
            both_mask = torch.cat([context_mask, context_mask.new_zeros(h2.shape[:2])], dim=1)
            seq_out, seq_balance = self.seq_moe(both, task, both_mask, embeddings)
            seq_out = seq_out[:, ctx.shape[1]:]
        else:
            seq_out, seq_balance = self.seq_moe(h2, task, context_mask, embeddings)
            if cache is not None:
                cache.seq_context[layer] = h2
        x = x + (seq_out - h2) if self.seq_moe_residual == "delta" else x + seq_out
        return x, token_balance, seq_balance


class UniF2aceModel(nn.Module):
    def __init__(self, config: UniF2aceConfig, *, clip_encoder: Optional[nn.Module] = None,
                 face_encoder: Optional[nn.Module] = None, backend: Optional[str] = None):
        super().__init__()
        if backend is not None:
            config = config.replace(backend=backend)
        config = config.replace(clip_encoder="builtin" if clip_encoder is None else "external",
                                face_encoder="builtin" if face_encoder is None else "external")
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c) for _ in range(c.num_layers)])
        self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size)
        self.clip_encoder = freeze(clip_encoder or BuiltinImageEncoder(c.clip_embed_dim, seed=_CLIP_SEED))
        self.face_encoder = freeze(face_encoder or BuiltinImageEncoder(c.face_embed_dim, seed=_FACE_SEED))
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Phi/GPT-style init of the modules this file owns (normal(0, 0.02) weights, zero biases, unit norms).
        The MoE layers keep their own initialisation, except that the mixing experts (CLIP/Face/Noise:
        w·x + (1 − w)·S(f)) start leaning towards their input, w = σ(3) ≈ 0.95, so with the "delta" residual a
        block starts close to the dense block whatever the sequence router picks (Zero aside)."""
        std = self.config.initializer_range
        if self.embed_tokens.weight.is_meta:
            return
        nn.init.normal_(self.embed_tokens.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        nn.init.zeros_(self.lm_head.bias)
        for block in self.layers:
            for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj,
                        block.self_attn.dense):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            for logits in block.seq_moe.mix_logits.values():
                logits.copy_(torch.tensor([MIX_LOGIT_INIT, 0.0]))

    # ------------------------------------------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer should see: everything except the frozen encoders."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        """Parameters of the model proper (the frozen encoders are not counted)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(ENCODER_PREFIXES))

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """The state dict without the frozen encoders (they are not saved: built-in ones are rebuilt from their
        seed, external ones belong to the user)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}

    def text_head(self) -> tuple[Tensor, Tensor]:
        off = self.config.image_token_offset
        return self.lm_head.weight[:off], self.lm_head.bias[:off]

    def image_head(self) -> tuple[Tensor, Tensor]:
        off, K = self.config.image_token_offset, self.config.codebook_size
        return self.lm_head.weight[off:off + K], self.lm_head.bias[off:off + K]

    # ------------------------------------------------------------------------------------------------------
    # Forward pieces
    # ------------------------------------------------------------------------------------------------------
    def image_embeddings(self, batch_size: int, device: torch.device, images: Optional[Tensor] = None,
                         embeddings: Optional[dict] = None) -> dict[str, Tensor]:
        """{"clip": [B, Dc], "face": [B, Df]} for the sequence MoE: given embeddings, else the frozen encoders on
        `images`, else zeros (rows without an image, e.g. text-to-image generation: their experts only see the
        resampler's response to a zero embedding)."""
        c = self.config
        dims = {"clip": c.clip_embed_dim, "face": c.face_embed_dim}
        out = dict(embeddings) if embeddings is not None else {}
        encoders = {"clip": self.clip_encoder, "face": self.face_encoder}
        dtype = self.embed_tokens.weight.dtype
        for name, dim in dims.items():
            if name in out:
                continue
            if images is not None:
                weight = next(encoders[name].parameters(), None)
                with torch.no_grad():
                    pixels = images.to(device=device, dtype=weight.dtype if weight is not None else images.dtype)
                    out[name] = encoders[name](pixels).to(dtype)
            else:
                out[name] = torch.zeros(batch_size, dim, device=device, dtype=dtype)
        return out

    def context_mask(self, input_ids: Tensor, padding_mask: Tensor, task: Tensor,
                     labels: Optional[Tensor] = None) -> Tensor:
        """[B, L] bool: the tokens the sequence router pools over (see the module docstring). Understanding rows:
        real tokens before the first supervised label (all real tokens when there are no labels); generation
        rows: real tokens before the first <|soi|>."""
        c = self.config
        real = padding_mask.bool()
        if labels is not None:
            before_answer = (labels != IGNORE_INDEX).long().cumsum(-1) == 0
        else:
            before_answer = torch.ones_like(real)
        before_image = (input_ids == c.soi_token_id).long().cumsum(-1) == 0
        ctx = real & torch.where((task == 1)[:, None], before_image, before_answer)
        return torch.where(ctx.any(-1, keepdim=True), ctx, real)  # never an empty pool

    def uses_flex_attention(self, device: torch.device) -> bool:
        """Whether full-sequence forwards on `device` run flex_attention with a block mask (config.attention)."""
        c = self.config
        if c.backend == "reference" or c.attention == "sdpa":
            return False
        if c.attention == "flex":
            return True
        return device.type == "cuda" and flex_available(device, backward=torch.is_grad_enabled())

    def attention_mask(self, input_ids: Tensor, padding_mask: Tensor):
        """The omni-attention mask of a batch in the form the attention kernel takes: a flex_attention BlockMask
        (see uses_flex_attention) or the dense boolean [B, 1, L, L] mask."""
        c = self.config
        if self.uses_flex_attention(input_ids.device):
            return omni_block_mask(input_ids, padding_mask, c.soi_token_id, c.eoi_token_id)
        return omni_attention_mask(input_ids, padding_mask, c.soi_token_id, c.eoi_token_id)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """In training, recompute each block's activations in the backward instead of keeping them (one more forward
        per step for activation memory of one block instead of all of them)."""
        self.activation_checkpointing = bool(enabled)

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every transformer block in place (the blocks share their code, so one compilation serves
        all of them); `compile_kwargs` go to torch.compile. Inductor is set to draw random numbers with torch's own
        generator (`fallback_random`), so the Noise expert draws the same noise compiled or not: compiling changes
        the step's speed, not what it computes."""
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        for block in self.layers:
            block.compile(**compile_kwargs)

    def transformer(self, input_ids: Tensor, padding_mask: Tensor, task: Tensor, *, context_mask: Tensor,
                    embeddings: dict, attn_mask=None, cache=None) -> tuple[Tensor, Tensor, Tensor]:
        """Final hidden states [B, L, H] (after the final LayerNorm) and the mean token / sequence balance losses
        over the layers. `attn_mask`: a precomputed attention_mask(input_ids, padding_mask), else built here.

        With a cache (KVCache or StaticKVCache) the first call is the prefill (a normal forward that fills the
        cache); after it, input_ids are new text tokens appended after the cached ones (causal, all real) and
        `context_mask` is still the prefill's. With a StaticKVCache those calls read no host value: positions come
        from the cache's device-side counter."""
        B, L = input_ids.shape
        device = input_ids.device
        padding_mask = padding_mask.bool()
        static = isinstance(cache, StaticKVCache)
        decoding = cache is not None and (cache.prefill_length > 0 if static else cache.length > 0)
        if decoding and static:
            positions = cache.position + torch.arange(L, device=device)
            cache.key_padding_mask.index_copy_(1, positions, padding_mask)
            key_pos = torch.arange(cache.max_length, device=device)
            attn_mask = (cache.key_padding_mask[:, None, None, :]
                         & (key_pos[None, None, None, :] <= positions[None, None, :, None]))
        elif decoding:
            start = cache.length
            positions = torch.arange(start, start + L, device=device)
            key_mask = torch.cat([cache.key_padding_mask, padding_mask], dim=1)  # [B, T]
            key_pos = torch.arange(start + L, device=device)
            attn_mask = key_mask[:, None, None, :] & (key_pos[None, None, None, :] <= positions[None, None, :, None])
            cache.key_padding_mask = key_mask
        else:
            positions = torch.arange(L, device=device)
            if attn_mask is None:
                attn_mask = self.attention_mask(input_ids, padding_mask)
            if static:
                cache.key_padding_mask[:, :L] = padding_mask
            elif cache is not None:
                cache.key_padding_mask = padding_mask
        x = self.embed_tokens(input_ids)
        token_balance = x.new_zeros((), dtype=torch.float32)
        seq_balance = x.new_zeros((), dtype=torch.float32)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            args = (x, positions, attn_mask, padding_mask, task, context_mask, embeddings, cache, i)
            if recompute:
                x, tb, sb = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, tb, sb = block(*args)
            token_balance = token_balance + tb.float()
            seq_balance = seq_balance + sb.float()
        if static:
            if decoding:
                cache.position.add_(L)
            else:
                cache.position.fill_(L)
                cache.prefill_length = L
        n = max(1, len(self.layers))
        return self.final_layernorm(x), token_balance / n, seq_balance / n

    # ------------------------------------------------------------------------------------------------------
    # Training forward
    # ------------------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> ModelOutput:
        """Loss of a mixed batch (see batch.build_batch for the keys):

        loss = text_loss_weight · CE(answer tokens)            next-token prediction, understanding rows
             + image_loss_weight · D3Diff(masked image tokens)  generation rows, per-row γ
             + token_balance_weight · token balance loss         mean over layers
             + seq_balance_weight · sequence balance loss        mean over layers
        """
        c = self.config
        device = self.embed_tokens.weight.device
        input_ids = batch["input_ids"].to(device)
        padding_mask = batch["padding_mask"].to(device).bool()
        task = batch["task"].to(device)
        labels = batch.get("labels")
        labels = labels.to(device) if labels is not None else torch.full_like(input_ids, IGNORE_INDEX)
        image_targets = batch.get("image_targets")
        image_targets = image_targets.to(device) if image_targets is not None else torch.full_like(
            input_ids, IGNORE_INDEX)
        B, L = input_ids.shape
        gamma = batch.get("gamma")
        gamma = gamma.to(device) if gamma is not None else torch.ones(B, device=device)

        embeddings = self.image_embeddings(B, device, batch.get("images"), batch.get("embeddings"))
        context = self.context_mask(input_ids, padding_mask, task, labels)
        hidden, token_balance, seq_balance = self.transformer(
            input_ids, padding_mask, task, context_mask=context, embeddings=embeddings)

        # Text: position i predicts token i + 1.
        supervised = labels[:, 1:] != IGNORE_INDEX
        text_loss = self._text_loss(hidden[:, :-1][supervised], labels[:, 1:][supervised])
        # Image: masked positions predict their own code.
        masked = image_targets != IGNORE_INDEX
        row_gamma = gamma[:, None].expand(B, L)[masked].float()
        image_loss = self._image_loss(hidden[masked], image_targets[masked], row_gamma)

        loss = (c.text_loss_weight * text_loss + c.image_loss_weight * image_loss
                + c.token_balance_weight * token_balance + c.seq_balance_weight * seq_balance)
        parts = {"text": text_loss.detach(), "image": image_loss.detach(),
                 "token_balance": token_balance.detach(), "seq_balance": seq_balance.detach()}
        return ModelOutput(loss=loss, parts=parts)

    def _text_loss(self, hidden: Tensor, target: Tensor) -> Tensor:
        if hidden.shape[0] == 0:
            return hidden.sum().float() * 0
        weight, bias = self.text_head()
        if self.config.backend == "reference":
            return F.cross_entropy(F.linear(hidden, weight, bias).float(), target)
        ones = torch.ones(hidden.shape[0], device=hidden.device)
        return ops.linear_d3diff_loss(hidden, weight, target, ones, bias=bias, alpha=0.0)

    def _image_loss(self, hidden: Tensor, target: Tensor, gamma: Tensor) -> Tensor:
        if hidden.shape[0] == 0:
            return hidden.sum().float() * 0
        c = self.config
        weight, bias = self.image_head()
        opts = dict(alpha=c.alpha, score=c.score, schedule=c.schedule, w_max=c.w_max)
        if c.backend == "reference":
            return reference.d3diff_loss(F.linear(hidden, weight, bias), target, gamma, **opts)
        return ops.linear_d3diff_loss(hidden, weight, target, gamma, bias=bias, **opts)

    # ------------------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------------------
    def _pad_left(self, rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        device = self.embed_tokens.weight.device
        L = max(len(r) for r in rows)
        ids = torch.tensor([[self.config.pad_token_id] * (L - len(r)) + list(r) for r in rows], device=device)
        real = torch.tensor([[False] * (L - len(r)) + [True] * len(r) for r in rows], device=device)
        return ids, real

    def _check_fits(self, lengths: Sequence[int], extra: int, what: str, name: str = "prompt") -> None:
        """Raises ValueError, before any work, when a prompt of lengths[i] tokens plus `extra` positions would not fit
        the model's max_position_embeddings (a longer sequence has no trained position and costs time and memory
        quadratic in its length)."""
        limit = self.config.max_position_embeddings
        longest = max(lengths, default=0)
        if longest + extra > limit:
            i = list(lengths).index(longest)
            raise ValueError(f"{name} {i} is too long: {longest} tokens + {extra} for {what} = {longest + extra} "
                             f"positions, but the model has max_position_embeddings = {limit} (at most "
                             f"{max(0, limit - extra)} {name} tokens)")

    @contextlib.contextmanager
    def _eval_mode(self):
        """Inference runs in eval mode (the Noise expert then uses f = 0: generation is deterministic given the
        sampler's seed); the caller's mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate_images(self, prompt_ids: Sequence[Sequence[int]], *, steps: int = 18, guidance_scale: float = 0.0,
                        temperature: float = 1.0, choice_temperature: float = 1.0, seed: int = 0,
                        init_codes: Optional[Tensor] = None, negative_prompt_ids: Optional[Sequence[Sequence[int]]] = None,
                        progress: Union[bool, dict] = False, cuda_graphs: bool = True) -> Tensor:
        """Text-to-image: image codes [B, N] in [0, K) for captions given as token-id lists (no special tokens).

        MaskGIT sampling (unif2ace.ops.maskgit_generate) over `steps` steps from an all-masked image (or from
        `init_codes` [B, N] with K marking unknown positions, for inpainting). With guidance_scale > 0 each step
        also runs the unconditional prompt (an empty caption, what caption dropout trains) in the same batch — one
        forward of 2B rows — and uses z_cond + g·(z_cond − z_uncond); `negative_prompt_ids` (one caption per row)
        replace the empty caption there. The same seed gives the same codes. `progress`: a progress bar over the
        steps (a dict: its options).

        No step waits for the host: the logits stay in the model's dtype for the fused step kernel, and on CUDA the
        forward (fixed shapes for the whole loop) is recorded once as a CUDA graph and replayed for the other steps
        (cuda_graphs=True; False runs it eagerly; ignored on the CPU).
        """
        c = self.config
        B, N, K = len(prompt_ids), c.num_image_tokens, c.codebook_size
        prefixes = [generation_prefix(c, p) for p in prompt_ids]
        if negative_prompt_ids is not None and len(negative_prompt_ids) != B:
            raise ValueError(f"negative_prompt_ids has {len(negative_prompt_ids)} rows, prompt_ids {B}")
        room = len(generation_prefix(c, [])) + N + 2
        self._check_fits([len(p) for p in prompt_ids], room, "the special tokens and the image block")
        if guidance_scale > 0 and negative_prompt_ids is not None:
            self._check_fits([len(n) for n in negative_prompt_ids], room, "the special tokens and the image block",
                             name="negative prompt")
        if guidance_scale > 0:
            prefixes += [generation_prefix(c, n) for n in (negative_prompt_ids or [[]] * B)]
        prefix_ids, prefix_real = self._pad_left([p + [c.soi_token_id] for p in prefixes])
        rows, P = prefix_ids.shape
        device = prefix_ids.device
        tail = torch.full((rows, N + 1), c.mask_token_id, device=device)
        tail[:, -1] = c.eoi_token_id
        input_ids = torch.cat([prefix_ids, tail], dim=1)
        padding_mask = torch.cat([prefix_real, torch.ones_like(tail, dtype=torch.bool)], dim=1)
        task = torch.ones(rows, dtype=torch.long, device=device)
        attn_mask = self.attention_mask(input_ids, padding_mask)
        context = self.context_mask(input_ids, padding_mask, task)
        embeddings = self.image_embeddings(rows, device)
        weight, bias = self.image_head()
        tokens_in = torch.empty(B, N, dtype=torch.long, device=device)  # the step's input, updated in place

        def forward() -> Tensor:
            img = torch.where(tokens_in == K, c.mask_token_id, tokens_in + c.image_token_offset)
            input_ids[:, P:P + N] = img.repeat(rows // B, 1)
            hidden, _, _ = self.transformer(input_ids, padding_mask, task, context_mask=context,
                                            embeddings=embeddings, attn_mask=attn_mask)
            return F.linear(hidden[:, P:P + N], weight, bias)

        step_forward = GraphedCall(forward, enabled=cuda_graphs and device.type == "cuda",
                                   name="generate_images forward")

        def logits_fn(tokens: Tensor):
            tokens_in.copy_(tokens)
            logits = step_forward()
            return logits.chunk(2) if guidance_scale > 0 else logits

        if init_codes is None:
            init_codes = torch.full((B, N), K, dtype=torch.long, device=device)
        with self._eval_mode():
            return ops.maskgit_generate(
                logits_fn, B, N, K, num_steps=steps, mask_id=K, seed=seed, init_tokens=init_codes.to(device),
                guidance_scale=guidance_scale, temperature=temperature, choice_temperature=choice_temperature,
                schedule=c.schedule, progress=progress, backend=c.backend,
            )

    def _sample_next_token(self, logits: Tensor, temperature: float, top_k: int, top_p: float, seed: int,
                           step: int) -> Tensor:
        """The fused sampler, or for the reference backend the eager one fed the same Philox uniforms."""
        if self.config.backend == "reference":
            uniform = ops.philox_noise(logits.shape[0], seed, step, kind="uniform", device=logits.device)
            return reference.sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                               uniform=uniform)
        return ops.sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                     offset=step)

    def _text_rows(self, prefix_ids, image_codes) -> list[list[int]]:
        c = self.config
        rows = prefix_ids.tolist() if isinstance(prefix_ids, Tensor) else [list(p) for p in prefix_ids]
        if image_codes is not None:
            codes = torch.as_tensor(image_codes).long().tolist()
            if len(codes) != len(rows):
                raise ValueError(f"image_codes has {len(codes)} rows, prefixes {len(rows)}")
            rows = [[c.mmu_token_id, c.soi_token_id] + [c.image_token_offset + v for v in cr]
                    + [c.eoi_token_id, c.sot_token_id] + r for cr, r in zip(codes, rows)]
        return rows

    @torch.no_grad()
    def generate_text(self, prefix_ids: Union[Sequence[Sequence[int]], Tensor], *, max_new_tokens: int = 64,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      image_codes: Optional[Tensor] = None, images: Optional[Tensor] = None,
                      embeddings: Optional[dict] = None, cuda_graphs: bool = True,
                      eot_check_every: Optional[int] = None) -> list[list[int]]:
        """Understanding: continues each prefix until <|eot|> or max_new_tokens; returns the new token ids per row
        (without the <|eot|>).

        With `image_codes` [B, N] the prefix is the prompt text and the image block is put in front of it:
        <|mmu|> <|soi|> codes <|eoi|> <|sot|> prefix. Without, each prefix is a complete token sequence (already
        holding its image block, if any). Prefixes of different lengths are left-padded (masked out of attention;
        rotary positions count from the row's first column, which leaves every query-key distance as without
        padding). `images` or `embeddings` feed the CLIP/Face experts (zeros otherwise). Sampling:
        unif2ace.ops.sample_next_token over the text head (text + special tokens), temperature / top_k / top_p,
        token t of every row drawn with Philox offset t of `seed`, so the output depends on the seed only.

        Decoding uses a preallocated KV cache (StaticKVCache): a step writes its keys in place at a position held on
        the device, so no step reads anything back to the host. The host asks whether every row has emitted
        <|eot|> only every `eot_check_every` steps (default: 8 on CUDA, where each check waits for the GPU; 1 on
        the CPU, where it costs nothing; rows that finished emit padding meanwhile, which is cut off), and on CUDA
        the step is recorded once as a CUDA graph and replayed per token (cuda_graphs=True; False runs it eagerly;
        ignored on the CPU). The tokens are the same either way.
        """
        c = self.config
        rows = self._text_rows(prefix_ids, image_codes)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        self._check_fits([len(r) for r in rows], max_new_tokens, "max_new_tokens")
        ids, real = self._pad_left(rows)
        B, P = ids.shape
        if eot_check_every is None:
            eot_check_every = 8 if ids.device.type == "cuda" else 1
        if not isinstance(eot_check_every, int) or isinstance(eot_check_every, bool) or eot_check_every < 1:
            raise ValueError(f"eot_check_every: must be a positive int, got {eot_check_every!r}")
        if max_new_tokens == 0:
            return [[] for _ in range(B)]
        device = ids.device
        task = torch.zeros(B, dtype=torch.long, device=device)
        emb = self.image_embeddings(B, device, images, embeddings)
        cache = StaticKVCache(len(self.layers), B, P + max_new_tokens, device)
        weight, bias = self.text_head()
        token_in = torch.empty(B, 1, dtype=torch.long, device=device)  # the step's input, updated in place
        new_real = torch.ones(B, 1, dtype=torch.bool, device=device)

        def decode_step() -> Tensor:
            hidden, _, _ = self.transformer(token_in, new_real, task, context_mask=real, embeddings=emb, cache=cache)
            return F.linear(hidden[:, -1], weight, bias).float()

        step_logits = GraphedCall(decode_step, enabled=cuda_graphs and device.type == "cuda",
                                  name="generate_text decode step")
        out = torch.full((B, max_new_tokens), c.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        with self._eval_mode():
            hidden, _, _ = self.transformer(ids, real, task, context_mask=real, embeddings=emb, cache=cache)
            logits = F.linear(hidden[:, -1], weight, bias).float()
            n = 0
            for step in range(max_new_tokens):
                token = self._sample_next_token(logits, temperature, top_k, top_p, seed, step)
                token = torch.where(done, c.pad_token_id, token)
                out[:, step] = token
                done |= token == c.eot_token_id
                n = step + 1
                if n == max_new_tokens or (n % eot_check_every == 0 and bool(done.all())):
                    break
                token_in.copy_(token[:, None])
                logits = step_logits()
        result = []
        for row in out[:, :n].tolist():
            result.append(row[:row.index(c.eot_token_id)] if c.eot_token_id in row else row)
        return result

    # ------------------------------------------------------------------------------------------------------
    # Save / load
    # ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str, *, max_shard_size: Union[int, str] = "5GB") -> None:
        """config.json + model.safetensors (or model-0000i-of-0000N.safetensors shards and
        model.safetensors.index.json above max_shard_size). Written to a temporary directory next to
        `directory` and renamed into place, so a failure leaves nothing half-written."""
        checkpoint.save(directory, self.config.to_dict(), self.checkpoint_state_dict(), max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str, *, clip_encoder: Optional[nn.Module] = None,
                        face_encoder: Optional[nn.Module] = None, backend: Optional[str] = None,
                        device: Union[str, torch.device] = "cpu",
                        torch_dtype: Optional[torch.dtype] = None) -> "UniF2aceModel":
        """Loads what save_pretrained wrote (in `torch_dtype` if given, else as saved); raises CheckpointError
        naming the offending tensor or file on missing / unexpected keys, shape mismatches and truncated or corrupt
        files."""
        config = UniF2aceConfig.load(directory)
        for name, given in (("clip_encoder", clip_encoder), ("face_encoder", face_encoder)):
            if getattr(config, name) == "external" and given is None:
                warnings.warn(f"{directory} was saved with an external {name}; none was given, so the built-in "
                              "random encoder is used and its embeddings will not match the ones seen in training")
        with torch.device(device):
            model = cls(config, clip_encoder=clip_encoder, face_encoder=face_encoder, backend=backend)
        state = checkpoint.load(directory)
        checkpoint.check_state(model.checkpoint_state_dict(), state)
        model.load_state_dict(state, strict=False)
        return model.to(torch_dtype) if torch_dtype is not None else model
