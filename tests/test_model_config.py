import json

import pytest
import torch

from unif2ace.model import UniF2aceConfig, UniF2aceModel


def test_paper_layout_is_show_o():
    c = UniF2aceConfig.preset("paper")
    assert (c.image_token_offset, c.mask_token_id, c.vocab_size) == (50305, 58497, 58498)
    assert (c.pad_token_id, c.soi_token_id, c.eoi_token_id, c.t2i_token_id, c.mmu_token_id) == (
        50295, 50296, 50297, 50300, 50301)
    assert c.sot_token_id == c.eot_token_id == 50256
    assert (c.num_layers, c.hidden_size, c.num_heads, c.rotary_dim, c.head_dim) == (24, 2048, 32, 32, 64)


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_round_trip(name, tmp_path):
    c = UniF2aceConfig.preset(name)
    assert UniF2aceConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    c.save(str(tmp_path))
    assert UniF2aceConfig.load(str(tmp_path)) == c
    assert UniF2aceConfig.load(str(tmp_path / "config.json")) == c


def test_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        UniF2aceConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ValueError, match="divisible"):
        UniF2aceConfig.preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="unknown preset"):
        UniF2aceConfig.preset("huge")
    with pytest.raises(ValueError, match="backend"):
        UniF2aceConfig.preset("tiny", backend="cuda")


@pytest.mark.parametrize("name,low,high", [("tiny", 1e6, 3e6), ("small", 10e6, 30e6), ("paper", 1.7e9, 1.9e9)])
def test_parameter_counts(name, low, high):
    with torch.device("meta"):
        model = UniF2aceModel(UniF2aceConfig.preset(name))
    n = model.num_parameters()
    assert low <= n <= high, f"{name}: {n:,} parameters"
    # The frozen encoders are neither counted nor trainable.
    assert n == sum(p.numel() for p in model.trainable_parameters())
