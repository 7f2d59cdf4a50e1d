"""The checkpoints shipped with lowbit (``lowbit/models/weights/``), by name.

A leaf (no lowbit imports but errors): the checkpoint reader resolves a shipped name
(``locate``) and ``lowbit.models`` lists and loads them, without either importing the other.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

_WEIGHTS = Path(__file__).parent / "models" / "weights"
PRETRAINED = {  # name -> checkpoint: float teachers and students distilled from them
    "resnet20_cifar10": _WEIGHTS / "resnet20_cifar10.pt",
    "resnet20_cifar100": _WEIGHTS / "resnet20_cifar100.pt",
    "resnet20_cifar10_ternary": _WEIGHTS / "resnet20_cifar10_ternary.pt",
    "resnet20_cifar10_ternary_a8": _WEIGHTS / "resnet20_cifar10_ternary_a8.pt",
    "resnet20_cifar10_w4": _WEIGHTS / "resnet20_cifar10_w4.pt",
    "resnet20_cifar100_ternary": _WEIGHTS / "resnet20_cifar100_ternary.pt",
    "resnet20_cifar100_ternary_a8": _WEIGHTS / "resnet20_cifar100_ternary_a8.pt",
    "vit_tiny_cifar10": _WEIGHTS / "vit_tiny_cifar10.pt",
    "vit_tiny_cifar10_ternary": _WEIGHTS / "vit_tiny_cifar10_ternary.pt",
}
# architecture -> its shipped weights
DEFAULT_PRETRAINED = {"resnet20": "resnet20_cifar10", "vit_tiny": "vit_tiny_cifar10"}


def list_pretrained() -> list[str]:
    """Names of the checkpoints shipped with lowbit."""
    return sorted(PRETRAINED)


def pretrained(name: str) -> Path:
    """Path of a checkpoint shipped with lowbit: ``resnet20_cifar10`` / ``resnet20_cifar100``
    (float teachers), ``resnet20_cifar10_ternary`` / ``resnet20_cifar100_ternary`` (ternary
    students distilled from them, 4-bit activations; ``..._a8``: 8-bit activations),
    ``resnet20_cifar10_w4`` (4-bit weights and activations), ``vit_tiny_cifar10`` (a float
    ViT) and ``vit_tiny_cifar10_ternary`` (its ternary student, 8-bit activations); an
    architecture with shipped weights (``resnet20``, ``vit_tiny``) gives its CIFAR-10 float
    checkpoint."""
    key = DEFAULT_PRETRAINED.get(name, name)
    if key not in PRETRAINED:
        raise UsageError(f"no shipped checkpoint {name!r}; available: {', '.join(PRETRAINED)}")
    return PRETRAINED[key]


def locate(path: str | Path) -> Path:
    """A checkpoint path as given, or the shipped checkpoint of that name when no such file."""
    p = Path(path)
    return PRETRAINED[str(path)] if not p.exists() and str(path) in PRETRAINED else p
