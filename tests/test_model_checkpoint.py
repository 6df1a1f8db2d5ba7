import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from unif2ace.model import CheckpointError, UniF2aceConfig, UniF2aceModel
from unif2ace.model import checkpoint

CFG = UniF2aceConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UniF2aceModel(CFG)
    with torch.no_grad():  # make every tensor distinctive, biases and norms included
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


def assert_same(a: UniF2aceModel, b: UniF2aceModel):
    sa, sb = a.checkpoint_state_dict(), b.checkpoint_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for k, v in a.state_dict().items():  # the rebuilt built-in encoders are identical too
        assert torch.equal(v, b.state_dict()[k]), k


def test_round_trip_single_file(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    loaded = UniF2aceModel.from_pretrained(str(d))
    assert loaded.config == model.config
    assert_same(model, loaded)
    assert not any(k.startswith(("clip_encoder.", "face_encoder.")) for k in load_file(str(d / "model.safetensors")))


def test_round_trip_sharded(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d), max_shard_size="1MB")
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and f"model-00001-of-{len(shards):05d}.safetensors" in shards
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.checkpoint_state_dict())
    for f in shards:  # no shard above the limit unless it holds a single tensor
        part = load_file(str(d / f))
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 10**6
    assert_same(model, UniF2aceModel.from_pretrained(str(d), backend="reference"))


def test_overwrite_replaces_old_checkpoint(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d), max_shard_size="1MB")
    model.save_pretrained(str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_save_leaves_nothing(model, tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d))
    before = (d / "model.safetensors").read_bytes()
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2 == 0:  # the second shard of each save fails
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(d), max_shard_size="1MB")
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(str(tmp_path / "fresh"), max_shard_size="1MB")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory, no half-written "fresh"
    assert (d / "model.safetensors").read_bytes() == before  # the old checkpoint is untouched


def test_truncated_file(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d))
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UniF2aceModel.from_pretrained(str(d))


def test_missing_shard(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d), max_shard_size="1MB")
    os.remove(d / "model-00002-of-{:05d}.safetensors".format(len([f for f in os.listdir(d) if f.startswith("model-")])))
    with pytest.raises(CheckpointError, match="missing"):
        UniF2aceModel.from_pretrained(str(d))


def test_mismatched_checkpoint(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d))
    state = load_file(str(d / "model.safetensors"))
    state["layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 5)
    del state["final_layernorm.bias"]
    state["layers.0.extra"] = torch.zeros(1)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        UniF2aceModel.from_pretrained(str(d))
    msg = str(err.value)
    assert "layers.0.self_attn.q_proj.weight: expected shape (128, 128), found (3, 5)" in msg
    assert "missing keys (1): ['final_layernorm.bias']" in msg
    assert "unexpected keys (1): ['layers.0.extra']" in msg


def test_config_mismatch(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: expected shape \(1291, 64\), found \(1291, 128\)"):
        UniF2aceModel.from_pretrained(str(d))
