"""Model zoo: CIFAR ResNets (He et al. 2016), wide ResNet20xN teachers, a digits CNN.

``create(name, num_classes=...)`` builds a registered model; ``list()`` names them;
``pretrained(name)`` gives the path of a checkpoint shipped inside the package.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from . import _digits, _resnet  # noqa: F401  (registers the models)
from ._registry import create, list_models, register_model

list = list_models  # noqa: A001  (lowbit.models.list() is the registry listing)

_WEIGHTS = Path(__file__).parent / "weights"
PRETRAINED = {  # name -> checkpoint: the float teacher and two distilled students of it
    "resnet20_cifar10": _WEIGHTS / "resnet20_cifar10.pt",
    "resnet20_cifar10_ternary": _WEIGHTS / "resnet20_cifar10_ternary.pt",
    "resnet20_cifar10_w4": _WEIGHTS / "resnet20_cifar10_w4.pt",
}


def pretrained(name: str) -> Path:
    """Path of a checkpoint shipped with lowbit: ``resnet20_cifar10`` (the float CIFAR-10
    teacher), ``resnet20_cifar10_ternary`` / ``resnet20_cifar10_w4`` (students distilled from
    it: ternary and 4-bit weights, 4-bit activations)."""
    if name not in PRETRAINED:
        raise UsageError(f"no shipped checkpoint {name!r}; available: {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


__all__ = ["create", "list", "list_models", "pretrained", "register_model", "PRETRAINED"]
