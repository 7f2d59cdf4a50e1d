"""Pieces the benchmark scripts share: the float ONNX and Brevitas baselines, writing results."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lowbit import _intmath
from lowbit._backend import cpu_features
from lowbit._io import atomic_write, write_json

# onnxruntime's own advice for its int8 models on x86 without VNNI (int16 pair saturation)
REDUCE_RANGE = cpu_features()["u8s8"] == "int16 pairs"


def float_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The float network as plain ONNX (the baseline onnxruntime runs in fp32), dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()


def brevitas_student(student: nn.Module) -> nn.Module:
    """A copy of ``student`` that Brevitas' exporters turn into a file computing what it
    computes: integer biases baked, and each weight stored as its codes x scale (Brevitas
    writes round(w / scale), while TWN thresholds at 0.7 E|w|; the snapped weights are a
    fixed point of TWN, which this checks)."""
    from lowbit import quant

    baked = quant.bake_integer_bias(student)
    layers = quant.quant_layers(baked)
    with torch.no_grad():
        for info in layers:
            baked.get_submodule(info.name).weight.copy_(torch.from_numpy(
                _intmath.dequantize(info.int_weight.numpy(), info.scale.numpy())))
    for a, b in zip(layers, quant.quant_layers(baked), strict=True):
        if not (torch.equal(a.int_weight, b.int_weight) and torch.allclose(a.scale, b.scale)):
            raise RuntimeError(f"{a.name}: snapping the weights changed its quantization")
    return baked


def brevitas_qcdq(ready: nn.Module, example: torch.Tensor) -> bytes:
    """Brevitas' QCDQ export (int8 weights, TorchScript exporter) of a student prepared by
    :func:`brevitas_student`, with a dynamic batch: ``input`` -> ``logits``."""
    import onnx
    from brevitas.export import export_onnx_qcdq

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # dynamic_axes fails inside Brevitas' TorchScript path: the batch is renamed below
        export_onnx_qcdq(ready.eval(), args=example, export_path=buf,
                         input_names=["input"], output_names=["logits"], dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model.SerializeToString()


def write_report(path: str | Path, report: dict[str, Any]) -> None:
    """``report`` as JSON, written atomically, with the machine it was measured on (CPU and
    the flags that pick onnxruntime's and torch's kernels: ``cpu_features``)."""
    write_json(path, {**report, "machine": {**cpu_features(),
                                             "logical_cpus": len(os.sched_getaffinity(0))}})


def save_results(stem: Path, report: dict[str, Any], markdown: str) -> None:
    """``stem``.json (every number) and ``stem``.md (the table), each written atomically."""
    write_report(stem.with_suffix(".json"), report)
    atomic_write(stem.with_suffix(".md"), lambda path: path.write_text(markdown))


def ort_int8(fp32: bytes, tmp: Path, feeds: list[dict] | None) -> bytes:
    """onnxruntime's own int8 model of ``fp32``: ``quantize_dynamic`` (``feeds`` None) or
    ``quantize_static`` calibrated on ``feeds`` (QDQ, per-channel, uint8 activations)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    src, dst = tmp / "fp32.onnx", tmp / "int8.onnx"
    src.write_bytes(fp32)
    if feeds is None:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         reduce_range=REDUCE_RANGE)
        return dst.read_bytes()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE)
    return dst.read_bytes()


def interleaved(calls: dict, rounds: int, min_time: float) -> dict[str, float]:
    """Median ms per call of each ``calls[name]()`` over ``rounds`` interleaved rounds."""
    import numpy as np

    from lowbit.runtime._bench import time_calls

    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        time_calls(fn, warmup=2, repeat=1, min_time=0)
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name] += time_calls(fn, warmup=0, repeat=2, min_time=min_time)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def batch_latency(sessions: dict, x, rounds: int, min_time: float,
                  batches: tuple[int, ...] = (1, 8)) -> dict[str, dict[int, float]]:
    """Median ms per call of every ``lowbit.runtime.Session`` at each batch of the first rows
    of ``x`` (numpy), interleaved rounds: {name: {batch: ms}}."""
    out: dict[str, dict[int, float]] = {n: {} for n in sessions}
    for b in batches:
        a = x[:b].copy()
        ms = interleaved({n: (lambda s=s, a=a: s._call(a)) for n, s in sessions.items()},
                         rounds, min_time)
        for n, v in ms.items():
            out[n][b] = v
    return out


def comparison_footer(result: dict) -> list[str]:
    """The markdown lines under a lowbit-vs-onnxruntime table: what agreement means, the
    batch-1 latency ratios and each lowbit file's gate."""
    return ["", "Agreement: top-1 with the student (lowbit files) or the float network "
            "(fp32, onnxruntime's int8). Ratios at batch 1: " + "; ".join(
                f"{a} / {b} = {x:.2f}" for a, b, x in result["ratios"]), "",
            "Gates: " + "; ".join(f"{n}: {' / '.join(g)}" for n, g in result["gates"].items())]
