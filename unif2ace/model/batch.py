"""Turning samples into model batches: the sequence formats, the masking of image tokens for generation and
caption dropout. Samples are plain token-id lists and code tensors, so nothing here depends on a tokenizer.

Sequence formats (docs/design.md §1; Show-o's, without its fixed 129-token text slot):

    understanding  <|mmu|> <|soi|> img… <|eoi|> <|sot|> prompt… answer… <|eot|> [PAD]…    (right-padded)
    generation     [PAD]… <|t2i|> <|sot|> caption… <|eot|> <|soi|> img… <|eoi|>            (left-padded)

Both kinds share one batch: every row is padded to the longest row, understanding rows on the right and generation
rows on the left (so their image block ends the row, as in Show-o).

A batch is a dict of tensors:
    input_ids      [B, L] int64   vocabulary ids (image code c ↦ image_token_offset + c; masked codes ↦ mask id)
    padding_mask   [B, L] bool    True for real tokens
    task           [B]    int64   0 = understanding, 1 = generation (selects the expert group)
    labels         [B, L] int64   the token at supervised positions (answer tokens and the closing <|eot|> of
                                  understanding rows), −100 elsewhere; unshifted: position i is predicted from
                                  position i − 1
    image_targets  [B, L] int64   the original code (in [0, K)) at masked image positions, −100 elsewhere
    gamma          [B]    float32 each generation row's masking probability γ (1 for understanding rows)
and optionally `images` [B, 3, H, W] in [−1, 1] or `embeddings` {"clip": [B, D], "face": [B, D]} for the
sequence MoE's CLIP and Face experts.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from unif2ace.model.config import UniF2aceConfig

IGNORE_INDEX = -100


def masking_probability(r: Tensor, schedule: str) -> Tensor:
    """γ(r) for r ∈ [0, 1): cosine γ = cos(πr/2) (Show-o), linear γ = 1 − r. Both lie in (0, 1]."""
    if schedule == "cosine":
        gamma = torch.cos(math.pi / 2 * r)
    elif schedule == "linear":
        gamma = 1 - r
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return gamma.clamp(min=1e-6, max=1.0)


def mask_image_tokens(codes: Tensor, config: UniF2aceConfig, *, generator: Optional[torch.Generator] = None,
                      gamma: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Masks image codes [B, N] (values in [0, K)) for masked discrete diffusion training.

    Per sample: r ~ U(0, 1), γ = schedule(r) (unless `gamma` [B] is given), n = clamp(round(N·γ), 1, N) tokens
    chosen uniformly at random without replacement are replaced by the mask id — at least one token is always
    masked. Returns (ids [B, N] in vocabulary space, targets [B, N] = code at masked positions else −100,
    gamma [B] float32 — the γ the D3Diff loss weights the sample with).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes: expected [B, N], got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size):
        raise ValueError(f"codes must lie in [0, {config.codebook_size})")
    B, N = codes.shape
    if gamma is None:
        gamma = masking_probability(torch.rand(B, generator=generator), config.schedule)
    gamma = gamma.to(torch.float32)
    n_masked = torch.round(N * gamma).long().clamp(1, N)
    # The rank of each position in a random permutation; the n lowest ranks are masked.
    ranks = torch.rand(B, N, generator=generator).argsort(-1).argsort(-1)
    masked = ranks < n_masked[:, None].to(ranks.device)
    codes = codes.long()
    ids = torch.where(masked, torch.full_like(codes, config.mask_token_id), codes + config.image_token_offset)
    targets = torch.where(masked, codes, torch.full_like(codes, IGNORE_INDEX))
    return ids, targets, gamma


def understanding_sequence(config: UniF2aceConfig, codes: Sequence[int], prompt_ids: Sequence[int],
                           answer_ids: Sequence[int], more_turns: Sequence[tuple] = ()) -> tuple[list[int], list[int]]:
    """(ids, labels) of one understanding row, unpadded. An <|eot|> closes the answer and is supervised.

    `more_turns`: further (prompt_ids, answer_ids) about the same image, each appended as <|sot|> prompt answer
    <|eot|> with its answer and <|eot|> supervised (several questions per row: more supervised answers for the
    cost of one image block)."""
    c = config
    image = [c.soi_token_id] + [c.image_token_offset + int(v) for v in codes] + [c.eoi_token_id]
    context = [c.mmu_token_id] + image + [c.sot_token_id] + list(prompt_ids)
    answer = list(answer_ids) + [c.eot_token_id]
    ids, labels = context + answer, [IGNORE_INDEX] * len(context) + answer
    for prompt, reply in more_turns:
        turn_context = [c.sot_token_id] + list(prompt)
        turn_answer = list(reply) + [c.eot_token_id]
        ids += turn_context + turn_answer
        labels += [IGNORE_INDEX] * len(turn_context) + turn_answer
    return ids, labels


def understanding_length(num_image_tokens: int, turns: Sequence[tuple]) -> int:
    """Length of the understanding row of `understanding_sequence` with these (prompt_ids, answer_ids) turns."""
    return 1 + num_image_tokens + 2 + sum(1 + len(p) + len(a) + 1 for p, a in turns)


def generation_prefix(config: UniF2aceConfig, caption_ids: Sequence[int]) -> list[int]:
    """<|t2i|> <|sot|> caption <|eot|>, the text in front of a generation row's image block."""
    return [config.t2i_token_id, config.sot_token_id] + list(caption_ids) + [config.eot_token_id]


def build_batch(config: UniF2aceConfig, *, understanding: Sequence[tuple] = (), generation: Sequence[tuple] = (),
                generator: Optional[torch.Generator] = None, caption_dropout: Optional[float] = None,
                images: Optional[Tensor] = None, embeddings: Optional[dict] = None) -> dict:
    """A mixed training batch: understanding rows first, then generation rows.

    understanding: (codes [N] tensor or list, prompt_ids list[int], answer_ids list[int]) per sample — the prompt
                   (e.g. "USER: <question> ASSISTANT:") is context, the answer is supervised; an optional fourth
                   element lists further (prompt_ids, answer_ids) turns about the same image
                   (`understanding_sequence`).
    generation:    (caption_ids list[int], codes [N]) per sample — codes are masked by `mask_image_tokens`;
                   with probability `caption_dropout` (default config.caption_dropout) the caption is emptied,
                   which is the unconditional prompt of classifier-free guidance.
    images / embeddings are attached as they are (rows in the same order).
    """
    c = config
    p_drop = c.caption_dropout if caption_dropout is None else caption_dropout
    rows: list[tuple[list[int], list[int], list[int], str]] = []  # ids, labels, image targets, pad side
    for codes, prompt_ids, answer_ids, *more in understanding:
        codes = torch.as_tensor(codes).long().view(-1)
        ids, labels = understanding_sequence(c, codes.tolist(), prompt_ids, answer_ids, *more)
        rows.append((ids, labels, [IGNORE_INDEX] * len(ids), "right"))
    gammas = [1.0] * len(rows)
    if generation:
        codes = torch.stack([torch.as_tensor(s[1]).long().view(-1) for s in generation])
        img_ids, img_targets, gamma = mask_image_tokens(codes, c, generator=generator)
        drop = torch.rand(len(generation), generator=generator) < p_drop
        for i, (caption_ids, _) in enumerate(generation):
            prefix = generation_prefix(c, [] if drop[i] else caption_ids)
            ids = prefix + [c.soi_token_id] + img_ids[i].tolist() + [c.eoi_token_id]
            targets = [IGNORE_INDEX] * (len(prefix) + 1) + img_targets[i].tolist() + [IGNORE_INDEX]
            rows.append((ids, [IGNORE_INDEX] * len(ids), targets, "left"))
        gammas += gamma.tolist()
    if not rows:
        raise ValueError("build_batch: no samples")
    L = max(len(r[0]) for r in rows)
    if L > c.max_position_embeddings:
        raise ValueError(f"build_batch: a sequence of {L} tokens exceeds max_position_embeddings "
                         f"{c.max_position_embeddings}")

    def pad(seq: list[int], value: int, side: str) -> list[int]:
        fill = [value] * (L - len(seq))
        return seq + fill if side == "right" else fill + seq

    batch = {
        "input_ids": torch.tensor([pad(r[0], c.pad_token_id, r[3]) for r in rows]),
        "padding_mask": torch.tensor([pad([True] * len(r[0]), False, r[3]) for r in rows]),
        "task": torch.tensor([0] * len(understanding) + [1] * len(generation)),
        "labels": torch.tensor([pad(r[1], IGNORE_INDEX, r[3]) for r in rows]),
        "image_targets": torch.tensor([pad(r[2], IGNORE_INDEX, r[3]) for r in rows]),
        "gamma": torch.tensor(gammas, dtype=torch.float32),
    }
    if images is not None:
        batch["images"] = images
    if embeddings is not None:
        batch["embeddings"] = embeddings
    return batch
