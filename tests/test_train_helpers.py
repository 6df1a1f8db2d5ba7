"""Shared fixtures of the training tests: a tiny synthetic data set, tokenizers and training config.

`tiny_setup(root)` writes (once per directory) 64 faces of 32 px, a BPE text tokenizer and an untrained LFQ image
tokenizer (32 px, 8× down → 16 tokens, 64 codes) under root, and returns their paths.
"""
from __future__ import annotations

import os

import pytest
import torch

from unif2ace.training import TrainConfig

TINY_MODEL = dict(num_layers=1, hidden_size=64, num_heads=2, rotary_dim=16, experts_per_group=2, moe_top_k=1,
                  expert_hidden_size=64, shared_hidden_size=64, max_position_embeddings=160)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run tiny models: one torch thread is as fast on an idle machine and many times faster on a
    busy shared one (oversubscribed cores). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_setup(root: str) -> dict:
    from unif2ace.data import write_synthetic_dataset
    from unif2ace.tokenizers import ImageTokenizer, ImageTokenizerConfig, TextTokenizer
    from unif2ace.training.data import question_prompt, short_caption

    data = os.path.join(root, "data")
    tok = os.path.join(root, "tokenizers")
    if not os.path.exists(os.path.join(tok, "image_tokenizer")):
        write_synthetic_dataset(data, 64, resolution=32, seed=0, progress=False)
        import json

        with open(os.path.join(data, "index.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        texts = [short_caption(r["attributes"]) for r in recs]
        texts += [question_prompt(q["question"]) + " " + q["answer"] for r in recs for q in r["vqa"]]
        TextTokenizer.train(texts, vocab_size=300).save_pretrained(os.path.join(tok, "text_tokenizer"))
        torch.manual_seed(0)
        icfg = ImageTokenizerConfig(ch=8, enc_ch_mult=(1, 1, 2, 2), enc_num_res_blocks=(1, 1, 1, 1),
                                    dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=(1, 1, 1, 1), code_bits=6,
                                    norm_groups=4, mid_attn=False, image_size=32)
        ImageTokenizer(icfg).save_pretrained(os.path.join(tok, "image_tokenizer"))
    return {"data": data, "tokenizers": tok}


def tiny_config(root: str, out: str, **changes) -> TrainConfig:
    paths = tiny_setup(root)
    base = dict(data_dir=paths["data"], tokenizer_dir=paths["tokenizers"], out_dir=out,
                cache_dir=os.path.join(root, "cache"), model_preset="tiny", model_overrides=dict(TINY_MODEL),
                batch_size=8, micro_batch_size=8, steps=6, lr=3e-3, warmup_steps=2, checkpoint_every=3,
                progress=False, seed=0)
    base.update(changes)
    return TrainConfig(**base)


def read_log(out: str) -> list[dict]:
    import json

    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
