"""The assembled UniF2ace model: configuration, blocks, batches, checkpoints and the Show-o import."""
from unif2ace.model.batch import build_batch, mask_image_tokens
from unif2ace.model.checkpoint import CheckpointError
from unif2ace.model.config import UniF2aceConfig
from unif2ace.model.model import ModelOutput, UniF2aceModel

__all__ = ["UniF2aceConfig", "UniF2aceModel", "ModelOutput", "CheckpointError", "build_batch", "mask_image_tokens"]
