"""Training checkpoints: written atomically, verified by checksums, the newest good one found on resume.

out_dir/checkpoints/step_0000200/
    config.json         the model's UniF2aceConfig        } a model directory: UniF2aceModel.from_pretrained
    model.safetensors   the model weights (no encoders)   } loads it as it is
    trainer.pt          optimizer, scheduler, step, RNG states, data position, TrainConfig
    checksums.json      sha256 of the three files above (written last)

A checkpoint is written to a temporary directory next to its final name and moved there with os.replace, so a
crash never leaves a half-written step_* directory. On resume, a checkpoint whose checksums or safetensors load
fail is skipped with a warning and the previous one is used.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import warnings

import torch

from unif2ace.model import checkpoint as model_checkpoint
from unif2ace.model.checkpoint import CheckpointError

FILES = ("config.json", "model.safetensors", "trainer.pt")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:07d}")


def save(out_dir: str, step: int, model_config: dict, model_state: dict, trainer_state: dict, keep: int = 2) -> str:
    """Writes checkpoint `step` atomically; keeps the newest `keep` checkpoints (0 keeps all)."""
    final = step_dir(out_dir, step)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model_checkpoint.save(tmp, model_config, model_state)
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "checksums.json"), "w") as f:
        json.dump({name: _sha256(os.path.join(tmp, name)) for name in FILES}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """step_* directories, oldest first."""
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))


def load(path: str) -> tuple[dict, dict, dict]:
    """(model config dict, model state, trainer state) of one checkpoint; CheckpointError if it is damaged."""
    sums_path = os.path.join(path, "checksums.json")
    if not os.path.exists(sums_path):
        raise CheckpointError(f"{path}: no checksums.json (incomplete checkpoint)")
    with open(sums_path) as f:
        sums = json.load(f)
    for name in FILES:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(file) != sums.get(name):
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated or corrupt)")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    state = model_checkpoint.load(path)
    try:
        trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
    except Exception as e:  # pickle and zip errors have many types
        raise CheckpointError(f"{path}: trainer.pt cannot be read: {e}") from e
    return config, state, trainer


def load_latest(out_dir: str):
    """The newest checkpoint that loads: (path, config, model state, trainer state), or None if there is none.
    Damaged checkpoints are skipped with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return (path, *load(path))
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}")
    return None
