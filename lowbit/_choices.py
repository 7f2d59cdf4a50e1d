"""The values lowbit's settings take, importable without torch: the library validates against
them and the command line offers them (and checks ``--bits`` before it loads anything)."""

from __future__ import annotations

WEIGHT_BITS = (2, 4, 8)  # 2 = ternary {-1, 0, +1} * alpha (narrow range)
ACT_BITS = (2, 4, 8)
MIN_DEFAULT_ACT_BITS = 4  # 2-bit activations cost far more accuracy than ternary weights
SCALE_RULES = ("twn", "learned")
CALIB_METHODS = ("max", "percentile", "mse")
SCHEMES = ("A", "B", "C")  # Apprentice: joint, frozen teacher + fresh student, from float weights
LOSSES = ("hinton", "apprentice")
GSLR_SHAPES = ("linear", "cosine")
SCHEDULES = ("cosine", "step")
OPTIMIZERS = ("sgd", "adamw")
VALIDATION_SIZE = 5000  # examples held out of the training data, at most a tenth of it
PRECISIONS = ("fp32", "bf16")
FORMATS = ("onnx", "qonnx")
WEIGHT_FORMS = ("cast", "dequant")
TERNARY_STORAGE = ("trits", "int")
RESIDUAL_ADDS = ("auto", "integer", "float")
INPUTS = ("float", "uint8")  # what an exported file takes: normalised floats or raw pixels
LAYOUTS = ("nchw", "nhwc")
LINEAR_KERNELS = ("qdq", "nbits")  # Linear layers as DequantizeLinear -> Gemm, or MatMulNBits


def default_act_bits(weight_bits: int) -> int:
    """Activation bits when only weight bits are named: as wide as the weights, at least 4
    (ternary -> 2/4, 4-bit -> 4/4, 8-bit -> 8/8, the "int8" W8A8 of other tools)."""
    return max(weight_bits, MIN_DEFAULT_ACT_BITS)
