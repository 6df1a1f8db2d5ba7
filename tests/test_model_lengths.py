"""Prompts that do not fit the model's positions are refused up front, with the limit in the message."""
import pytest
import torch

from test_train_helpers import TINY_MODEL
from unif2ace.model import UniF2aceConfig, UniF2aceModel


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tokens = UniF2aceConfig.preset("tiny", **TINY_MODEL).num_image_tokens
    return UniF2aceModel(UniF2aceConfig.preset("tiny", **{**TINY_MODEL, "max_position_embeddings": tokens + 64}))


def test_generate_images_prompt_limit(model):
    c = model.config
    room = c.max_position_embeddings - (c.num_image_tokens + 5)  # <|t2i|> <|sot|> … <|eot|> <|soi|> codes <|eoi|>
    codes = model.generate_images([[7] * room, [8]], steps=1, guidance_scale=1.5)
    assert codes.shape == (2, c.num_image_tokens)
    with pytest.raises(ValueError, match=rf"prompt 1 is too long: {room + 1} tokens .* max_position_embeddings = "
                                         rf"{c.max_position_embeddings} \(at most {room} prompt tokens\)"):
        model.generate_images([[8], [7] * (room + 1)], steps=1)
    with pytest.raises(ValueError, match="prompt 0 is too long: 10000 tokens"):
        model.generate_images([[7] * 10_000], steps=12)  # refused at once, not after 12 forwards of 10k tokens


def test_generate_text_prompt_limit(model):
    limit = model.config.max_position_embeddings
    out = model.generate_text([[5] * (limit - 4)], max_new_tokens=4, temperature=0)
    assert len(out) == 1 and len(out[0]) <= 4
    with pytest.raises(ValueError, match=rf"prompt 0 is too long: {limit - 3} tokens \+ 4 for max_new_tokens"):
        model.generate_text([[5] * (limit - 3)], max_new_tokens=4)
    codes = torch.zeros(1, model.config.num_image_tokens, dtype=torch.long)
    with pytest.raises(ValueError, match="too long"):  # the image block counts too
        model.generate_text([[5] * (limit - 4)], image_codes=codes, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        model.generate_text([[5]], max_new_tokens=-1)
