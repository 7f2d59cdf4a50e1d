"""Training: float teachers (``train``) and knowledge distillation into quantized students."""

from ._loop import TrainConfig, TrainingError, evaluate
from ._train import train

__all__ = ["TrainConfig", "TrainingError", "evaluate", "train"]
