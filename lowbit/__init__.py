"""lowbit: float PyTorch model -> ternary / 4-bit student (QAT + distillation) -> packed ONNX.

The public API is imported lazily, so ``import lowbit.runtime`` (the edge runtime) never
pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(_API[name])
        # A name that is its module's own (lowbit.distill, a callable package) is the module.
        own = module.__name__ == f"{__name__}.{name}"
        value = module if own else getattr(module, _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
