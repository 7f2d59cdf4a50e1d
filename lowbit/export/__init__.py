"""Export a quantized student as packed standard ONNX (INT2/INT4 weights) and QONNX.

``export(model, path)`` writes verified files atomically; ``check_kernels(proto, inputs)``
proves a file's integer layers exact on every onnxruntime CPU (``_contract``); the packers
(``pack_int2`` ...) are torch-free and document the bit layouts; the graph rewrites live in
``_rewrites``, the raw-uint8-pixel input (``export(..., input="uint8")``) in ``_rawinput``.
The package is callable: ``lowbit.export(model, path, ...)`` is :func:`export`.
"""

import sys
import types

from .._backend import storage_for
from ._contract import KernelCheck, check_kernels
from ._export import (
    FORMATS,
    LINEAR_KERNELS,
    RESIDUAL_ADDS,
    TERNARY_STORAGE,
    WEIGHT_FORMS,
    ExportOptions,
    ExportResult,
    export,
    qonnx_path,
)
from ._nbits import NBits, pack_nbits, unpack_nbits
from ._notes import KINDS as NOTE_KINDS
from ._notes import Note
from ._pack import (
    make_tensor,
    pack_int2,
    pack_int4,
    pack_trits,
    read_tensor,
    unpack_int2,
    unpack_int4,
    unpack_trits,
)
from ._rewrites import ExportError
from ._verify import Thresholds, Verification

__all__ = ["FORMATS", "LINEAR_KERNELS", "NOTE_KINDS", "RESIDUAL_ADDS", "TERNARY_STORAGE",
           "WEIGHT_FORMS", "ExportError", "ExportOptions", "ExportResult", "KernelCheck", "NBits",
           "Note", "Thresholds", "Verification", "check_kernels", "export", "make_tensor",
           "pack_int2", "pack_int4", "pack_nbits", "pack_trits", "qonnx_path", "read_tensor",
           "storage_for", "unpack_int2", "unpack_int4", "unpack_nbits", "unpack_trits"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> ExportResult:
        return export(*args, **kwargs)

    __call__.__doc__ = export.__doc__


sys.modules[__name__].__class__ = _CallablePackage
