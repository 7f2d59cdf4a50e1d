"""Model zoo: CIFAR ResNets (He et al. 2016), wide ResNet20xN teachers, a digits CNN.

``create(name, num_classes=...)`` builds a registered model (or ``package.module:factory``
from the user's code); ``create(name, pretrained=True)`` a shipped checkpoint, timm-style;
``list()`` names the architectures, ``list_pretrained()`` the shipped checkpoints;
``pretrained(name)`` gives a shipped checkpoint's path and ``pretrained_info(name)`` what it
holds. Every place that takes a checkpoint path also takes a shipped checkpoint's name.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .._shipped import DEFAULT_PRETRAINED, PRETRAINED, list_pretrained, locate, pretrained
from ..errors import UsageError
from . import _digits, _resnet, _vit  # noqa: F401  (registers the models)
from .registry import create as _create
from .registry import factory, is_user_code, list_models, register_model

list = list_models  # noqa: A001  (lowbit.models.list() is the registry listing)

def pretrained_info(name: str) -> dict[str, Any]:
    """What shipped checkpoint ``name`` holds, read from the checkpoint itself: architecture,
    dataset, weight and activation bits (``None`` for a float model) and its test accuracy
    (the record's test split; the ResNets' records, older, validated on the test set)."""
    from .._ckptfile import load

    ckpt = load(pretrained(name))
    quant = ckpt["quant"] or {}
    return {"name": DEFAULT_PRETRAINED.get(name, name), "arch": ckpt["arch"]["name"],
            "dataset": ckpt["data"]["name"], "weight_bits": quant.get("weight_bits"),
            "act_bits": quant.get("act_bits"), "test_acc": ckpt["record"].get(
                "test", {}).get("acc", ckpt["record"]["val_acc"]),
            "epochs": len(ckpt["record"]["history"])}


_shipped = pretrained  # ``create``'s argument of that name hides the function


def create(name: str, *, pretrained: bool = False, seed: int | None = None,
           **kwargs: Any) -> nn.Module:
    """Build model ``name``: a registered architecture (``create("resnet20",
    num_classes=100)``), user code (``"mypkg.nets:small_cnn"``), or with ``pretrained=True``
    a shipped checkpoint's model with its weights (``create("resnet20", pretrained=True)``,
    ``create("resnet20_cifar10_ternary", pretrained=True)``), in eval mode.

    ``seed`` makes the initial weights reproducible (see ``registry.create``).
    """
    if not pretrained:
        return _create(name, seed=seed, **kwargs)
    if kwargs:
        raise UsageError(f"a pretrained model is built as its checkpoint describes; drop "
                         f"{', '.join(sorted(kwargs))}")
    from .._checkpoint import load_model  # builds models: imports this package's registry

    return load_model(_shipped(name))[0]


__all__ = ["DEFAULT_PRETRAINED", "PRETRAINED", "create", "factory", "is_user_code", "list",
           "list_models", "list_pretrained", "locate", "pretrained", "pretrained_info",
           "register_model"]
