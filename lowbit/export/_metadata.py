"""The metadata an exported file carries (``lowbit._onnx_meta`` names the keys): the spec, the
storage per layer, the classes and normalisation, the gate's results and the arithmetic
guarantee, compact JSON (metadata counts in the file size)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import onnxruntime as ort
import torch.nn as nn

from .. import __version__
from .. import _onnx_meta as meta
from .._backend import cpu_features
from ._contract import KernelCheck
from ._verify import Verification


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))  # compact: metadata counts in the file size


def _layer_table(layers) -> list[list]:
    """Per conv/linear, in the order of the storage metadata's layer names (forward order):
    [weight bits, input code bits or None (float input), 1 if an integer kernel else 0]."""
    return [[r.weight_bits, r.input_bits, int(r.integer)] for r in layers
            if r.weight_bits is not None]


def _kernel_record(contract: Sequence[KernelCheck]) -> dict[str, Any]:
    """The file's arithmetic guarantee (``meta.KERNELS``)."""
    pairs = [c.bound.pair for c in contract if c.bound.pair is not None]
    return {"exact": all(c.passed for c in contract), "layers": len(contract),
            "pair": max(pairs, default=None),
            "int32": max((c.bound.int32 for c in contract), default=0),
            "cpu": cpu_features(), "onnxruntime": ort.__version__}


def metadata(student: nn.Module, data: dict[str, Any], storage: dict[str, str],
             verification: list[Verification], num_classes: int,
             layers=(), contract: Sequence[KernelCheck] = ()) -> dict[str, str]:
    """The file's metadata properties (``lowbit._onnx_meta`` keys -> compact JSON)."""
    spec = student.lowbit_quant
    classes = data.get("classes") or [str(i) for i in range(num_classes)]
    return {meta.VERSION: __version__, meta.WEIGHT_BITS: _json(spec.weight_bits),
            meta.LAYERS: _json(_layer_table(layers)),
            meta.ACT_BITS: _json(spec.act_bits),
            meta.QUANT_SPEC: _json(spec.to_dict()), meta.STORAGE: _json(storage),
            meta.CLASSES: _json(list(classes)), meta.MEAN: _json(data["mean"]),
            meta.STD: _json(data["std"]),
            meta.INPUT_SHAPE: _json(list(data["input_shape"])),
            meta.ARCH: _json(getattr(student, "lowbit_arch", None)),
            meta.VERIFICATION: _json([v.to_dict() for v in verification]),
            meta.KERNELS: _json(_kernel_record(contract))}



def form_metadata(storage: dict[str, str], linear: dict[str, Any], input: str,  # noqa: A002
                  layout: str) -> dict[str, str]:
    """The ONNX file's metadata about its forms: MatMulNBits layers (``linear``: their storage,
    kernel and gate) and raw-pixel input; none for the default float-input QDQ file."""
    props = {}
    if linear:
        props[meta.STORAGE] = _json({**storage, **linear["storage"]})
        props[meta.LINEAR] = _json(linear)
    if input == "uint8":  # absent: normalised float32 NCHW
        props[meta.INPUT] = _json({"dtype": "uint8", "layout": layout})
    return props
