"""QONNX: Brevitas' own QONNX export of the student, cleaned by qonnx, run by qonnx.

QONNX keeps quantizers as ``Quant`` nodes (scale, zero point, bit width per tensor), the
format FINN and other dataflow compilers read; it stores weights as float32, so it is the
interchange file, not the small one (that is the standard ONNX export).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import torch
import torch.nn as nn
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from .. import _onnx_meta as meta
from ._rewrites import ExportError

ORT_MAX_IR = 13  # highest ONNX IR version the supported onnxruntime (1.2x-1.31) loads


@contextlib.contextmanager
def _ort_loadable_ir() -> Iterator[None]:
    """qonnx builds one-node models with ``onnx.helper.make_model``, which stamps
    ``onnx.IR_VERSION`` (14 with onnx 1.23) that onnxruntime refuses; cap it meanwhile."""
    saved = onnx.IR_VERSION
    onnx.IR_VERSION = min(saved, ORT_MAX_IR)
    try:
        yield
    finally:
        onnx.IR_VERSION = saved


class SnapWeightsToCodes(Transformation):
    """Store each quantized weight as ``int_weight * scale`` in front of its weight ``Quant``.

    Brevitas exports the float weight and a Quant node that rounds ``w / scale``; for TWN
    ternary weights the threshold is 0.7 E|w|, not scale / 2, so rounding the float weight
    gives other codes. Stored as codes times scale, the Quant node reproduces the codes.
    Layers are matched by weight shape and per-channel scale.
    """

    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = layers

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.get_nodes_by_op_type("Quant"):
            w, s = model.get_initializer(node.input[0]), model.get_initializer(node.input[1])
            if w is None or s is None or w.ndim < 2:
                continue
            for info in self.layers:
                scale = info.scale.detach().numpy()
                if tuple(info.int_weight.shape) == w.shape and s.size == scale.size and \
                        np.allclose(s.reshape(-1), scale, rtol=1e-6, atol=0):
                    snapped = (info.int_weight.numpy().astype(np.float32) *
                               s.reshape(-1, *[1] * (w.ndim - 1)).astype(np.float32))
                    model.set_initializer(node.input[0], snapped)
                    break
            else:
                raise ExportError(f"QONNX weight {node.input[0]} {w.shape} matches no "
                                  f"quantized layer of the student")
        return model, False


def build_qonnx(student: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Brevitas ``export_qonnx`` of a baked ``student`` (``bake_integer_bias``: integer biases
    as plain float biases), qonnx's ``cleanup_model``, weights snapped."""
    from brevitas.export import export_qonnx
    from qonnx.util.cleanup import cleanup_model

    from ..quant import quant_layers

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            export_qonnx(student.eval(), args=example, export_path=buf, dynamo=False,
                         input_names=[meta.INPUT_NAME], output_names=[meta.OUTPUT_NAME])
        except Exception as exc:  # noqa: BLE001  (Brevitas raises many types; report one line)
            raise ExportError(f"Brevitas QONNX export failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    with _ort_loadable_ir():
        model = cleanup_model(ModelWrapper(onnx.load_from_string(buf.getvalue())))
    model = model.transform(SnapWeightsToCodes(quant_layers(student)))
    model.model.ir_version = min(model.model.ir_version, ORT_MAX_IR)
    return model.model


def qonnx_runner(proto: onnx.ModelProto):
    """``x -> logits`` through qonnx's reference executor (``execute_onnx``)."""
    from qonnx.core.onnx_exec import execute_onnx

    model = ModelWrapper(proto)
    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    shape = model.get_tensor_shape(iname)

    def run(x: np.ndarray) -> np.ndarray:
        # the export has a fixed batch of 1 (qonnx cleanup fixes shapes): run row by row
        with _ort_loadable_ir():
            rows = [execute_onnx(model, {iname: x[i:i + 1].reshape(shape)})[oname]
                    for i in range(len(x))]
        return np.concatenate(rows).reshape(len(x), -1)

    return run
