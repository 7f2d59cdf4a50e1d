"""Training: float teachers (``train``) and knowledge distillation into quantized students.

``lowbit.distill`` is the function :func:`distill` (the public API names the function after
the package); this package's names are imported from it (``from lowbit.distill import
KDConfig``) and resolved on first use, so importing it does not import torch.
"""

from .._lazy import lazy_names

_NAMES = {
    **dict.fromkeys(["DISTILL_CONFIG", "GSLR", "KDConfig", "apprentice_loss", "distill",
                     "hinton_loss", "student_for"], "._kd"),
    **dict.fromkeys(["TrainConfig", "TrainingError", "evaluate", "reestimate_bn"], "._loop"),
    "train": "._train",
}

__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _NAMES)
