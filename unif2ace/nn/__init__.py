"""Layers of the UniF2ace model."""
from unif2ace.nn.moe import GroupedSequenceMoE, GroupedTokenMoE, Resampler  # noqa: F401

__all__ = ["GroupedSequenceMoE", "GroupedTokenMoE", "Resampler"]
