"""What an export starts from: the student, the data facts for the metadata, the gate's inputs.

A quantized student is exported as trained (its ``QuantSpec`` must match what was asked); a
float model is quantized post-training first (``lowbit.quant``, calibrated as ``PTQConfig``
says), with a :class:`~lowbit.export._notes.Note` saying so. The gate runs on the given data
(normalised as the model's data says) or on ``RANDOM_INPUTS`` N(0, 1) inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from .. import _onnx_meta as meta
from .. import _pixels
from ..quant import PTQConfig
from ._notes import PTQ, Note
from ._rewrites import ExportError
from ._verify import RANDOM

RANDOM_INPUTS = 256
Feed = Callable[[np.ndarray], np.ndarray] | None  # normalised inputs -> what the file takes


def data_facts(data: Any, example: torch.Tensor | None) -> dict[str, Any]:
    """Metadata about the inputs: a ``lowbit.data.Dataset``, a checkpoint's data dict or None."""
    if data is not None and not isinstance(data, dict):
        from .._checkpoint import data_info

        data = data_info(data)
    if data is None:
        if example is None:
            raise ExportError("give example_input (or data) so the input shape is known")
        # normalisation unknown: the file takes inputs as they are (none recorded)
        data = {"name": "unknown", "classes": None, "mean": None, "std": None,
                "input_shape": list(example.shape[1:])}
    return data


def student_of(model: nn.Module, bits: int | None, calib: Any, act_bits: int | None,
               layer_bits: dict[str, Any], ptq: PTQConfig, data: dict[str, Any],
               progress: bool) -> tuple[nn.Module, list[Note]]:
    """The model as a quantized student: as trained, or post-training quantized to ``bits``
    (``layer_bits``: QuantSpec's first_bits / last_bits / overrides)."""
    from ..data import stats_of
    from ..quant import QuantSpec, calibrate_data, quantize

    spec = getattr(model, "lowbit_quant", None)
    if spec is not None:
        asked = QuantSpec(**{**spec.to_dict(), **layer_bits})
        for key in layer_bits:
            if getattr(asked, key) != getattr(spec, key):
                raise ExportError(f"the model is a student trained with {key} = "
                                  f"{getattr(spec, key)} but {getattr(asked, key)} was asked; "
                                  f"export it as trained or distill another student")
        if bits is not None and bits != spec.weight_bits:
            raise ExportError(f"the model is a {spec.weight_bits}-bit student but {bits}-bit "
                              f"export was asked; export it at {spec.weight_bits} bits (drop "
                              f"--bits) or distill a {bits}-bit student")
        if act_bits is not None and act_bits != spec.act_bits:
            raise ExportError(f"the model is a student with {spec.act_bits}-bit activations "
                              f"but {act_bits} were asked; export it as trained (--bits "
                              f"{spec.weight_bits}/{spec.act_bits}, or drop --bits)")
        return model.eval(), []
    if bits is None:
        raise ExportError("the model is a float model: give bits (2 = ternary, 4 or 8) to "
                          "quantize it post-training")
    if calib is None:
        raise ExportError("post-training quantization of a float model needs calibration "
                          "data (calib=...)")
    spec = QuantSpec(weight_bits=bits, **({} if act_bits is None else {"act_bits": act_bits}),
                     **layer_bits)
    student, n = calibrate_data(quantize(model, spec), calib, ptq, stats_of(data), progress)
    note = (f"float model quantized post-training to {bits}-bit weights and {spec.act_bits}-bit "
            f"activations ({ptq.method} calibration on {n} examples); expect an accuracy "
            f"drop, 'lowbit distill' (quantization-aware training) recovers it")
    return student, [Note(PTQ, note)]


def verify_inputs(verify: Any, example: torch.Tensor, data: dict[str, Any],
                  pixels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(normalised float inputs, labels or None, source name) for the gate; user data is
    normalised as the model's ``data`` says. ``pixels``: random inputs are random uint8
    pixels, normalised (a raw-pixel-input file is fed those pixels)."""
    if verify is None:
        gen = torch.Generator().manual_seed(0)
        shape = (RANDOM_INPUTS, *example.shape[1:])
        if pixels:
            drawn = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()
            return torch.from_numpy(_pixels.normalize(drawn, data["mean"], data["std"])), \
                None, RANDOM
        return torch.randn(shape, generator=gen), None, RANDOM
    if isinstance(verify, torch.Tensor):
        return verify.float(), None, "given"
    from ..data import as_data, stats_of

    verify = as_data(verify, stats=stats_of(data))
    xs, ys = zip(*verify.loader(RANDOM_INPUTS), strict=True)
    return torch.cat(xs), torch.cat(ys), verify.name


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` against ``labels``."""
    return float((torch.as_tensor(logits).argmax(1) == labels).float().mean())


def onnx_runner(proto: onnx.ModelProto, optimization: str, config: dict | None = None,
                feed: Feed = None):
    """``x -> logits`` in onnxruntime: "basic" runs float kernels (the graph's reference
    semantics), "all" the integer kernels it fuses (what ``lowbit.runtime`` runs), with the
    session ``config`` entries the file asks for (``meta.LINEAR``); ``feed``: what the file
    takes for the normalised inputs ``x`` (a raw-pixel-input file: pixels)."""
    from ..runtime import session_options

    sess = ort.InferenceSession(proto.SerializeToString(),
                                session_options(optimization=optimization, config=config),
                                providers=["CPUExecutionProvider"])
    feed = feed or (lambda x: x)
    return lambda x: sess.run([meta.OUTPUT_NAME], {meta.INPUT_NAME: feed(x)})[0]
