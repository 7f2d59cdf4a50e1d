"""Memory footprint of a model at its bit widths: weights vs activations, per batch size.

``footprint(model_or_onnx, batch_sizes=(1, 8), weight_bits=None, act_bits=None)`` accounts a
PyTorch model, a lowbit checkpoint or an ONNX file layer by layer (the picture of Apprentice's
Figure 1: weights dominate at batch 1, activations grow with the batch). The ONNX path needs
only onnx + numpy; torch is imported only for PyTorch models and checkpoints.
``lowbit.footprint`` is the function :func:`footprint` (``from lowbit.footprint import
Footprint`` for this package's other names). Conventions (BN folded, in-place activations,
liveness) and the checks against qonnx and onnxruntime: docs/footprint.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FootprintError
from ._graph import Graph
from ._report import PRECISIONS, Footprint, LayerFootprint, check_batch_sizes, check_bits

__all__ = ["PRECISIONS", "Footprint", "FootprintError", "LayerFootprint", "footprint", "plot"]


def footprint(model: Any, batch_sizes: int | tuple[int, ...] = (1, 8),
              weight_bits: int | None = None, act_bits: int | None = None, *,
              input_shape: tuple[int, ...] | None = None,
              allow_modified: bool = False) -> Footprint:
    """Account weights, activations, peak live memory and MACs of ``model``.

    model: an ``nn.Module`` (float or a lowbit student; needs ``input_shape`` (C, H, W)), a
        lowbit checkpoint path (``.pt``; the input shape is read from it), or an ONNX file /
        ``onnx.ModelProto`` (shapes from shape inference).
    weight_bits / act_bits: override the model's own bit widths for every conv/linear weight /
        every activation tensor (None: what the model says).
    allow_modified: read a lowbit ONNX export whose weights or graph changed since export
        (refused by default: see ``lowbit.runtime.Session``).
    """
    sizes = check_batch_sizes(batch_sizes)
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits)
    return Footprint(_graph(model, input_shape, allow_modified), sizes, weight_bits, act_bits)


def _graph(model: Any, input_shape: tuple[int, ...] | None, allow_modified: bool) -> Graph:
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if not input_shape or min(input_shape) <= 0:
            raise FootprintError(f"input_shape must be positive dims (C, H, W), "
                                 f"got {input_shape}")
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix == ".pt":
            from .. import _checkpoint
            from ._torch import load

            net, ckpt = _checkpoint.load_model(path)
            graph = load(net, input_shape or tuple(ckpt["data"]["input_shape"]))
            return Graph(str(path), graph.layers, graph.outputs)
        from ._onnx import load

        return load(path, input_shape, allow_modified)
    if type(model).__name__ == "ModelProto":
        from ._onnx import load

        return load(model, input_shape)
    if hasattr(model, "named_modules"):
        if input_shape is None:
            raise FootprintError("a PyTorch model needs input_shape=(C, H, W), e.g. (3, 32, 32) "
                                 "for CIFAR; checkpoints and ONNX files carry it")
        from ._torch import load

        return load(model, input_shape)
    raise FootprintError(f"expected an nn.Module, a lowbit checkpoint (.pt) or an ONNX file, "
                         f"got {type(model).__name__}")


def plot(reports: dict[str, Footprint], path: str | Path) -> Path:
    """Figure 1 style bar chart (weights + activations stacked, per batch size and precision)."""
    from ._plot import plot as _plot

    return _plot(reports, path)

