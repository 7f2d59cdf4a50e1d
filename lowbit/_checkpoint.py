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

import numbers
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_write
from .errors import CheckpointError, DataError, LowbitError, TrainingError

FORMAT = "lowbit.checkpoint"
VERSION = 1
MAX_INPUT_VALUES = 2**26  # C*H*W of one input image; a larger one is a crafted file


def data_info(data) -> dict[str, Any]:
    """What a model needs to know about its inputs, taken from a :class:`lowbit.data.Dataset`."""
    return {"name": data.name, "classes": list(data.classes), "mean": list(data.mean),
            "std": list(data.std), "input_shape": list(data.input_shape), "examples": len(data)}


def check_resume(path: str | Path, ckpt: dict[str, Any], model: nn.Module,
                 data: dict[str, Any], record: dict[str, Any]) -> None:
    """Refuse to continue the run saved in ``ckpt`` with settings that define another run.

    Compared: the architecture and its arguments (``model.lowbit_arch``), the quantization
    spec (weight/activation bits, scale rule...), the training data (``data_info``: dataset,
    classes, number of examples, i.e. ``--limit``) and every entry of ``record`` (training
    and distillation configs, teacher). A setting the checkpoint does not record (written by
    an older lowbit) is not compared, so older checkpoints still resume.
    """
    spec = getattr(model, "lowbit_quant", None)
    diffs = (_differences(ckpt["arch"], getattr(model, "lowbit_arch", None), "arch", strict=True)
             + _differences(ckpt.get("quant"), spec.to_dict() if spec is not None else None,
                            "quant", strict=True)
             + _differences(ckpt["data"], data, "data")
             + [d for key, value in record.items() if key != "history" and key in ckpt["record"]
                for d in _differences(ckpt["record"][key], value, key)])
    if diffs:
        raise TrainingError(f"cannot resume {path}: it was started with other settings "
                            f"({'; '.join(diffs[:3])}); use the original settings, or "
                            f"start a new run (--overwrite or another -o)")


def _differences(stored: Any, new: Any, name: str, strict: bool = False) -> list[str]:
    """Where ``new`` differs from ``stored`` ("name.key: old -> new"); dict keys missing on
    one side count only when ``strict``."""
    if isinstance(stored, dict) and isinstance(new, dict):
        keys = stored.keys() | new.keys() if strict else stored.keys() & new.keys()
        return [d for k in sorted(keys, key=str)
                for d in _differences(stored.get(k), new.get(k), f"{name}.{k}", strict)]
    if _plain(stored) != _plain(new):
        return [f"{name}: {_plain(stored)!r} in the checkpoint, {_plain(new)!r} now"]
    return []


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, so settings read back from a checkpoint compare equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_data(ckpt: dict[str, Any], dataset, model_name: str, data_name: str) -> None:
    """Refuse ``dataset`` if its input shape or class count differs from the checkpoint's."""
    info = ckpt["data"]
    if dataset.input_shape != tuple(info["input_shape"]) or \
            dataset.num_classes != len(info["classes"]):
        raise DataError(f"{model_name} expects {info['name']} inputs "
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
    _check_kind(path)
    try:
        with warnings.catch_warnings():  # torch's notes on refused pickles: the error says it
            warnings.filterwarnings("ignore", module=r"torch\.(serialization|_weights_only)")
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
    _check_structure(path, ckpt)
    return ckpt


def _check_kind(path: Path) -> None:
    """Name the usual wrong files (empty, an exported model) before unpickling them."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint; an interrupted "
                              f"copy or download?")
    if path.suffix in (".onnx", ".ort") or head[4:8] == b"ORTM":
        raise CheckpointError(f"{path}: is an exported model (ONNX/ORT), not a lowbit checkpoint "
                              f"(.pt); run it with 'lowbit run', or give the .pt it was exported "
                              f"from")


def _check_structure(path: Path, ckpt: dict[str, Any]) -> None:
    """Refuse entries of the wrong type or size, so that building the model fails with one
    line instead of deep inside a constructor (or by exhausting memory)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: malformed checkpoint: {what}")

    def numbers_list(v: Any, n: int | None = None) -> bool:
        return isinstance(v, (list, tuple)) and (n is None or len(v) == n) and all(
            isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)

    arch, data, quant = ckpt["arch"], ckpt["data"], ckpt.get("quant")
    need(isinstance(arch, dict) and isinstance(arch.get("name"), str)
         and isinstance(arch.get("kwargs"), dict)
         and all(isinstance(k, str) for k in arch["kwargs"]),
         "'arch' must be {'name': str, 'kwargs': {str: value}}")
    need(isinstance(data, dict), "'data' must be a dict")
    shape = data.get("input_shape")
    need(numbers_list(shape, 3) and all(isinstance(d, int) and d >= 1 for d in shape),
         f"data 'input_shape' must be [C, H, W] of positive integers, found {shape!r}")
    need(shape[0] * shape[1] * shape[2] <= MAX_INPUT_VALUES,
         f"data 'input_shape' {shape} is larger than any image lowbit handles")
    need(isinstance(data.get("name"), str), "data 'name' must be a string")
    need(isinstance(data.get("classes"), (list, tuple)) and len(data["classes"]) >= 1,
         "data 'classes' must be a non-empty list")
    for key in ("mean", "std"):
        need(numbers_list(data.get(key), shape[0]),
             f"data {key!r} must list {shape[0]} numbers (one per channel)")
    need(quant is None or isinstance(quant, dict), "'quant' must be a dict or None")
    need(isinstance(ckpt["state_dict"], dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()),
        "'state_dict' must map names to tensors")
    need(isinstance(ckpt["record"], dict), "'record' must be a dict")
    resume = ckpt.get("resume")
    need(resume is None or (isinstance(resume, dict) and isinstance(resume.get("step"), int)
                            and isinstance(resume.get("optimizer"), dict)
                            and isinstance(resume.get("extra"), dict)),
         "'resume' must be {'step': int, 'optimizer': dict, 'extra': dict}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def build(ckpt: dict[str, Any], where: str = "checkpoint") -> nn.Module:
    """The model a loaded checkpoint describes, with its weights, in eval mode.

    The architecture is first built on the meta device (no memory): one that needs more
    values than the checkpoint stores (e.g. a crafted width) is refused before allocating.
    """
    from . import models

    name, kwargs = ckpt["arch"]["name"], ckpt["arch"]["kwargs"]
    try:
        with torch.device("meta"):
            probe = models.create(name, **kwargs)
    except (LowbitError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot build its architecture {name!r} with "
                              f"{kwargs}: {_first_line(exc)}") from None
    need = sum(t.numel() for t in probe.state_dict().values())
    have = sum(t.numel() for t in ckpt["state_dict"].values())
    if need > have:
        raise CheckpointError(f"{where}: state dict does not fit {name} with {kwargs}: that "
                              f"needs {need:,} values, the checkpoint stores {have:,}")
    model = models.create(name, **kwargs)
    if ckpt.get("quant") is not None:
        from .quant import QuantSpec, quantize

        try:
            model = quantize(model, QuantSpec.from_dict(ckpt["quant"]), copy_weights=False)
        except (LowbitError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: its quantization spec cannot be applied: "
                                  f"{_first_line(exc)}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: state dict does not fit {name}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint file and build its model: ``(model, checkpoint dict)``."""
    ckpt = load(path)
    return build(ckpt, str(path)), ckpt
