"""Training: float teachers (``train``) and knowledge distillation into quantized students.

The package is callable: ``lowbit.distill(student, teacher, train, val, ...)`` is
:func:`distill` (the public API names the function after the package).
"""

import sys
import types

from ._kd import DISTILL_CONFIG, GSLR, KDConfig, apprentice_loss, distill, hinton_loss, student_for
from ._loop import TrainConfig, TrainingError, evaluate, reestimate_bn
from ._train import train

__all__ = ["DISTILL_CONFIG", "GSLR", "KDConfig", "TrainConfig", "TrainingError",
           "apprentice_loss", "distill", "evaluate", "hinton_loss", "reestimate_bn", "student_for",
           "train"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return distill(*args, **kwargs)

    __call__.__doc__ = distill.__doc__


sys.modules[__name__].__class__ = _CallablePackage
