"""Models from checkpoints: ``lowbit.load`` / ``load_model`` build the model a checkpoint
file (``_ckptfile``) describes, ``lowbit.save`` records how to rebuild one.

Above both the file format and the model zoo (``lowbit.models`` imports this module only
inside its pretrained functions, this module only the zoo's registry), so the dependency goes
one way. The file-format names are re-exported here for the modules that read and write
checkpoints.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._ckptfile import (
    FORMAT,
    UNKNOWN_DATA,
    VERSION,
    arch_of,
    check_data,
    check_resume,
    data_info,
    first_line,
    importable,
    load,
    misfit,
    save,
    shapes,
)
from .errors import CheckpointError, LowbitError, UsageError
from .models import registry

__all__ = ["FORMAT", "UNKNOWN_DATA", "VERSION", "CheckpointError", "arch_of", "build",
           "check_data", "check_resume", "data_info", "importable", "load", "load_model",
           "named_arch", "restore", "save", "save_model"]


def named_arch(model: nn.Module, name: str | None, kwargs: dict[str, Any] | None
               ) -> dict[str, Any]:
    """The arch ``model`` was built by, as the user names it (``name``: a registered model or
    ``package.module:factory``; unset: its own, see :func:`arch_of`), checked on the meta
    device to rebuild its tensors."""
    own = arch_of(model)
    arch = {"name": name or own["name"],
            "kwargs": dict(kwargs) if kwargs is not None else {} if name else own["kwargs"]}
    if arch["kwargs"] is None:
        return arch
    why = misfit(registry.factory(arch["name"]), arch["kwargs"], shapes(model.state_dict()),
                  exact=getattr(model, "lowbit_quant", None) is None)
    if why is not None:
        raise UsageError(f"arch {arch['name']} with {arch['kwargs']} does not rebuild this "
                         f"model: {why}; name the factory and the arguments it was built with")
    return arch


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


def _architecture(ckpt: dict[str, Any], allow: Collection[str], expect: str | None,
                  arch_kwargs: dict[str, Any] | None, where: str) -> nn.Module:
    """The float model a checkpoint's ``arch`` names, imported only if the user named it.

    The architecture is first built on the meta device (no memory): one that needs more
    values than the checkpoint stores (e.g. a crafted width) is refused before allocating.
    """
    name, kwargs = ckpt["arch"]["name"], ckpt["arch"]["kwargs"]
    if expect is not None and name != expect:
        if importable(name):
            raise CheckpointError(f"{where}: holds a {name} model, not {expect}; pass --arch "
                                  f"{name} (or the checkpoint of a {expect})")
        name, kwargs = expect, None  # saved as a class no import reaches: the user names it
    if registry.is_user_code(name) and name not in allow:
        fix = (f"pass --arch {name} if you trust it" if importable(name) else
               "it cannot be imported by that name: pass --arch package.module:factory naming "
               "the code that builds its float model")
        raise CheckpointError(f"{where}: names user code {name!r}, which lowbit imports only "
                              f"when you name it: {fix} (Python: lowbit.load(path, model=...))")
    kwargs = arch_kwargs if arch_kwargs is not None else kwargs
    if kwargs is None:
        kwargs = _default_kwargs(ckpt, name, where)
    try:  # the recorded arguments against the factory's signature: the file's fault, or not
        inspect.signature(registry.factory(name)).bind(**kwargs)
        with torch.device("meta"):
            probe = registry.create(name, **kwargs)
    except (LowbitError, TypeError) as exc:  # TypeError: bind's (a bug's goes through)
        raise CheckpointError(f"{where}: cannot build its architecture {name!r} with "
                              f"{kwargs}: {first_line(exc)}") from None
    need = sum(t.numel() for t in probe.state_dict().values())
    have = sum(t.numel() for t in ckpt["state_dict"].values())
    if need > have:
        raise CheckpointError(f"{where}: state dict does not fit {name} with {kwargs}: that "
                              f"needs {need:,} values, the checkpoint stores {have:,}")
    return registry.create(name, **kwargs)


def _default_kwargs(ckpt: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    """``{}`` when ``name``'s defaults rebuild the checkpoint's tensors (a model saved with
    unknown arguments), else a CheckpointError naming the arguments to pass."""
    factory = registry.factory(name)
    why = misfit(factory, {}, shapes(ckpt["state_dict"]), exact=ckpt.get("quant") is None)
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
                                  f"{first_line(exc)}") from None
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
