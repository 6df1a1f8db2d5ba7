"""TrainConfig: every setting of a training run in one dataclass (saved next to the checkpoints as JSON)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TrainConfig:
    # --- data and tokenizers ---
    data_dir: str = ""                 # synthetic folder (index.jsonl) or a UniF2aceD-1M-style folder
    tokenizer_dir: str = ""            # holds image_tokenizer/ and text_tokenizer/ (a pipeline dir without model/)
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
    resume: bool = False
    stop_after: int = 0                # stop after this many steps although `steps` sets the schedule (0: never)
    max_seconds: float = 0.0           # stop (and checkpoint) after this wall time (0: no limit)
    progress: bool = True
    device: str = "auto"               # "auto", "cpu", "cuda"
    fsdp: bool = False                 # shard parameters/gradients/optimizer state (FSDP2 fully_shard) over ranks

    def __post_init__(self):
        if self.caption_form not in ("short", "full"):
            raise ValueError(f"caption_form must be 'short' or 'full', got {self.caption_form!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.generation_fraction <= 1.0 or not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError("generation_fraction and caption_fraction must lie in [0, 1]")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a positive multiple of micro_batch_size "
                             f"{self.micro_batch_size}")

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
