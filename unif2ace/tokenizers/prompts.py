"""Prompt builders for the two sequence formats, and the vocabulary layout.

Vocabulary (`VocabLayout`): text ids [0, T), special ids [T, T+S), image code c -> id T+S+c, then one
`[MASK]` id = the last id. Show-o: T=50295, S=10, K=8192 -> image ids 50305..58496, mask 58497, 58498 ids.

Formats (one example each; `max_text_len` = length of the text slot, padding included):

  t2i   <|t2i|> <|sot|> caption <|eot|>  <|soi|> img_0 .. img_{N-1} <|eoi|>
        length 1 + max_text_len + N + 2; the caption is cut to max_text_len - 2 tokens (sot/eot always kept).
  mmu   <|mmu|> <|soi|> img_0 .. img_{N-1} <|eoi|>  <|sot|> question answer <|eot|>
        length 3 + N + max_text_len (the same total as t2i, so both can share a batch). The question is
        formatted with `template` ("USER: {question} ASSISTANT:" like Show-o) and the answer is encoded with a
        leading space. When question + answer do not fit in max_text_len - 2, the question loses tokens from its
        start (its end, the "ASSISTANT:" cue, stays next to the answer); an answer alone too long is cut at its
        end. `labels` equal input_ids on the answer tokens and the closing <|eot|> and -100 elsewhere
        (unshifted: the model shifts them for next-token prediction). With answer=None the prompt is for
        inference: it stops after the question, with no <|eot|> and no labels.

Padding uses <|pad|> and goes at the very start (pad_side="left") or the very end ("right") of the whole
sequence; `attention_mask` is False on pads. Left-padded t2i keeps the image block at a fixed position at
the end (as Show-o's sampler expects); right-padded mmu keeps the image block at a fixed position at the start.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VocabLayout:
    """Ids of text, specials, image codes and the mask token in one vocabulary."""
    text_vocab_size: int
    num_special: int
    codebook_size: int

    @property
    def image_offset(self) -> int:
        return self.text_vocab_size + self.num_special

    @property
    def mask_id(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.mask_id + 1

    @classmethod
    def showo(cls) -> "VocabLayout":
        return cls(50295, 10, 8192)

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> vocabulary ids (checks the range)."""
        codes = _as_codes(codes, self.codebook_size)
        return codes + self.image_offset

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of image tokens -> codebook indices (mask or non-image ids raise ValueError)."""
        ids = torch.as_tensor(ids)
        if ((ids < self.image_offset) | (ids >= self.mask_id)).any():
            raise ValueError("ids outside the image-code range (text, special or mask ids)")
        return ids - self.image_offset


def _as_codes(codes, codebook_size: int) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"image codes must be integers, got {codes.dtype}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"image codes must lie in [0, {codebook_size}), got [{codes.min().item()}, {codes.max().item()}]")
    return codes.long()


def _pad(ids: list[int], length: int, pad_id: int, side: str, extra: list[list] = ()):
    """Pad `ids` (and parallel lists in `extra`, with their own fill values) to `length`."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {side!r}")
    n = length - len(ids)
    assert n >= 0, "sequence longer than its slot (a truncation bug)"

    def one(seq, fill):
        return [fill] * n + seq if side == "left" else seq + [fill] * n
    return one(ids, pad_id), [one(seq, fill) for seq, fill in extra]


def _image_block(layout: VocabLayout, codes, num_image_tokens: int | None) -> list[int]:
    if codes is None:
        if not num_image_tokens:
            raise ValueError("pass image codes or num_image_tokens (a fully masked image)")
        return [layout.mask_id] * num_image_tokens
    codes = _as_codes(codes, layout.codebook_size)
    if codes.dim() != 1:
        raise ValueError(f"expected a 1-D sequence of codes for one image, got shape {tuple(codes.shape)}")
    if num_image_tokens is not None and codes.numel() != num_image_tokens:
        raise ValueError(f"expected {num_image_tokens} image codes, got {codes.numel()}")
    return (codes + layout.image_offset).tolist()


def t2i_prompt(tok, layout: VocabLayout, caption: str, codes=None, *, num_image_tokens: int | None = None,
               max_text_len: int = 128, pad_side: str = "left") -> dict[str, torch.Tensor]:
    """One text-to-image sequence. `codes` (1-D codebook indices) or None for an all-[MASK] image.

    An empty caption gives the unconditional prompt `<|t2i|> <|sot|> <|eot|>` (classifier-free guidance).
    Returns input_ids [L] int64, attention_mask [L] bool, image_positions [L] bool (the N image tokens).
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    if max_text_len < 2:
        raise ValueError("max_text_len must leave room for <|sot|> and <|eot|>")
    text = [tok.sot_id] + tok.encode(caption)[: max_text_len - 2] + [tok.eot_id]
    image = _image_block(layout, codes, num_image_tokens)
    body = [tok.t2i_id] + text
    ids = body + [tok.soi_id] + image + [tok.eoi_id]
    is_img = [False] * (len(body) + 1) + [True] * len(image) + [False]
    ids, (real, is_img) = _pad(ids, 1 + max_text_len + len(image) + 2, tok.pad_id, pad_side,
                               [([True] * len(is_img), False), (is_img, False)])
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(real), "image_positions": torch.tensor(is_img)}


def mmu_prompt(tok, layout: VocabLayout, codes, question: str, answer: str | None = None, *, max_text_len: int = 128,
               pad_side: str = "right", template: str = "USER: {question} ASSISTANT:") -> dict[str, torch.Tensor]:
    """One understanding sequence for image `codes` (1-D). Returns input_ids, attention_mask, image_positions
    and, when `answer` is given, labels [L] (answer + <|eot|> ids, -100 elsewhere) and loss_mask [L] bool."""
    if not isinstance(question, str) or (answer is not None and not isinstance(answer, str)):
        raise ValueError("question and answer must be str")
    if answer is not None and not answer.strip():
        raise ValueError("empty answer: nothing to supervise (pass answer=None for an inference prompt)")
    if max_text_len < 3:
        raise ValueError("max_text_len must leave room for <|sot|>, one answer token and <|eot|>")
    image = _image_block(layout, codes, None)
    q = tok.encode(template.format(question=question.strip()))
    a = tok.encode(" " + answer.strip()) if answer is not None else []
    budget = max_text_len - 2 if answer is not None else max_text_len - 1
    if len(a) > budget:
        a, q = a[:budget], []
    elif len(q) + len(a) > budget:
        q = q[len(q) - (budget - len(a)):] if budget > len(a) else []
    text = [tok.sot_id] + q + a + ([tok.eot_id] if answer is not None else [])
    prefix = [tok.mmu_id, tok.soi_id] + image + [tok.eoi_id]
    ids = prefix + text
    sup = [False] * (len(prefix) + 1 + len(q)) + [True] * len(a) + ([True] if answer is not None else [])
    is_img = [False, False] + [True] * len(image) + [False] * (1 + len(text))
    ids, (real, is_img, sup) = _pad(ids, 3 + len(image) + max_text_len, tok.pad_id, pad_side,
                                    [([True] * len(ids), False), (is_img, False), (sup, False)])
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(real), "image_positions": torch.tensor(is_img)}
    if answer is not None:
        loss_mask = torch.tensor(sup)
        out["loss_mask"] = loss_mask
        out["labels"] = torch.where(loss_mask, out["input_ids"], torch.full_like(out["input_ids"], IGNORE_INDEX))
    return out


def _stack(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def t2i_batch(tok, layout: VocabLayout, captions: list[str], codes=None, *, num_image_tokens: int | None = None,
              max_text_len: int = 128, pad_side: str = "left", cond_dropout_prob: float = 0.0,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch of t2i sequences: codes [B, N] (or None: all masked, then num_image_tokens is needed).

    With cond_dropout_prob > 0 each caption is replaced by "" with that probability (training for
    classifier-free guidance); `dropped` [B] bool says which.
    """
    if codes is not None and len(codes) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(codes)} code rows")
    drop = torch.rand(len(captions), generator=generator) < cond_dropout_prob
    items = [t2i_prompt(tok, layout, "" if drop[i] else c, None if codes is None else codes[i],
                        num_image_tokens=num_image_tokens, max_text_len=max_text_len, pad_side=pad_side)
             for i, c in enumerate(captions)]
    return {**_stack(items), "dropped": drop}


def mmu_batch(tok, layout: VocabLayout, codes, questions: list[str], answers: list[str] | None = None, *,
              max_text_len: int = 128, pad_side: str = "right", template: str = "USER: {question} ASSISTANT:") -> dict[str, torch.Tensor]:
    """A batch of mmu sequences for codes [B, N]; `answers=None` builds inference prompts."""
    if len(codes) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise ValueError("codes, questions and answers need the same batch size")
    items = [mmu_prompt(tok, layout, codes[i], q, None if answers is None else answers[i], max_text_len=max_text_len,
                        pad_side=pad_side, template=template) for i, q in enumerate(questions)]
    return _stack(items)
