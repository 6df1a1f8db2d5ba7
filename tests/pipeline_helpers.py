"""A tiny random pipeline directory for tests that need one quickly (no data set, no training)."""
from __future__ import annotations

import torch

TINY_PIPELINE_MODEL = dict(num_layers=1, hidden_size=64, num_heads=2, experts_per_group=2, moe_top_k=1,
                           expert_hidden_size=64, shared_hidden_size=64, max_position_embeddings=160)


def tiny_pipeline(path: str) -> None:
    """Writes model/, image_tokenizer/ and text_tokenizer/ of an untrained tiny UniF2ace to `path` (32 px faces,
    16 tokens of 64 codes): its faces are noise and its answers arbitrary, but every call path runs."""
    from unif2ace.model import UniF2aceModel
    from unif2ace.pipeline import FacePipeline
    from unif2ace.tokenizers import ImageTokenizer, ImageTokenizerConfig, TextTokenizer
    from unif2ace.training import model_config_for
    from unif2ace.training.data import question_prompt

    texts = ["sad face, dark skin, bald, no glasses, a cap, green background",
             "happy face, tan skin, short black hair, blue background",
             question_prompt("What kind of hat is the person wearing?") + " a cap",
             question_prompt("What colour is the background?") + " green"]
    text_tok = TextTokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    image_tok = ImageTokenizer(ImageTokenizerConfig(ch=8, enc_ch_mult=(1, 1, 2, 2), enc_num_res_blocks=(1, 1, 1, 1),
                                                    dec_ch_mult=(1, 1, 2, 2), dec_num_res_blocks=(1, 1, 1, 1),
                                                    code_bits=6, norm_groups=4, mid_attn=False, image_size=32))
    config = model_config_for(image_tok, text_tok, "tiny", **TINY_PIPELINE_MODEL)
    FacePipeline(UniF2aceModel(config), image_tok, text_tok).save_pretrained(path)
