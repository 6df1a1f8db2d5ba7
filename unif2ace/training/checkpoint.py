"""Training checkpoints: written durably and atomically, verified by checksums, the newest good one found on resume.

out_dir/checkpoints/step_0000200/
    config.json         the model's UniF2aceConfig        } a model directory: UniF2aceModel.from_pretrained
    model.safetensors   the model weights (no encoders)   } loads it as it is (or sharded, with an index)
    trainer.pt          optimizer, scheduler, step, RNG states, data position, TrainConfig
    checksums.json      sha256 of every other file (written last)

A checkpoint is written into a temporary folder next to its final name, every file and the folder are fsynced,
and only then is it renamed into place (unif2ace.durable): a kill or a power loss leaves a complete step_*
folder or none. `load` verifies a checkpoint completely (checksums.json parses and lists every file, each file
matches, the weights and trainer state load, the step is the folder's) and raises CheckpointError otherwise;
`load_latest` falls back past every checkpoint that fails.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Optional

import torch

from unif2ace import durable
from unif2ace.model import checkpoint as model_checkpoint
from unif2ace.model.checkpoint import CheckpointError

SUMS = "checksums.json"
_STEP_DIR = re.compile(r"step_(\d{7,})$")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, "checkpoints", f"step_{step:07d}")


def step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


def save(out_dir: str, step: int, model_config: dict, model_state: dict, trainer_state: dict) -> str:
    """Writes checkpoint `step` (durably, atomically); returns its path. Raises OSError on a failed write."""
    final = step_dir(out_dir, step)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with durable.staged_directory(final) as tmp:
        model_checkpoint.write_files(tmp, model_config, model_state)
        durable.torch_save(trainer_state, os.path.join(tmp, "trainer.pt"))
        sums = {name: _sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, SUMS), "w") as f:
            json.dump(sums, f, indent=1)
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    """step_* directories, oldest first."""
    paths = glob.glob(os.path.join(out_dir, "checkpoints", "step_*"))
    return sorted((p for p in paths if _STEP_DIR.match(os.path.basename(p))), key=step_of)


def rotate(out_dir: str, keep: int, step: int) -> None:
    """Keeps the newest `keep` checkpoints up to `step` (0 keeps all); newer ones are never touched here."""
    if keep > 0:
        for old in [p for p in list_checkpoints(out_dir) if step_of(p) <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def verify(path: str) -> None:
    """Raises CheckpointError unless checksums.json parses, lists the trainer state, the config and weights, and
    every listed file exists and matches."""
    sums_path = os.path.join(path, SUMS)
    if not os.path.exists(sums_path):
        raise CheckpointError(f"{path}: no {SUMS} (incomplete checkpoint)")
    try:
        with open(sums_path) as f:
            sums = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: {SUMS} is empty or corrupt ({e})") from e
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"{path}: {SUMS} is not a mapping of file names to sha256 digests")
    weights = (model_checkpoint.WEIGHTS_NAME, model_checkpoint.INDEX_NAME)
    if "trainer.pt" not in sums or "config.json" not in sums or not any(w in sums for w in weights):
        raise CheckpointError(f"{path}: {SUMS} does not list trainer.pt, config.json and the weights")
    for name, digest in sums.items():
        file = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (truncated or corrupt)")


def load(path: str) -> tuple[dict, dict, dict]:
    """(model config dict, model state, trainer state) of one checkpoint; CheckpointError if it is damaged."""
    verify(path)
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: config.json cannot be read: {e}") from e
    state = model_checkpoint.load(path)
    try:
        trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
    except Exception as e:  # pickle and zip errors have many types
        raise CheckpointError(f"{path}: trainer.pt cannot be read: {e}") from e
    found = trainer.get("step") if isinstance(trainer, dict) else None
    if found != step_of(path):
        raise CheckpointError(f"{path}: trainer.pt holds step {found}, not {step_of(path)}")
    return config, state, trainer


def load_latest(out_dir: str) -> Optional[tuple]:
    """The newest checkpoint that verifies and loads: (path, config, model state, trainer state), or None if
    there is none. Damaged checkpoints are skipped with a warning."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return (path, *load(path))
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}")
    return None
