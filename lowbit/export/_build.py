"""Build the packed standard-ONNX graph of a baked student, carrying identities.

The student traced in plain torch (``_trace``), then the rewrites of ``_rewrites`` (fold
BatchNorm, pack weights, lower activation quantizers, set the opset, shorten names). What the
exporter knows by name is carried through, never found again by value: each layer's packed
weight keeps the layer's name, each quantizer's stored codes are the tensor
:class:`Built.codes` names (``QuantizeActivations`` made it, ``ShortenNames`` renamed it), and
the gate's output step is read from the layer and quantizer the student's graph connects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn as nn
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.general import RemoveStaticGraphInputs

from .. import _intmath
from .. import _onnx_meta as meta
from .._backend import DEFAULT_OPSET
from ..quant import QuantLayerInfo
from ._rewrites import (
    DropDefaultAttributes,
    ExportError,
    FoldBatchNorm,
    FoldWeightTransposes,
    PackWeights,
    QuantizeActivations,
    QuantizeBias,
    SetOpset,
    ShareConstants,
    ShortenNames,
)
from ._trace import TRACE_OPSET, Act, shadow, trace


@dataclass(frozen=True)
class Built:
    """A packed graph (unverified, no metadata) and what the exporter knows about it:
    ``storage`` per layer, the student's ``layers`` and ``acts`` (module order), ``codes``
    (quantizer name -> ONNX tensor of its stored codes) and the gate's output ``step`` per
    class (:func:`output_step`)."""

    proto: onnx.ModelProto
    storage: dict[str, str]
    layers: tuple[QuantLayerInfo, ...]
    acts: tuple[Act, ...]
    codes: dict[str, str]
    step: np.ndarray


def student_acts(student: nn.Module) -> tuple[Act, ...]:
    """The student's activation quantizers as the exporter's :class:`Act` (numpy values)."""
    from ..quant import act_quants

    return tuple(Act(a.name, a.bits, a.signed, a.scale.detach().float().numpy(),
                     a.zero_point.detach().numpy().round().astype(np.int64))
                 for a in act_quants(student))


def output_step(student: nn.Module, layers, acts) -> np.ndarray:
    """Output step per class: s_a * max_j |W[c, j]| of the last layer in forward order, s_a the
    scale of the quantizer feeding it (1 without one; see ``_verify``)."""
    from ..quant import output_feed

    name, feed = output_feed(student)
    last = next(info for info in layers if info.name == name)
    w = _intmath.dequantize(last.int_weight.numpy(), last.scale.numpy(), dtype=np.float64)
    scales = {a.name: a.scale for a in acts}
    s_a = float(np.max(scales[feed])) if feed is not None else 1.0
    return np.maximum(np.abs(w).reshape(len(w), -1).max(1) * s_a, np.finfo(np.float32).tiny)


def _pack(student: nn.Module, layers, acts, opset: int, weight_form: str,
          ternary_storage: str, example: torch.Tensor) -> tuple[ModelWrapper, dict, dict]:
    """The traced graph with BatchNorm folded, weights packed and quantizers lowered; the
    storage per layer and the quantizers' code tensors (names not yet shortened)."""
    from ..quant import weight_storages

    traced = trace(shadow(student, layers, acts), example, min(opset, TRACE_OPSET))
    params = {t.name for t in traced.graph.initializer}
    missing = [info.name for info in layers if info.name + ".weight" not in params]
    if missing:
        raise ExportError(f"{missing[0]}: weight not found in the traced graph")
    scales = {a.name: a.scale for a in acts}
    bias_inputs = {info.name + ".weight": np.float32(scales[info.bias_input])
                   for info in layers if info.bias_input is not None}
    fold, lower, transposes = FoldBatchNorm(), QuantizeActivations(), \
        FoldWeightTransposes(frozenset(info.name + ".weight" for info in layers))
    model = ModelWrapper(traced)
    for rewrite in (RemoveStaticGraphInputs(), fold, transposes):
        model = model.transform(rewrite)
    # a Linear over more than two dims runs as an integer MatMul: the overflow rule applies
    storage = weight_storages(student, opset, ternary_storage, integer_linear={
        name.removesuffix(".weight") for name in transposes.transposed})
    codes = {}
    for info in layers:
        q = info.int_weight.detach().numpy()
        wname = info.name + ".weight"  # the MatMul reads W.T: codes [in, out] too
        codes[wname] = (np.ascontiguousarray(q.T) if wname in transposes.transposed else q,
                        storage[info.name], info.scale.detach().numpy())
    for rewrite in (PackWeights(codes, fold.factors, cast=weight_form == "cast"),
                    QuantizeBias(bias_inputs), lower, SetOpset(opset, min(opset, TRACE_OPSET))):
        model = model.transform(rewrite)
    return model, storage, lower.codes


def build_onnx(student: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
               weight_form: str = "cast", ternary_storage: str = "trits") -> Built:
    """The packed standard-ONNX graph of a baked ``student`` (``bake_integer_bias``: no
    eval-mode hooks to trace), unverified and without metadata (:class:`Built`). Residual
    adds stay ``Add``."""
    from ..quant import quant_layers

    layers = tuple(quant_layers(student))
    if not layers:
        raise ExportError("the student has no quantized conv/linear layer")
    acts = student_acts(student)
    model, storage, codes = _pack(student, layers, acts, opset, weight_form, ternary_storage,
                                  example)
    keep = frozenset([*storage, meta.TRITS_TABLE])  # layer-named weights, the shared trit table
    shorten = ShortenNames(keep)
    for rewrite in (ShareConstants(), DropDefaultAttributes(), shorten):
        model = model.transform(rewrite, cleanup=False)  # cleanup would un-share constants
    proto = model.model
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}"
                          ) from None
    codes = {name: shorten.renamed.get(t, t) for name, t in codes.items()}
    return Built(proto, storage, layers, acts, codes, output_step(student, layers, acts))
