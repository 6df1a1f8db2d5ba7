"""TrainConfig: every setting of a training run in one dataclass (saved next to the checkpoints as JSON)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainConfig:
    # --- data and tokenizers ---
    data_dir: str = ""                 # synthetic folder (index.jsonl) or a UniF2aceD-1M-style folder
    tokenizer_dir: str = ""            # holds image_tokenizer/, text_tokenizer/ and optionally face_encoder/ (a
                                       # pipeline dir without model/)
    out_dir: str = "runs/unif2ace"     # checkpoints/, train_log.jsonl, and at the end a pipeline dir
    cache_dir: str = ""                # image-token cache (default: <data_dir>/.token_cache)
    split: Optional[str] = "train"     # None = every record (real data without a split field)
    caption_form: str = "short"        # "short": the attribute list of `short_caption` (synthetic data); "full"
    num_workers: int = 0

    # --- model ---
    model_preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)  # UniF2aceConfig fields on top of the preset
    init_from: str = ""                # a model directory (save_pretrained) to start from

    # --- batch: understanding and generation rows are mixed in every micro-batch ---
    batch_size: int = 32               # sequences per optimizer step, over all ranks
    micro_batch_size: int = 32         # sequences per forward; accumulation = batch_size / (micro · world)
    generation_fraction: float = 0.5   # share of generation (t2i) rows; the rest are understanding rows
    caption_fraction: float = 0.25     # share of understanding rows that are captioning ("Describe the face.")
    vqa_row_tokens: int = 0            # > 0: a VQA row takes more questions about its image while it fits this many
                                       # tokens (0: one question per row)

    # --- optimisation ---
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1          # the cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # 0 disables clipping
    precision: str = "auto"            # "auto" (bf16 autocast on CUDA with bf16, fp32 elsewhere), "bf16", "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    compile_blocks: bool = False       # torch.compile the transformer blocks (one compilation shared by all blocks)
    seed: int = 0

    # --- bookkeeping ---
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = False               # continue the run in out_dir from its newest good checkpoint
    overwrite: bool = False            # delete the run already in out_dir and start again (default: refuse)
    stop_after: int = 0                # stop after this many steps although `steps` sets the schedule (0: never)
    max_seconds: float = 0.0           # stop (and checkpoint) after this wall time (0: no limit)
    progress: bool = True
    device: str = "auto"               # "auto", "cpu", "cuda"
    fsdp: bool = False                 # shard parameters/gradients/optimizer state (FSDP2 fully_shard) over ranks

    def __post_init__(self):
        """Every field checked at once; all problems in one ValueError (one line)."""
        problems = [message for ok, message in self._checks() if not ok]
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def _checks(self):
        def integer(name, low):
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
            return ok, f"{name} must be an int >= {low}, got {v!r}"

        def number(name, low, high=math.inf, *, above_low=False, below_high=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
            ok = ok and (v > low if above_low else v >= low) and (v < high if below_high else v <= high)
            lo, hi = "(" if above_low else "[", ")" if below_high else "]"
            return ok, f"{name} must be a number in {lo}{low}, {high}{hi}, got {v!r}"

        def choice(name, options):
            v = getattr(self, name)
            return v in options, f"{name} must be one of {', '.join(map(repr, options))}, got {v!r}"

        yield bool(self.out_dir) and isinstance(self.out_dir, str), f"out_dir must be a path, got {self.out_dir!r}"
        yield choice("caption_form", ("short", "full"))
        yield integer("num_workers", 0)
        yield isinstance(self.model_overrides, dict), f"model_overrides must be a dict, got {self.model_overrides!r}"
        yield integer("batch_size", 1)
        yield integer("micro_batch_size", 1)
        yield (not isinstance(self.batch_size, int) or not isinstance(self.micro_batch_size, int)
               or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size == 0,
               f"batch_size {self.batch_size} must be a positive multiple of micro_batch_size "
               f"{self.micro_batch_size}")
        yield number("generation_fraction", 0, 1)
        yield number("caption_fraction", 0, 1)
        yield integer("vqa_row_tokens", 0)
        yield integer("steps", 1)
        yield number("lr", 0, above_low=True, below_high=True)
        yield number("min_lr_ratio", 0, 1)
        yield integer("warmup_steps", 0)
        yield number("weight_decay", 0, below_high=True)
        yield number("beta1", 0, 1, below_high=True)
        yield number("beta2", 0, 1, below_high=True)
        yield number("grad_clip", 0, below_high=True)
        yield choice("precision", ("auto", "bf16", "fp32"))
        yield choice("activation_checkpointing", (False, True))
        yield choice("compile_blocks", (False, True))
        yield integer("seed", 0)
        yield integer("checkpoint_every", 1)
        yield integer("keep_checkpoints", 0)
        yield integer("stop_after", 0)
        yield number("max_seconds", 0)
        yield not (self.resume and self.overwrite), "resume and overwrite exclude each other"
        yield _is_device(self.device), f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}")
        return cls(**d)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


def _is_device(name) -> bool:
    if name == "auto":
        return True
    try:
        import torch

        torch.device(name)
        return True
    except (RuntimeError, TypeError):
        return False
