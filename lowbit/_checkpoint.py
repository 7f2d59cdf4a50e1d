"""Self-describing checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of strings, numbers, lists, dicts and tensors::

    format: "lowbit.checkpoint", version: 1
    arch: {"name": "resnet20", "kwargs": {"num_classes": 10}}
    quant: QuantSpec as a dict, or None for a float model
    data: {"name", "classes", "mean", "std", "input_shape"}   # what the model expects
    state_dict: the model's tensors
    record: training record (config, per-epoch history, final accuracy)
    resume: optimiser/scheduler/RNG state while training is unfinished (absent when done)

Nothing else is ever pickled, so loading a checkpoint can never run code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_write
from .errors import CheckpointError

FORMAT = "lowbit.checkpoint"
VERSION = 1


def data_info(data) -> dict[str, Any]:
    """What a model needs to know about its inputs, taken from a :class:`lowbit.data.Dataset`."""
    return {"name": data.name, "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std), "input_shape": list(data.input_shape)}


def check_data(ckpt: dict[str, Any], dataset, model_name: str, data_name: str) -> None:
    """Refuse ``dataset`` if its input shape or class count differs from the checkpoint's."""
    info = ckpt["data"]
    if dataset.input_shape != tuple(info["input_shape"]) or \
            dataset.num_classes != len(info["classes"]):
        raise ValueError(f"{model_name} expects {info['name']} inputs "
                         f"{tuple(info['input_shape'])} with {len(info['classes'])} classes; "
                         f"{data_name} has {dataset.input_shape}, {dataset.num_classes} classes")


def save(path: str | Path, model: nn.Module, *, data: dict[str, Any], record: dict[str, Any],
         resume: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model`` (built by ``lowbit.models.create``) as a checkpoint."""
    arch = getattr(model, "lowbit_arch", None)
    if arch is None:
        raise CheckpointError("model was not built by lowbit.models.create; its architecture "
                              "cannot be recorded")
    spec = getattr(model, "lowbit_quant", None)
    ckpt = {"format": FORMAT, "version": VERSION, "arch": arch,
            "quant": spec.to_dict() if spec is not None else None, "data": data,
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "record": record}
    if resume is not None:
        ckpt["resume"] = resume
    return atomic_write(path, lambda p: torch.save(ckpt, p))


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; any problem is one :class:`CheckpointError` line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path}: refused to unpickle non-tensor objects (not a lowbit "
                              f"checkpoint; {first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a lowbit checkpoint (a bare state dict or a foreign "
                              f"file); create one with 'lowbit train' or 'lowbit distill'")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not "
                              f"supported by this lowbit (reads version {VERSION})")
    for key in ("arch", "state_dict", "data", "record"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return ckpt


def build(ckpt: dict[str, Any]) -> nn.Module:
    """The model a loaded checkpoint describes, with its weights, in eval mode."""
    from . import models

    model = models.create(ckpt["arch"]["name"], **ckpt["arch"]["kwargs"])
    if ckpt.get("quant") is not None:
        from .quant import QuantSpec, quantize

        model = quantize(model, QuantSpec.from_dict(ckpt["quant"]), copy_weights=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"state dict does not fit {ckpt['arch']['name']}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint file and build its model: ``(model, checkpoint dict)``."""
    ckpt = load(path)
    return build(ckpt), ckpt
