"""Export a quantized student as packed standard ONNX (INT2/INT4 weights) and QONNX.

``export(model, path)`` writes verified files atomically; ``check_kernels(proto, inputs)``
proves a file's integer layers exact on every onnxruntime CPU (``_contract``); the packers
(``pack_int2`` ...) are torch-free and document the bit layouts; the graph rewrites live in
``_rewrites``, the raw-uint8-pixel input (``export(..., input="uint8")``) in ``_rawinput``.
``lowbit.export`` is the function :func:`export`; this package's names are imported from it
(``from lowbit.export import ExportOptions``) and resolved on first use, so importing it is
cheap.
"""

from .._lazy import lazy_names

_NAMES = {
    **dict.fromkeys(["FORMATS", "LINEAR_KERNELS", "RESIDUAL_ADDS", "TERNARY_STORAGE",
                     "WEIGHT_FORMS", "ExportOptions", "ExportResult", "export", "qonnx_path"],
                    "._export"),
    **dict.fromkeys(["KernelCheck", "check_kernels"], "._contract"),
    **dict.fromkeys(["NBits", "pack_nbits", "unpack_nbits"], "._nbits"),
    **dict.fromkeys(["make_tensor", "pack_int2", "pack_int4", "pack_trits", "read_tensor",
                     "unpack_int2", "unpack_int4", "unpack_trits"], "._pack"),
    **dict.fromkeys(["Thresholds", "Verification"], "._verify"),
    "NOTE_KINDS": "._notes:KINDS", "Note": "._notes",
    "ExportError": "lowbit.errors", "storage_for": "lowbit._backend",
}

__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_names(__name__, _NAMES)
