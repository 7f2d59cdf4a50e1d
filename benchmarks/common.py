"""Pieces every benchmark script shares: the float ONNX baseline and writing a result pair."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lowbit._io import atomic_write, write_json


def float_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The float network as plain ONNX (the baseline onnxruntime runs in fp32), dynamic batch."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notes
        torch.onnx.export(model.eval(), (example,), buf, dynamo=False, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()


def save_results(stem: Path, report: dict[str, Any], markdown: str) -> None:
    """``stem``.json (every number) and ``stem``.md (the table), each written atomically."""
    write_json(stem.with_suffix(".json"), report)
    atomic_write(stem.with_suffix(".md"), lambda path: path.write_text(markdown))
