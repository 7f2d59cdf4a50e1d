"""QONNX: Brevitas' own QONNX export of the student, cleaned by qonnx, run by qonnx.

QONNX keeps quantizers as ``Quant`` nodes (scale, zero point, bit width per tensor), the
format FINN and other dataflow compilers read; it stores weights as float32, so it is the
interchange file, not the small one (that is the standard ONNX export).

qonnx runs standard nodes one by one in onnxruntime, in models that ``onnx.helper.make_model``
stamps with ``onnx.IR_VERSION`` (14 with onnx 1.23), which onnxruntime loads from 1.32: the
``train`` extra pins that pair, so the file runs in qonnx's own ``execute_onnx`` and
``inference_cost`` as any qonnx user calls them, with nothing patched.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import numpy_helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from .. import _intmath
from .. import _onnx_meta as meta
from ._rewrites import ExportError

ORT_MAX_IR = 13  # the file's own IR version: onnxruntime >= 1.24 (pyproject's floor) loads it


class SnapWeightsToCodes(Transformation):
    """Store each quantized weight as ``int_weight * scale`` in front of its weight ``Quant``.

    Brevitas exports the float weight and a Quant node that rounds ``w / scale``; for TWN
    ternary weights the threshold is 0.7 E|w|, not scale / 2, so rounding the float weight
    gives other codes. Stored as codes times scale, the Quant node reproduces the codes.
    Run on Brevitas' export before qonnx's cleanup renames it: each layer's weight is the
    initializer named by its module path (``<layer>.weight``).
    """

    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = layers

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        inits = {t.name: t for t in model.graph.initializer}
        for info in self.layers:
            name = info.name + ".weight"
            if name not in inits:
                raise ExportError(f"{info.name}: Brevitas' QONNX export has no weight {name}")
            snapped = _intmath.dequantize(info.int_weight.numpy(), info.scale.numpy())
            inits[name].CopyFrom(numpy_helper.from_array(snapped, name))  # in place: same order
        return model, False


def build_qonnx(student: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Brevitas ``export_qonnx`` of a baked ``student`` (``bake_integer_bias``: integer biases
    as plain float biases), qonnx's ``cleanup_model``, weights snapped."""
    from qonnx.util.cleanup import cleanup_model

    from ..quant import quant_layers

    with warnings.catch_warnings():  # import-time notes of Brevitas modules lowbit does not use
        warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
        warnings.filterwarnings("ignore", message="brevitas.fx is deprecated")
        from brevitas.export.onnx.qonnx.manager import QONNXManager

    class Manager(QONNXManager):
        # Brevitas' onnxoptimizer pass cannot parse IR-14 models and says so on stderr; qonnx's
        # cleanup below does its work (constants to initializers, unused tensors removed).
        run_onnx_passes = False

    buf = io.BytesIO()
    with torch.no_grad():
        try:  # Brevitas silences the exporter's own warnings (disable_warnings=True)
            Manager.export(student.eval(), args=example, export_path=buf, dynamo=False,
                           input_names=[meta.INPUT_NAME], output_names=[meta.OUTPUT_NAME])
        except Exception as exc:  # noqa: BLE001  (Brevitas raises many types; report one line)
            raise ExportError(f"Brevitas QONNX export failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    model = ModelWrapper(onnx.load_from_string(buf.getvalue()))
    model = model.transform(SnapWeightsToCodes(quant_layers(student)), cleanup=False)
    try:
        model = cleanup_model(model)
    except Exception as exc:  # noqa: BLE001  (qonnx folds constants in onnxruntime)
        raise ExportError(_qonnx_runtime_message(exc)) from None
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
        try:
            rows = [execute_onnx(model, {iname: x[i:i + 1].reshape(shape)})[oname]
                    for i in range(len(x))]
        except Exception as exc:  # noqa: BLE001  (onnxruntime's errors derive from Exception)
            raise ExportError(_qonnx_runtime_message(exc)) from None
        return np.concatenate(rows).reshape(len(x), -1)

    return run


def _qonnx_runtime_message(exc: Exception) -> str:
    """One line for qonnx failing in onnxruntime, naming the version pair when that is why."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "IR version" in text:
        text = "Unsupported model IR version" + text.split("Unsupported model IR version")[-1]
        return (f"qonnx runs nodes in IR-{onnx.IR_VERSION} models (onnx {onnx.__version__}) "
                f"that onnxruntime {ort.__version__} cannot load; install the versions "
                f"lowbit's train extra pins (onnxruntime>=1.32), or export --format onnx "
                f"({text})")
    return f"qonnx could not run the QONNX graph: {text[:200]}"
