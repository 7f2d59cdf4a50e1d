"""lowbit: float PyTorch model -> ternary / 4-bit student (QAT + distillation) -> packed ONNX.

The public API is imported lazily, so ``import lowbit.runtime`` (the edge runtime) never
pulls in torch. ``lowbit.export``, ``lowbit.distill`` and ``lowbit.footprint`` are functions;
their packages' other names are imported from them (``from lowbit.export import NBits``).
"""

from __future__ import annotations

import importlib

from ._lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "train": "lowbit.distill",
    "evaluate": "lowbit.distill",
    "TrainConfig": "lowbit.distill",
    "distill": "lowbit.distill",
    "KDConfig": "lowbit.distill",
    "GSLR": "lowbit.distill",
    "student_for": "lowbit.distill",
    "quantize": "lowbit.quant",
    "QuantSpec": "lowbit.quant",
    "footprint": "lowbit.footprint",
    "export": "lowbit.export",
    "Session": "lowbit.runtime",
    "convert_ort": "lowbit.runtime",
    "load_model": "lowbit._checkpoint",
    "save_checkpoint": "lowbit._checkpoint",
    "save": "lowbit._checkpoint",
    "load": "lowbit._checkpoint",
    "LowbitError": "lowbit.errors",
}
_RENAMED = {"save_checkpoint": "save", "save": "save_model", "load": "restore"}

__all__ = ["__version__", *sorted(_API)]
__getattr__, __dir__ = lazy_names(__name__, {name: f"{module}:{_RENAMED.get(name, name)}"
                                             for name, module in _API.items()})

# lowbit.distill, lowbit.export and lowbit.footprint are functions named after their packages.
# The import system binds a package to its parent's attribute when it first loads it, so the
# three (light: their names resolve lazily) are loaded here and their bindings dropped: a later
# ``import lowbit.export`` finds the package loaded and leaves ``lowbit.export`` the function,
# which __getattr__ resolves on first use.
for _package in ("distill", "export", "footprint"):
    importlib.import_module(f"{__name__}.{_package}")
    del globals()[_package]
del _package
