"""Model registry in the style of timm: ``@register_model`` + ``create`` / ``list``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..errors import UsageError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise UsageError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (e.g. ``create("resnet20", num_classes=10)``)."""
    if name not in _MODELS:
        raise UsageError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    model = _MODELS[name](**kwargs)
    # Remember how the model was built so checkpoints are self-describing.
    model.lowbit_arch = {"name": name, "kwargs": dict(kwargs)}
    return model


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
