"""Quantization-aware students (Brevitas behind one adapter): ``quantize(model, spec)``
returns a torch.fx GraphModule whose quantizers are nodes (``trace(model)``: the float graph
it starts from); ``describe(student)`` tables per
layer the weight bits, input bits and the onnxruntime kernel that will run it.

``quant_layers`` / ``act_quants`` read a student back as integer codes and scales (the
exporter's contract, see ``_inspect``), ``weight_storages`` how the exporter stores them;
``calibrate(student, batches, method)`` sets activation ranges by a calibration method
registered by name (``CALIBRATORS``: mean-max, max, percentile, MSE; see ``_calibrate``),
``calibrate_data`` does so on any data as a ``PTQConfig`` says;
``fake_quant`` is the quantizers' eval-mode rounding (the exporter traces it);
``bake_integer_bias`` folds the eval-mode integer-bias rounding (``IntegerBias`` nodes) into
plain biases for tracing.
"""

from ._brevitas import IntegerBias, bake_integer_bias
from ._calibrate import (
    CALIB_METHODS,
    CALIBRATORS,
    Observer,
    PTQConfig,
    calibrate,
    calibrate_data,
    calibration_batches,
)
from ._describe import Description, LayerDescription, describe
from ._inspect import (
    ActQuantInfo,
    QuantLayerInfo,
    act_quants,
    output_feed,
    quant_layers,
    weight_storages,
)
from ._kernels import fake_quant, kernel_status
from ._quantize import quantize, trace
from ._spec import ACT_BITS, SCALE_RULES, WEIGHT_BITS, QuantSpec

__all__ = ["ACT_BITS", "CALIBRATORS", "CALIB_METHODS", "SCALE_RULES", "WEIGHT_BITS",
           "ActQuantInfo", "Description", "IntegerBias", "LayerDescription", "Observer",
           "PTQConfig", "QuantLayerInfo", "QuantSpec", "act_quants", "bake_integer_bias",
           "calibrate", "calibrate_data", "calibration_batches", "describe", "fake_quant",
           "kernel_status", "output_feed", "quant_layers", "quantize", "trace", "weight_storages"]
