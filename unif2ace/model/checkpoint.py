"""Checkpoint files: config.json + safetensors weights, sharded above a size, written atomically and durably.

Layout of a checkpoint directory:
    config.json                                   UniF2aceConfig.to_dict()
    model.safetensors                             every tensor, when they fit in one shard
  or
    model-00001-of-0000N.safetensors …            shards, tensors in state-dict order, greedily filled
    model.safetensors.index.json                  {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
"""
from __future__ import annotations

import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from unif2ace import durable

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "B": 1}


class CheckpointError(RuntimeError):
    pass


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB", "200MiB", "10KB"."""
    if isinstance(size, int):
        return size
    s = str(size).strip()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * _UNITS[unit])
    return int(s)


def shard_state(state: dict[str, Tensor], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors, each under max_shard_bytes unless one tensor alone is larger."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save(directory: str, config: dict, state: dict[str, Tensor], max_shard_size="5GB") -> None:
    """Writes a checkpoint directory next to `directory` and swaps it in whole (unif2ace.durable): a kill or a
    full disk leaves the previous checkpoint (or none), never a partial one."""
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    with durable.staged_directory(directory) as tmp:
        write_files(tmp, config, state, max_shard_size)


def write_files(directory: str, config: dict, state: dict[str, Tensor], max_shard_size="5GB") -> None:
    """config.json and the safetensors weights (sharded above max_shard_size) into an existing directory."""
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    shards = shard_state(state, parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _load_file(path: str) -> dict[str, Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}") from e


def load(directory: str) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded)."""
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path} is truncated or corrupt: {e!r}") from e
        state: dict[str, Tensor] = {}
        for file in files:
            part = _load_file(os.path.join(directory, file))
            listed = {k for k, v in weight_map.items() if v == file}
            if set(part) != listed:
                raise CheckpointError(f"{file}: holds {sorted(set(part) - listed)[:5]} not in the index and lacks "
                                      f"{sorted(listed - set(part))[:5]}")
            state.update(part)
        return state
    return _load_file(os.path.join(directory, WEIGHTS_NAME))


def check_state(expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    """Raises CheckpointError listing missing and unexpected keys and every shape mismatch."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    for k, t in expected.items():
        if k in found and tuple(found[k].shape) != tuple(t.shape):
            problems.append(f"{k}: expected shape {tuple(t.shape)}, found {tuple(found[k].shape)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))

