"""Self-describing checkpoints that load with ``torch.load(weights_only=True)``.

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

import inspect
import io
import math
import numbers
import pickle
import warnings
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from ._io import atomic_write
from .errors import CheckpointError, DataError, LowbitError, TrainingError, UsageError

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


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _misfit(factory: Callable[..., nn.Module], kwargs: dict[str, Any],
            stored: dict[str, tuple[int, ...]], exact: bool) -> str | None:
    """Why ``factory(**kwargs)``, built on the meta device (no memory, no random draws), does
    not hold the tensors ``stored`` (name -> shape; ``exact``: no more, no fewer; else a
    student's, which adds its quantizers'), or None when it does."""
    try:
        with torch.device("meta"):
            probe = factory(**kwargs)
        made = _shapes(probe.state_dict())
    except Exception as exc:  # noqa: BLE001  (any failure of user code: not rebuildable)
        return _first_line(exc)
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
        and _misfit(cls, {}, _shapes(model.state_dict()), exact=True) is None
    return {"name": name, "kwargs": {} if fits else None}


def named_arch(model: nn.Module, name: str | None, kwargs: dict[str, Any] | None
               ) -> dict[str, Any]:
    """The arch ``model`` was built by, as the user names it (``name``: a registered model or
    ``package.module:factory``; unset: its own, see :func:`arch_of`), checked on the meta
    device to rebuild its tensors."""
    from . import models

    own = arch_of(model)
    arch = {"name": name or own["name"],
            "kwargs": dict(kwargs) if kwargs is not None else {} if name else own["kwargs"]}
    if arch["kwargs"] is None:
        return arch
    why = _misfit(models.factory(arch["name"]), arch["kwargs"], _shapes(model.state_dict()),
                  exact=getattr(model, "lowbit_quant", None) is None)
    if why is not None:
        raise UsageError(f"arch {arch['name']} with {arch['kwargs']} does not rebuild this "
                         f"model: {why}; name the factory and the arguments it was built with")
    return arch


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
    buffer = io.BytesIO()  # serialised first: a full disk is then Python's OSError (ENOSPC),
    torch.save(ckpt, buffer)  # where torch's own file writer raises a RuntimeError
    return atomic_write(path, lambda p: p.write_bytes(buffer.getbuffer()))


def save_model(model: nn.Module, path: str | Path, *, data: Any = None,
               record: dict[str, Any] | None = None, arch: str | None = None,
               arch_kwargs: dict[str, Any] | None = None) -> Path:
    """``lowbit.save``: write any model (float or student) as a lowbit checkpoint.

    ``data``: what it takes (a dataset or anything ``lowbit.data.as_data`` takes; recorded as
    its input shape, classes and normalisation); ``record``: anything JSON-like to keep.
    ``arch``/``arch_kwargs``: the factory (``package.module:factory`` or a registered name)
    and arguments that build its float model, when they are not its class and defaults
    (checked to rebuild its tensors; ``lowbit-export`` then needs only ``--arch``).
    """
    info = UNKNOWN_DATA if data is None else data_info(data)
    known = arch_of(model) if arch is None and arch_kwargs is None else \
        named_arch(model, arch, arch_kwargs)
    return save(path, model, data=info, record=record or {}, arch=known)


def restore(path: str | Path, model: nn.Module | None = None, *,
            allow: Collection[str] = ()) -> nn.Module:
    """``lowbit.load``: the model of checkpoint ``path`` (or a shipped checkpoint's name),
    with its weights, in eval mode.

    A registered lowbit architecture is rebuilt by name. A checkpoint that names user code
    (``mypkg.nets:small_cnn``) is rebuilt only if that name is in ``allow``; otherwise pass
    ``model`` (an instance of the float architecture; a student's quantization is applied
    from the checkpoint) and it is filled in.
    """
    return load_model(path, model=model, allow=allow)[0]


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; any problem is one :class:`CheckpointError` line."""
    from . import models

    path = models.locate(path)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _architecture(ckpt: dict[str, Any], allow: Collection[str], expect: str | None,
                  arch_kwargs: dict[str, Any] | None, where: str) -> nn.Module:
    """The float model a checkpoint's ``arch`` names, imported only if the user named it.

    The architecture is first built on the meta device (no memory): one that needs more
    values than the checkpoint stores (e.g. a crafted width) is refused before allocating.
    """
    from . import models

    name, kwargs = ckpt["arch"]["name"], ckpt["arch"]["kwargs"]
    if expect is not None and name != expect:
        if importable(name):
            raise CheckpointError(f"{where}: holds a {name} model, not {expect}; pass --arch "
                                  f"{name} (or the checkpoint of a {expect})")
        name, kwargs = expect, None  # saved as a class no import reaches: the user names it
    if models.is_user_code(name) and name not in allow:
        fix = (f"pass --arch {name} if you trust it" if importable(name) else
               "it cannot be imported by that name: pass --arch package.module:factory naming "
               "the code that builds its float model")
        raise CheckpointError(f"{where}: names user code {name!r}, which lowbit imports only "
                              f"when you name it: {fix} (Python: lowbit.load(path, model=...))")
    kwargs = arch_kwargs if arch_kwargs is not None else kwargs
    if kwargs is None:
        kwargs = _default_kwargs(ckpt, name, where)
    try:  # the recorded arguments against the factory's signature: the file's fault, or not
        inspect.signature(models.factory(name)).bind(**kwargs)
        with torch.device("meta"):
            probe = models.create(name, **kwargs)
    except (LowbitError, TypeError) as exc:  # TypeError: bind's (a bug's goes through)
        raise CheckpointError(f"{where}: cannot build its architecture {name!r} with "
                              f"{kwargs}: {_first_line(exc)}") from None
    need = sum(t.numel() for t in probe.state_dict().values())
    have = sum(t.numel() for t in ckpt["state_dict"].values())
    if need > have:
        raise CheckpointError(f"{where}: state dict does not fit {name} with {kwargs}: that "
                              f"needs {need:,} values, the checkpoint stores {have:,}")
    return models.create(name, **kwargs)


def _default_kwargs(ckpt: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """``{}`` when ``name``'s defaults rebuild the checkpoint's tensors (a model saved with
    unknown arguments), else a CheckpointError naming the arguments to pass."""
    from . import models

    factory = models.factory(name)
    why = _misfit(factory, {}, _shapes(ckpt["state_dict"]), exact=ckpt.get("quant") is None)
    if why is None:
        return {}
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        params = []
    required = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    optional = [f"{p.name}={p.default!r}" for p in params if p.default is not p.empty]
    wanted = "; ".join(part for part in (f"required: {', '.join(required)}" if required else "",
                                         f"defaults: {', '.join(optional)}" if optional else "")
                       if part)
    raise CheckpointError(f"{where}: the {name} model was built with arguments lowbit cannot "
                          f"infer (its defaults do not fit: {why}); pass --arch-kwargs with a "
                          f"JSON object of them ({wanted or 'none declared'}) (Python: "
                          f"lowbit.load(path, model=...))")


def build(ckpt: dict[str, Any], *, model: nn.Module | None = None, allow: Collection[str] = (),
          expect: str | None = None, arch_kwargs: dict[str, Any] | None = None,
          where: str = "checkpoint") -> nn.Module:
    """The model a loaded checkpoint describes, with its weights, in eval mode.

    ``model``: the float architecture to fill in (it takes the checkpoint's arch, when that is
    known), else rebuilt from ``arch`` (see :func:`_architecture`: ``allow`` lists the
    user-code names the user passed, ``expect`` the architecture the user said it is,
    ``arch_kwargs`` replace the recorded arguments).
    """
    given = model is not None
    if model is None:
        model = _architecture(ckpt, allow, expect, arch_kwargs, where)
    if ckpt.get("quant") is not None and getattr(model, "lowbit_quant", None) is None:
        from .quant import QuantSpec, quantize

        try:  # from_dict reads the file's dict (TypeError: a malformed field)
            spec = QuantSpec.from_dict(ckpt["quant"])
            model = quantize(model, spec, copy_weights=False)
        except (LowbitError, TypeError) as exc:
            raise CheckpointError(f"{where}: its quantization spec cannot be applied: "
                                  f"{_first_line(exc)}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: state dict does not fit {ckpt['arch']['name']}: "
                              f"{str(exc).splitlines()[0]}") from None
    arch = ckpt["arch"]
    if given and arch["kwargs"] is not None and importable(arch["name"]):
        model.lowbit_arch = dict(arch)  # it travels on: quantize, distill, save, export
    return model.eval()


def load_model(path: str | Path, *, model: nn.Module | None = None,
               allow: Collection[str] = (), expect: str | None = None,
               arch_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint file and build its model: ``(model, checkpoint dict)`` (see
    :func:`build` for the keywords)."""
    ckpt = load(path)
    return build(ckpt, model=model, allow=allow, expect=expect, arch_kwargs=arch_kwargs,
                 where=str(path)), ckpt
