"""UniF2aceConfig: every hyper-parameter of the model in one JSON-serialisable dataclass.

Vocabulary layout (Show-o's, docs/design.md §1 and docs/model.md), for a config with text vocabulary T, S special
tokens and codebook size K:

    [0, T)              text tokens (the tokenizer's own ids; <|sot|> and <|eot|> live here)
    [T, T + S)          special tokens: <|pad|> <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|> <|lvg|>
    [T + S, T + S + K)  image codes: code c has id image_token_offset + c
    T + S + K           [MASK]  (mask_token_id = vocab_size − 1)

The "paper" preset reproduces Show-o exactly: T = 50,295, S = 10, K = 8,192 → offset 50,305, mask 58,497,
vocab 58,498, and <|sot|> = <|eot|> = 50,256 (Phi's <|endoftext|>). The small presets keep the same shape of
layout with a small text vocabulary and codebook; their <|sot|>/<|eot|> is the last text id, like <|endoftext|>.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

MODEL_TYPE = "unif2ace"
BACKENDS = ("kernels", "reference")
ATTENTION_IMPLS = ("auto", "sdpa", "flex")
SEQ_EXPERT_KINDS = ("copy", "zero", "clip", "face", "noise")

# Offsets of the special tokens after the text vocabulary, in Show-o's order.
SPECIAL_TOKENS = ("pad", "soi", "eoi", "sov", "eov", "t2i", "mmu", "t2v", "v2v", "lvg")


def _special(text_vocab_size: int, name: str) -> int:
    return text_vocab_size + SPECIAL_TOKENS.index(name)


@dataclass
class UniF2aceConfig:
    # --- transformer (Phi-1.5 block with QK-LayerNorm) ---
    num_layers: int = 24
    hidden_size: int = 2048
    num_heads: int = 32
    rotary_dim: int = 32  # rotary embedding on the first rotary_dim dims of each head (partial rotary)
    rope_theta: float = 10000.0
    qk_layernorm: bool = True
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    # --- vocabulary (see the module docstring) ---
    text_vocab_size: int = 50295
    num_special_tokens: int = 10
    sot_token_id: int = 50256
    eot_token_id: int = 50256
    codebook_size: int = 8192
    num_image_tokens: int = 256  # tokens per image (16 × 16 at 256 px)
    image_size: int = 256  # pixels per side of the images the encoders and the image tokenizer see

    # --- grouped token MoE (docs/design.md §5): group 0 = understanding sequences, group 1 = generation sequences ---
    num_expert_groups: int = 2
    experts_per_group: int = 8
    moe_top_k: int = 4
    expert_hidden_size: int = 512
    shared_hidden_size: int = 1536
    moe_renormalize: bool = True
    moe_activation: str = "gelu_tanh"
    # kernels backend: recompute the experts' hidden activations in the backward instead of keeping them
    # (T·k·F + T·F_shared values per layer less to hold, for one more x·W1ᵀ product per expert)
    moe_recompute: bool = False

    # --- grouped sequence MoE: experts per group, top-2 of 4 ---
    seq_experts: tuple = (("clip", "face", "copy", "copy"), ("copy", "zero", "noise", "copy"))
    seq_top_k: int = 2
    clip_embed_dim: int = 512
    face_embed_dim: int = 512
    noise_dim: int = 64
    resampler_hidden_size: int = 256  # S(f) = Linear(D → this) → GELU → Linear(→ hidden_size)
    # "delta": x ← x + (SeqMoE(LN(x)) − LN(x))  (Copy experts leave the block exactly a Phi block; the default)
    # "add":   x ← x + SeqMoE(LN(x))           (MoE++-style; a Copy expert adds the normalised stream)
    seq_moe_residual: str = "delta"

    # --- frozen external encoders: "builtin" = small random frozen conv nets (see encoders.py), or
    #     "external" = modules passed to UniF2aceModel(clip_encoder=..., face_encoder=...) ---
    clip_encoder: str = "builtin"
    face_encoder: str = "builtin"

    # --- losses ---
    alpha: float = 0.01  # weight of the score-entropy term of the D3Diff loss
    score: str = "normalized"
    schedule: str = "cosine"  # masking schedule γ(r), training and sampling
    w_max: float = 1000.0
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    token_balance_weight: float = 0.01
    seq_balance_weight: float = 0.01
    caption_dropout: float = 0.1  # probability that a generation sample's caption is emptied (guidance)

    backend: str = "kernels"
    # attention kernel for full sequences (training, prefill, MaskGIT): "flex" = flex_attention with the omni mask as
    # a block mask (masked tiles skipped), "sdpa" = scaled_dot_product_attention with a dense boolean mask, "auto" =
    # flex on CUDA, sdpa elsewhere. Decoding steps always use sdpa; the reference backend its own eager attention.
    attention: str = "auto"

    # --- derived vocabulary layout ---
    @property
    def image_token_offset(self) -> int:
        return self.text_vocab_size + self.num_special_tokens

    @property
    def mask_token_id(self) -> int:
        return self.image_token_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.mask_token_id + 1

    @property
    def pad_token_id(self) -> int:
        return _special(self.text_vocab_size, "pad")

    @property
    def soi_token_id(self) -> int:
        return _special(self.text_vocab_size, "soi")

    @property
    def eoi_token_id(self) -> int:
        return _special(self.text_vocab_size, "eoi")

    @property
    def t2i_token_id(self) -> int:
        return _special(self.text_vocab_size, "t2i")

    @property
    def mmu_token_id(self) -> int:
        return _special(self.text_vocab_size, "mmu")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        self.seq_experts = tuple(tuple(g) for g in self.seq_experts)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"UniF2aceConfig: {msg}")

        need(self.hidden_size % self.num_heads == 0, f"hidden_size {self.hidden_size} not divisible by num_heads")
        need(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary_dim must be even and ≤ head_dim {self.head_dim}, got {self.rotary_dim}")
        need(self.num_special_tokens >= len(SPECIAL_TOKENS), f"need at least {len(SPECIAL_TOKENS)} special tokens")
        need(0 <= self.sot_token_id < self.text_vocab_size and 0 <= self.eot_token_id < self.text_vocab_size,
             "sot/eot token ids must be text ids")
        need(self.num_expert_groups == 2, "the model routes understanding (0) and generation (1): 2 expert groups")
        need(1 <= self.moe_top_k <= self.experts_per_group, "moe_top_k must be in [1, experts_per_group]")
        need(len(self.seq_experts) == 2, "seq_experts needs one tuple of expert kinds per group")
        for g in self.seq_experts:
            need(all(k in SEQ_EXPERT_KINDS for k in g), f"sequence expert kinds must be in {SEQ_EXPERT_KINDS}")
            need(1 <= self.seq_top_k <= len(g), "seq_top_k must be in [1, experts per group]")
        need(self.seq_moe_residual in ("delta", "add"), "seq_moe_residual must be 'delta' or 'add'")
        need(self.clip_encoder in ("builtin", "external") and self.face_encoder in ("builtin", "external"),
             "clip_encoder / face_encoder must be 'builtin' or 'external'")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.attention in ATTENTION_IMPLS, f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        need(self.num_image_tokens + 64 <= self.max_position_embeddings, "max_position_embeddings too small")

    # --- serialisation (config.json carries "model_type": "unif2ace", as transformers configs do) ---
    def to_dict(self) -> dict:
        d = {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}
        d["seq_experts"] = [list(g) for g in self.seq_experts]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UniF2aceConfig":
        d = dict(d)
        model_type = d.pop("model_type", MODEL_TYPE)  # configs written before model_type existed have none
        if model_type != MODEL_TYPE:
            raise ValueError(f"UniF2aceConfig: model_type {model_type!r} is not {MODEL_TYPE!r} (for a Show-o "
                             "checkpoint use `unif2ace convert`)")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"UniF2aceConfig: unknown keys {unknown}")
        return cls(**d)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "UniF2aceConfig":
        """`path` is a config.json file or a directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, path: str) -> "UniF2aceConfig":
        """The config of a model directory (or a config.json file), as in transformers."""
        return cls.load(path)

    def replace(self, **changes) -> "UniF2aceConfig":
        return dataclasses.replace(self, **changes)

    # --- presets ---
    @classmethod
    def preset(cls, name: str, **overrides) -> "UniF2aceConfig":
        """Named configurations (parameter counts exclude the frozen encoders; docs/model.md has the table).

        "tiny"   2 layers × 128 wide, 4 heads, text vocab 1,024, codebook 256, 16 image tokens, 4 experts of
                 128 + shared 256 per group (top-2). ~1.4M parameters: the CPU test model.
        "small"  6 layers × 256, 8 heads, text vocab 4,096, codebook 1,024, 64 image tokens (8 × 8 of 128 px),
                 8 experts of 256 + shared 512 per group (top-4). ~20M parameters: the CPU demo model.
        "medium" 6 layers × 512, 8 heads, text vocab 16,384, codebook 8,192, 256 image tokens (16 × 16 of 256 px),
                 8 experts of 512 + shared 1,024 per group (top-4). ~97M parameters: the end-to-end benchmark's
                 mid size.
        "paper"  24 layers × 2048, 32 heads of 64 (rotary on 32), Show-o's vocabulary (58,498), 256 image tokens,
                 per group 8 routed experts of FFN 512 + a shared expert of FFN 1,536 (top-4). Per layer the
                 token MoE holds 2 × (8·2·2048·512 + 2·2048·1536) ≈ 46.2M weights against Phi's dense 33.6M;
                 with the 58,498-row embedding and head (2 × 119.8M), attention (24 × 16.8M) and the sequence-MoE
                 resamplers (3 per layer, D → 256 → 2048: 24 × 1.9M) the total is 1.80B (test_model_config checks
                 1.8B ± 0.1B on the meta device). A shared FFN of 2,048 would give ~1.9B, at the edge of the
                 target, hence 1,536; resamplers of inner width 2,048 would add another ~0.3B.
        """
        if name == "paper":
            cfg = cls()
        elif name == "medium":
            cfg = cls(num_layers=6, hidden_size=512, num_heads=8, rotary_dim=32, max_position_embeddings=1024,
                      text_vocab_size=16384, sot_token_id=16383, eot_token_id=16383, codebook_size=8192,
                      num_image_tokens=256, image_size=256, experts_per_group=8, moe_top_k=4,
                      expert_hidden_size=512, shared_hidden_size=1024, clip_embed_dim=256, face_embed_dim=256,
                      noise_dim=64, resampler_hidden_size=256)
        elif name == "small":
            cfg = cls(num_layers=6, hidden_size=256, num_heads=8, rotary_dim=16, max_position_embeddings=512,
                      text_vocab_size=4096, sot_token_id=4095, eot_token_id=4095, codebook_size=1024,
                      num_image_tokens=64, image_size=128, experts_per_group=8, moe_top_k=4,
                      expert_hidden_size=256, shared_hidden_size=512, clip_embed_dim=128, face_embed_dim=128,
                      noise_dim=32, resampler_hidden_size=128)
        elif name == "tiny":
            cfg = cls(num_layers=2, hidden_size=128, num_heads=4, rotary_dim=16, max_position_embeddings=256,
                      text_vocab_size=1024, sot_token_id=1023, eot_token_id=1023, codebook_size=256,
                      num_image_tokens=16, image_size=64, experts_per_group=4, moe_top_k=2,
                      expert_hidden_size=128, shared_hidden_size=256, clip_embed_dim=64, face_embed_dim=64,
                      noise_dim=16, resampler_hidden_size=64)
        else:
            raise ValueError(f"unknown preset {name!r}; choose 'tiny', 'small', 'medium' or 'paper'")
        return cfg.replace(**overrides) if overrides else cfg
