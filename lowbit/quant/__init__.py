"""Quantization-aware students (Brevitas behind one adapter): ``quantize(model, spec)``
returns a torch.fx GraphModule whose quantizers are nodes; ``describe(student)`` tables per
layer the weight bits, input bits and the onnxruntime kernel that will run it.

``quant_layers`` / ``act_quants`` read a student back as integer codes and scales (the
exporter's contract, see ``_inspect``), ``weight_storages`` how the exporter stores them;
``calibrate`` (running mean of batch max) and
``calibrate_ranges`` / ``calibrate_data`` (max, percentile or MSE on batches or on any data,
see ``_calibrate``) set activation ranges for post-training quantization;
``bake_integer_bias`` folds the eval-mode integer-bias rounding (``IntegerBias`` nodes) into
plain biases for tracing.
"""

from ._brevitas import IntegerBias, bake_integer_bias
from ._calibrate import (
    CALIB_METHODS,
    PTQConfig,
    calibrate_data,
    calibrate_ranges,
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
from ._kernels import kernel_status
from ._quantize import calibrate, quantize
from ._spec import ACT_BITS, SCALE_RULES, WEIGHT_BITS, QuantSpec

__all__ = ["ACT_BITS", "CALIB_METHODS", "SCALE_RULES", "WEIGHT_BITS", "ActQuantInfo",
           "Description", "IntegerBias", "LayerDescription", "PTQConfig", "QuantLayerInfo",
           "QuantSpec", "act_quants", "bake_integer_bias", "calibrate", "calibrate_data",
           "calibrate_ranges", "calibration_batches", "describe", "kernel_status", "output_feed",
           "quant_layers", "quantize", "weight_storages"]
