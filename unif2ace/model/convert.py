"""Import a Show-o (v1) checkpoint as a UniF2ace checkpoint.

    from unif2ace.model.convert import from_showo
    from_showo("show-o/", "unif2ace-from-showo/")
    python -m unif2ace.model.convert SHOWO_DIR OUT_DIR [--max-shard-size 5GB]

Input: a local Show-o directory with config.json and pytorch_model.safetensors (keys `showo.model.*`,
`showo.lm_head.*`, as in huggingface.co/showlab/show-o). The Phi hyper-parameters are not in Show-o's
config.json; they are read off the tensor shapes (layers, hidden size, head size from the QK-LayerNorm, FFN width)
with Phi's partial rotary factor 0.5 unless config.json says otherwise.

What is copied (bit-exactly): token embedding, every LayerNorm (input, QK, final), q/k/v/dense projections, and the
output head (lm_head). What is initialised from the dense MLP fc2(gelu(fc1(h))):

- token MoE, each of the two groups: the shared expert *is* the dense MLP (shared_hidden_size defaults to the
  dense width; with a narrower shared expert it gets the first hidden units, with a wider one the extra units
  start with zero output weights). The routed experts get fc1 rows of the dense MLP (consecutive slices of its
  hidden units, wrapping around) and zero output projections (w2 = 0, b2 = 0): they add nothing at first but
  receive gradients (their hidden activations are not zero), and the routers start as initialised.
  Consequence: with shared width = dense width, attention + token MoE reproduce the Show-o block exactly.
- sequence MoE: the block must start as the dense block, so the router must pick the two Copy experts of each
  group with equal weight (their delta residual is then exactly 0: ½·h + ½·h − h). The sequence router is linear
  in the mean of LN_seq(x), which varies, so one coordinate j = 0 of LN_seq is made constant: weight[j] = 0,
  bias[j] = 1, hence pooled[j] = 1 exactly; the router is zero except router[g, copy, j] = COPY_LOGIT. The balance
  loss then moves probability away from the Copy experts as training starts (the only router gradient at first).
  The mixing experts keep their input-leaning initialisation.

The converted model therefore computes exactly Show-o's logits on Show-o's sequences (up to the mask of padding
rows, which nothing reads), given seq_moe_residual="delta" (the default; with "add" a Copy expert adds LN_seq(x)). Use `config=` to convert into a different expert layout (same transformer shape).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from safetensors.torch import load_file

from unif2ace.model.checkpoint import CheckpointError
from unif2ace.model.config import UniF2aceConfig
from unif2ace.model.model import UniF2aceModel

COPY_LOGIT = 3.0
PHI_ENDOFTEXT = 50256  # <|sot|> = <|eot|> in Show-o (Phi's <|endoftext|>)
WEIGHT_FILES = ("pytorch_model.safetensors", "model.safetensors")
_LAYER_KEY = re.compile(r"^showo\.model\.layers\.(\d+)\.")


def read_showo(showo_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    with open(os.path.join(showo_dir, "config.json")) as f:
        showo_config = json.load(f)
    for name in WEIGHT_FILES:
        path = os.path.join(showo_dir, name)
        if os.path.exists(path):
            try:
                return showo_config, load_file(path)
            except Exception as e:  # safetensors raises several types for a bad file
                raise CheckpointError(f"{path} is truncated or corrupt: {e}") from e
    raise CheckpointError(f"no Show-o weights in {showo_dir} (looked for {', '.join(WEIGHT_FILES)})")


def config_from_showo(showo_config: dict, state: dict[str, torch.Tensor], **overrides) -> UniF2aceConfig:
    """The UniF2aceConfig matching a Show-o checkpoint: transformer shape from the tensors, vocabulary from
    config.json, token-MoE shared expert as wide as the dense MLP, the paper's expert layout otherwise."""
    def tensor(name):
        if name not in state:
            raise CheckpointError(f"Show-o checkpoint lacks {name}")
        return state[name]

    vocab, hidden = tensor("showo.model.embed_tokens.weight").shape
    num_layers = 1 + max((int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))), default=-1)
    head_dim = tensor("showo.model.layers.0.self_attn.q_layernorm.weight").shape[0]
    dense_width = tensor("showo.model.layers.0.mlp.fc1.weight").shape[0]
    text_vocab = int(showo_config.get("llm_vocab_size", 50295))
    codebook = int(showo_config.get("codebook_size", 8192))
    endoftext = PHI_ENDOFTEXT if text_vocab == 50295 else text_vocab - 1
    base = UniF2aceConfig()
    cfg = dict(
        num_layers=num_layers, hidden_size=hidden, num_heads=hidden // head_dim,
        rotary_dim=int(head_dim * float(showo_config.get("partial_rotary_factor", 0.5))),
        text_vocab_size=text_vocab, sot_token_id=endoftext, eot_token_id=endoftext, codebook_size=codebook,
        num_image_tokens=int(showo_config.get("num_vq_tokens", 256)),
        image_size=16 * int(round(int(showo_config.get("num_vq_tokens", 256)) ** 0.5)),
        shared_hidden_size=dense_width, expert_hidden_size=max(1, dense_width // 16),
        max_position_embeddings=max(base.max_position_embeddings, int(showo_config.get("num_vq_tokens", 256)) + 256),
    )
    cfg.update(overrides)
    config = UniF2aceConfig(**cfg)
    if config.vocab_size != vocab:
        raise CheckpointError(f"vocabulary: Show-o embeds {vocab} ids but llm_vocab_size {text_vocab} + 10 specials "
                              f"+ codebook {codebook} + mask = {config.vocab_size}")
    if "mask_token_id" in showo_config and int(showo_config["mask_token_id"]) != config.mask_token_id:
        raise CheckpointError(f"mask_token_id {showo_config['mask_token_id']} != {config.mask_token_id}")
    return config


def _check_shapes(config: UniF2aceConfig, state: dict[str, torch.Tensor]) -> None:
    expected = {"showo.model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
                "showo.lm_head.weight": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_layers):
        expected[f"showo.model.layers.{i}.self_attn.q_proj.weight"] = (config.hidden_size, config.hidden_size)
        expected[f"showo.model.layers.{i}.self_attn.q_layernorm.weight"] = (config.head_dim,)
    for k, shape in expected.items():
        if k not in state:
            raise CheckpointError(f"Show-o checkpoint lacks {k}")
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{k}: the config expects shape {shape}, the checkpoint has "
                                  f"{tuple(state[k].shape)}")


@torch.no_grad()
def init_token_moe_from_dense(moe, group: int, fc1_w, fc1_b, fc2_w, fc2_b) -> None:
    """Shared expert of `group` = the dense MLP (see the module docstring); routed experts = fc1 slices, zero w2."""
    width = fc1_w.shape[0]
    s = min(moe.shared_hidden_size, width)
    moe.shared_w1[group, :s] = fc1_w[:s]
    moe.shared_b1[group, :s] = fc1_b[:s]
    moe.shared_w2[group].zero_()
    moe.shared_w2[group, :, :s] = fc2_w[:, :s]
    moe.shared_b2[group] = fc2_b
    f, e_n = moe.expert_hidden_size, moe.experts_per_group
    for e in range(e_n):
        rows = (torch.arange(f) + s + e * f) % width
        moe.w1[group * e_n + e] = fc1_w[rows]
        moe.b1[group * e_n + e] = fc1_b[rows]
        moe.w2[group * e_n + e].zero_()
        moe.b2[group * e_n + e].zero_()


@torch.no_grad()
def init_seq_moe_as_copy(block, config: UniF2aceConfig) -> None:
    """Routes every sequence to its group's Copy experts (see the module docstring)."""
    block.seq_layernorm.weight.fill_(1.0)
    block.seq_layernorm.bias.zero_()
    block.seq_layernorm.weight[0] = 0.0
    block.seq_layernorm.bias[0] = 1.0
    router = block.seq_moe.router  # [G, E, H]
    router.zero_()
    for g, kinds in enumerate(config.seq_experts):
        copies = [e for e, k in enumerate(kinds) if k == "copy"]
        if len(copies) < config.seq_top_k:
            raise ValueError(f"sequence group {g} {kinds}: needs {config.seq_top_k} Copy experts to start as the "
                             "dense model")
        for e in copies[: config.seq_top_k]:
            router[g, e, 0] = COPY_LOGIT


@torch.no_grad()
def convert_state(config: UniF2aceConfig, state: dict[str, torch.Tensor]) -> UniF2aceModel:
    """A UniF2aceModel (fp32, CPU) holding the Show-o weights as described in the module docstring."""
    _check_shapes(config, state)
    model = UniF2aceModel(config)
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].float()

    def copy_(param: torch.Tensor, name: str) -> None:
        src = take(name)
        if tuple(src.shape) != tuple(param.shape):
            raise CheckpointError(f"{name}: expected shape {tuple(param.shape)}, found {tuple(src.shape)}")
        param.copy_(src)

    copy_(model.embed_tokens.weight, "showo.model.embed_tokens.weight")
    copy_(model.lm_head.weight, "showo.lm_head.weight")
    copy_(model.lm_head.bias, "showo.lm_head.bias")
    copy_(model.final_layernorm.weight, "showo.model.final_layernorm.weight")
    copy_(model.final_layernorm.bias, "showo.model.final_layernorm.bias")
    for i, block in enumerate(model.layers):
        p = f"showo.model.layers.{i}."
        copy_(block.input_layernorm.weight, p + "input_layernorm.weight")
        copy_(block.input_layernorm.bias, p + "input_layernorm.bias")
        for name in ("q_proj", "k_proj", "v_proj", "dense", "q_layernorm", "k_layernorm"):
            module = getattr(block.self_attn, name)
            copy_(module.weight, p + f"self_attn.{name}.weight")
            copy_(module.bias, p + f"self_attn.{name}.bias")
        dense = [take(p + f"mlp.{n}") for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
        for g in range(config.num_expert_groups):
            init_token_moe_from_dense(block.token_moe, g, *dense)
        init_seq_moe_as_copy(block, config)
    ignored = [k for k in state if k not in used and not k.startswith("mm_projector.")]
    if ignored:
        raise CheckpointError(f"unexpected Show-o tensors ({len(ignored)}): {ignored[:10]}")
    return model


def from_showo(showo_dir: str, out_dir: str, *, config: Optional[UniF2aceConfig] = None,
               max_shard_size="5GB") -> UniF2aceModel:
    """Reads a Show-o checkpoint directory and writes a UniF2ace checkpoint (config.json + safetensors) to
    out_dir. `config`: the target configuration (default: config_from_showo). The CLIP-ViT projector of the
    show-o-w-clip-vit variants (mm_projector.*) has no counterpart and is skipped. Returns the converted model."""
    showo_config, state = read_showo(showo_dir)
    if config is None:
        config = config_from_showo(showo_config, state)
    model = convert_state(config, state)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return model


def main(argv=None) -> int:
    """`python -m unif2ace.model.convert SHOWO_DIR OUT_DIR`: the same as `unif2ace convert` (its checks and
    one-line errors)."""
    import sys

    from unif2ace.cli import main as cli_main

    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
