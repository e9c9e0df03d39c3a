"""Training: typed configs and one Trainer for every method (stages, checkpoints, resume, distributed)."""

from ppfr.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
