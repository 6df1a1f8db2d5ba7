"""Text tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus the special tokens of the sequence formats.

Two id layouts:

* "compact" (a BPE trained here on captions and answers): the BPE tokens take ids 0..T-1, then the seven
  specials follow in this order: `<|pad|> <|soi|> <|eoi|> <|t2i|> <|mmu|> <|sot|> <|eot|>` (ids T..T+6).
* "showo" (a local Phi-1.5 / GPT-2 style tokenizer.json that has `<|endoftext|>`): Show-o's ids exactly —
  `<|pad|>`=T, then `<|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>` (T+1..T+9), and
  `<|sot|>` = `<|eot|>` = `<|endoftext|>` (50256 for Phi, whose T is 50295).

Image codes and the `[MASK]` id live above `vocab_size` and have no text form: see `prompts.VocabLayout`.
Special-token text typed inside a caption ("<|eot|>") is encoded as ordinary text, never as the special id.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

COMPACT_SPECIALS = ("<|pad|>", "<|soi|>", "<|eoi|>", "<|t2i|>", "<|mmu|>", "<|sot|>", "<|eot|>")
SHOWO_SPECIALS = ("<|pad|>", "<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
ENDOFTEXT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """A bare byte-level BPE (`tokenizers.Tokenizer`, no special tokens) trained on the non-empty `texts`.
    The 256 byte symbols are always in the vocabulary, so any text round-trips exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator((t for t in texts if isinstance(t, str) and t.strip()), trainer=trainer)
    return tok


def dataset_texts(dataset) -> Iterator[str]:
    """Captions, questions and answers of a `FaceDataset` (read from its records, no image decoding) or of
    any iterable of dicts with "caption" and "vqa": the corpus to train the BPE on."""
    for rec in getattr(dataset, "records", dataset):
        if rec.get("caption"):
            yield rec["caption"]
        for qa in rec.get("vqa", []):
            yield qa["question"]
            yield qa["answer"]


class TextTokenizer:
    """Byte-level BPE with the project's special tokens.

    Attributes: `pad_id`, `soi_id`, `eoi_id`, `t2i_id`, `mmu_id`, `sot_id`, `eot_id`; `text_vocab_size` (ids
    of the base tokenizer), `num_special` (ids added after it), `vocab_size` (= their sum: the first id free
    for image codes), `layout` ("compact" or "showo").
    """

    def __init__(self, tokenizer: Tokenizer, layout: str = "compact", text_vocab_size: int | None = None):
        if layout not in ("compact", "showo"):
            raise ValueError(f"layout must be 'compact' or 'showo', got {layout!r}")
        self._tok, self.layout = tokenizer, layout
        specials = COMPACT_SPECIALS if layout == "compact" else SHOWO_SPECIALS
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if text_vocab_size is None:
            text_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
            if all(s in vocab for s in specials):  # already carries our specials (a saved tokenizer)
                text_vocab_size = min(vocab[s] for s in specials)
        self.text_vocab_size = text_vocab_size
        missing = [s for s in specials if s not in vocab]
        if missing:
            tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
        ids = {s: tokenizer.token_to_id(s) for s in specials}
        expected = {s: text_vocab_size + i for i, s in enumerate(specials)}
        if ids != expected:
            raise ValueError(f"special tokens got ids {ids}, expected {expected}: the base tokenizer's ids are not contiguous")
        self.num_special = len(specials)
        self.pad_id, self.soi_id, self.eoi_id = ids["<|pad|>"], ids["<|soi|>"], ids["<|eoi|>"]
        self.t2i_id, self.mmu_id = ids["<|t2i|>"], ids["<|mmu|>"]
        if layout == "compact":
            self.sot_id, self.eot_id = ids["<|sot|>"], ids["<|eot|>"]
        else:
            eot = tokenizer.token_to_id(ENDOFTEXT)
            if eot is None:
                raise ValueError(f"layout 'showo' needs a {ENDOFTEXT} token in the tokenizer")
            self.sot_id = self.eot_id = eot
        # typed "<|eot|>" in user text must stay text: only our code inserts special ids
        tokenizer.encode_special_tokens = True
        self.special_ids = sorted(set(ids.values()) | {self.sot_id, self.eot_id})

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> "TextTokenizer":
        """Train a byte-level BPE of `vocab_size` base tokens (specials come on top) on `texts`."""
        return cls(train_bpe(texts, vocab_size, min_frequency), "compact")

    @classmethod
    def from_file(cls, path: str, layout: str = "auto") -> "TextTokenizer":
        """Load a tokenizer.json; layout "auto" picks "showo" when it has `<|endoftext|>`, else "compact"."""
        tok = Tokenizer.from_file(path)
        if layout == "auto":
            layout = "showo" if tok.token_to_id(ENDOFTEXT) is not None else "compact"
        return cls(tok, layout)

    @classmethod
    def from_pretrained(cls, directory: str) -> "TextTokenizer":
        """Load `tokenizer.json` (+ `tokenizer_config.json` if present) from a directory."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {directory!r}")
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
        tok = Tokenizer.from_file(path)
        if "layout" not in cfg:
            return cls.from_file(path)
        return cls(tok, cfg["layout"], cfg.get("text_vocab_size"))

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"layout": self.layout, "text_vocab_size": self.text_vocab_size, "num_special": self.num_special,
                       "special_tokens": {n: getattr(self, n) for n in ("pad_id", "soi_id", "eoi_id", "t2i_id",
                                                                        "mmu_id", "sot_id", "eot_id")}}, f, indent=1)

    # -- use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.num_special

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no specials added)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. With skip_special_tokens, specials and ids >= vocab_size (image codes, mask) are dropped;
        without it such ids raise ValueError."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad and not skip_special_tokens:
            raise ValueError(f"ids {bad[:5]} are outside the text vocabulary [0, {self.vocab_size})")
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            drop = set(self.special_ids)
            ids = [i for i in ids if i not in drop]
        return self._tok.decode(ids, skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def vocab_layout(self, codebook_size: int):
        """The full id layout for an image codebook of `codebook_size` codes (see prompts.VocabLayout)."""
        from unif2ace.tokenizers.prompts import VocabLayout

        return VocabLayout(self.text_vocab_size, self.num_special, codebook_size)
