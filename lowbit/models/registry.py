"""Model registry in the style of timm: ``@register_model`` + ``create`` / ``list``.

``create`` also builds user models from importable code, named ``package.module:factory``
(the ``--arch`` of the command line). Only names the user passes are ever imported: a
checkpoint records the name, and loading one that names user code needs the user to name it
again (:func:`lowbit.load`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import UsageError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise UsageError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def is_user_code(name: str) -> bool:
    """Whether ``name`` is ``package.module:factory`` (user code) rather than a lowbit model."""
    return ":" in name


def factory(name: str) -> Callable[..., nn.Module]:
    """The constructor ``name`` stands for: a registered model, or ``package.module:factory``
    imported from the user's code (a function or class; ``module:Outer.inner`` works too)."""
    if not is_user_code(name):
        if name not in _MODELS:
            raise UsageError(f"unknown model {name!r}; registered models: "
                             f"{', '.join(sorted(_MODELS))}, or package.module:factory for "
                             f"your own code")
        return _MODELS[name]
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--arch {name}: cannot import {module_name} ({exc}); is it on "
                         f"PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--arch {name}: {module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--arch {name}: {attr} is not callable (expected a model factory)")
    return obj


def create(name: str, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (``create("resnet20", num_classes=10)``, or
    ``create("mypkg.nets:small_cnn", width=8)`` for user code).

    ``seed``: draw the initial weights from ``torch.manual_seed(seed)`` without touching the
    global random state (``None``: from the global state, as torch does).
    """
    fn = factory(name)
    if seed is None:
        model = fn(**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    # Remember how the model was built so checkpoints are self-describing.
    model.lowbit_arch = {"name": name, "kwargs": dict(kwargs)}
    return model


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
