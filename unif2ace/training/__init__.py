"""Training: TrainConfig, train(cfg), the tokenised data and batch order, the run's out dir and checkpoints."""
from unif2ace.training.config import TrainConfig
from unif2ace.training.data import TokenizedFaces, caption_attributes, mentions, short_caption
from unif2ace.training.run_dir import RunDir, RunDirError
from unif2ace.training.trainer import load_tokenizers, model_config_for, train

__all__ = ["TrainConfig", "TokenizedFaces", "train", "load_tokenizers", "model_config_for", "short_caption",
           "caption_attributes", "mentions", "RunDir", "RunDirError"]
