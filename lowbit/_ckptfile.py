"""The checkpoint file: self-describing dicts that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of strings, numbers, lists, dicts and tensors::

    format: "lowbit.checkpoint", version: 1, lowbit: the lowbit version that wrote it
    arch: {"name": "resnet20", "kwargs": {"num_classes": 10}}    # a registered model, or
          {"name": "mypkg.nets:small_cnn", "kwargs": {...}}       # user code (--arch), or
          {"name": "mypkg.nets:Net", "kwargs": {}}                # a class whose defaults fit
          {"name": "mypkg.nets:Net", "kwargs": None}              # arguments unknown
    quant: QuantSpec as a dict, or None for a float model
    data: {"name", "classes", "mean", "std", "input_shape"}   # what the model expects
    state_dict: the model's tensors
    record: training record (config, per-epoch history, final accuracy)
    resume: optimiser/scheduler/RNG state while training is unfinished (absent when done)

Nothing else is ever pickled, so loading a checkpoint can never run code, and building its
model never imports code the user did not name: a checkpoint naming user code is built only
when that name is passed again (``--arch``, ``allow=``) or the model itself is given
(``lowbit.load(path, model=...)``).
"""

from __future__ import annotations

import io
import math
import numbers
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from ._io import atomic_write
from ._shipped import locate
from .errors import CheckpointError, DataError, TrainingError

FORMAT = "lowbit.checkpoint"
VERSION = 1
MAX_INPUT_VALUES = 2**26  # C*H*W of one input image; a larger one is a crafted file


UNKNOWN_DATA = {"name": "unknown", "classes": None, "mean": None, "std": None,
                "input_shape": None}


def check_resume(path: str | Path, ckpt: dict[str, Any], model: nn.Module,
                 data: dict[str, Any], record: dict[str, Any]) -> None:
    """Refuse to continue the run saved in ``ckpt`` with settings that define another run.

    Compared: the architecture and its arguments (:func:`arch_of`), the quantization
    spec (weight/activation bits, scale rule...), the training data (``data_info``: dataset,
    classes, number of examples, i.e. ``--limit``) and every entry of ``record`` (training
    and distillation configs, teacher). A setting the checkpoint does not record (written by
    an older lowbit) is not compared, so older checkpoints still resume.
    """
    spec = getattr(model, "lowbit_quant", None)
    diffs = (_differences(ckpt["arch"], arch_of(model), "arch", strict=True)
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


def data_info(data: Any) -> dict[str, Any]:
    """What a model needs to know about its inputs (anything ``lowbit.data.as_data`` takes, or
    a checkpoint's data dict as it is)."""
    if isinstance(data, dict):
        return data
    from .data import as_data

    return as_data(data).info()


def check_data(ckpt: dict[str, Any], dataset: Any, model_name: str, data_name: str) -> None:
    """Refuse ``dataset`` if its input shape or class count differs from the checkpoint's."""
    from .data import as_data

    info, dataset = ckpt["data"], as_data(dataset)
    classes = info.get("classes")
    shape = info.get("input_shape")
    theirs = dataset.num_classes
    if (shape is not None and tuple(dataset.input_shape) != tuple(shape)) or \
            (classes and theirs is not None and theirs > len(classes)):
        raise DataError(f"{model_name} expects {info['name']} inputs "
                        f"{tuple(shape or ())} with {len(classes or ())} classes; "
                        f"{data_name} has {tuple(dataset.input_shape)}, {theirs} classes")


def importable(name: str) -> bool:
    """Whether the ``module:qualname`` a model was saved as can be imported by that name: not
    a script's ``__main__``, a class made inside a function, or torch.fx's generated class."""
    module, _, qualname = name.partition(":")
    return bool(module) and module != "__main__" and "<locals>" not in qualname \
        and not module.startswith("torch.fx")


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def misfit(factory: Callable[..., nn.Module], kwargs: dict[str, Any],
            stored: dict[str, tuple[int, ...]], exact: bool) -> str | None:
    """Why ``factory(**kwargs)``, built on the meta device (no memory, no random draws), does
    not hold the tensors ``stored`` (name -> shape; ``exact``: no more, no fewer; else a
    student's, which adds its quantizers'), or None when it does."""
    try:
        with torch.device("meta"):
            probe = factory(**kwargs)
        made = shapes(probe.state_dict())
    except Exception as exc:  # noqa: BLE001  (any failure of user code: not rebuildable)
        return first_line(exc)
    for key, shape in made.items():
        if stored.get(key) != shape:
            return f"it makes {key} {list(shape)}, the model has {list(stored.get(key, []))}"
    extra = sorted(stored.keys() - made.keys()) if exact else []
    return f"it lacks {extra[0]}" if extra else None


def arch_of(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``: what ``lowbit.models.create`` (or ``lowbit.load``, ``quantize``,
    ``lowbit.save(arch=)``) recorded, else its importable class with arguments ``{}`` when
    the class's defaults rebuild the same tensors, ``None`` (unknown) when they do not."""
    arch = getattr(model, "lowbit_arch", None)
    if arch is not None:
        return arch
    cls = type(model)
    name = f"{cls.__module__}:{cls.__qualname__}"
    fits = importable(name) and getattr(model, "lowbit_quant", None) is None \
        and misfit(cls, {}, shapes(model.state_dict()), exact=True) is None
    return {"name": name, "kwargs": {} if fits else None}


def save(path: str | Path, model: nn.Module, *, data: Any, record: dict[str, Any],
         resume: dict[str, Any] | None = None, arch: dict[str, Any] | None = None) -> Path:
    """Atomically write ``model`` (any module) as a checkpoint; ``data``: a data dict or the
    data itself (see :func:`data_info`); ``arch``: how to rebuild it (unset: :func:`arch_of`)."""
    arch = arch or arch_of(model)
    spec = getattr(model, "lowbit_quant", None)
    ckpt = {"format": FORMAT, "version": VERSION, "lowbit": __version__, "arch": arch,
            "quant": spec.to_dict() if spec is not None else None, "data": data_info(data),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "record": record}
    if resume is not None:
        ckpt["resume"] = resume
    return _write(path, ckpt)


def _write(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Atomically write the checkpoint dict ``ckpt``."""
    buffer = io.BytesIO()  # serialised first: a full disk is then Python's OSError (ENOSPC),
    torch.save(ckpt, buffer)  # where torch's own file writer raises a RuntimeError
    return atomic_write(path, lambda p: p.write_bytes(buffer.getbuffer()))


def add_to_record(path: str | Path, **entries: Any) -> Path:
    """Atomically add ``entries`` to the record of the checkpoint at ``path`` (a figure
    measured after training, such as the test accuracy), everything else as it was."""
    ckpt = load(path)
    ckpt["record"] = {**ckpt["record"], **entries}
    return _write(path, ckpt)


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; any problem is one :class:`CheckpointError` line."""
    path = locate(path)
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
    version = ckpt.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version}, written by lowbit "
                              f"{ckpt.get('lowbit', '?')}; this lowbit {__version__} reads "
                              f"version {VERSION} and older: upgrade lowbit "
                              f"(pip install -U lowbit)")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not "
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
    kwargs = arch.get("kwargs") if isinstance(arch, dict) else None
    need(isinstance(arch, dict) and isinstance(arch.get("name"), str)
         and (kwargs is None or (isinstance(kwargs, dict)
                                 and all(isinstance(k, str) for k in kwargs))),
         "'arch' must be {'name': str, 'kwargs': {str: value} or None}")
    need(isinstance(data, dict), "'data' must be a dict")
    missing = [k for k in ("name", "classes", "mean", "std", "input_shape") if k not in data]
    need(not missing, f"data lacks {', '.join(map(repr, missing))}")
    shape = data.get("input_shape")  # None: saved without data (lowbit.save)
    need(shape is None or (numbers_list(shape) and 1 <= len(shape) <= 4
                           and all(isinstance(d, int) and d >= 1 for d in shape)),
         f"data 'input_shape' must be 1 to 4 positive integers, found {shape!r}")
    need(shape is None or math.prod(shape) <= MAX_INPUT_VALUES,
         f"data 'input_shape' {shape} is larger than any input lowbit handles")
    need(isinstance(data.get("name"), str), "data 'name' must be a string")
    need(data.get("classes") is None or (isinstance(data["classes"], (list, tuple))
                                         and len(data["classes"]) >= 1),
         "data 'classes' must be a non-empty list (or None)")
    for key in ("mean", "std"):  # None: inputs used as they are (floats)
        need(data.get(key) is None or (shape is not None and numbers_list(data[key], shape[0])),
             f"data {key!r} must list one number per input channel (or be None)")
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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
