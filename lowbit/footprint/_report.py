"""The accounting pass: weights, activations (summed and peak-live) and MACs of a layer graph.

Conventions (the same for both front ends):

- weight bytes of a layer = its packed weight codes ``ceil(n * bits / 8)`` + its quantization
  parameters (per-output-channel fp32 scales, zero points if stored) + its bias (fp32; a folded
  BatchNorm gives a bias). The fp32 equivalent stores weights and bias at 32 bits, no scales.
- activation bytes of a layer at batch ``B`` = ``ceil(elements * B * bits / 8)`` of its output
  tensor; the network input counts as the first activation. "Summed" activations add every
  layer's output (the accounting of Apprentice, Mishra & Marr 2018, Figure 1).
- peak live activation memory: walk the layers in execution order; a tensor is live from the
  step that produces it until its last consumer ran (graph outputs until the end); at each step
  the layer's inputs and its output are live together. Residual branches keep the block input
  alive across the block; in-place ops and views allocate nothing.
- MACs: conv ``out_elements * C_in/groups * kh * kw``, linear ``out_elements * in_features``,
  a product of two activations ``out_elements * K`` (attention: ``B * heads * N * N * d`` for
  ``q @ k^T``); pooling, adds and element-wise ops count zero (as in qonnx's
  ``inference_cost``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import FootprintError
from ._graph import FP32, INPUT, WEIGHTED, Graph, Layer, with_bits

MAX_BATCH = 1 << 30  # crossover search bound

# Figure 1 precisions: (weight bits, activation bits). Ternary = lowbit's default student
# (QuantSpec(weight_bits=2, act_bits=4)).
PRECISIONS: dict[str, tuple[int, int]] = {
    "fp32": (32, 32), "8-bit": (8, 8), "4-bit": (4, 4), "ternary": (2, 4)}


def check_bits(name: str, bits: int | None) -> None:
    """Bit widths are whole numbers from 1 to 32 (None: what the model says)."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                             or not 1 <= bits <= FP32):
        raise FootprintError(f"{name} must be an integer from 1 to 32, got {bits!r}")


def check_batch_sizes(batch_sizes) -> tuple[int, ...]:
    """Batch sizes: a non-empty sequence of positive integers."""
    sizes = tuple(batch_sizes) if not isinstance(batch_sizes, int) else (batch_sizes,)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or b <= 0]
    if not sizes or bad:
        raise FootprintError(f"batch sizes must be positive integers, got "
                             f"{list(sizes) if sizes else 'none'}")
    return sizes


@dataclass(frozen=True)
class LayerFootprint:
    """Per-layer numbers; activation elements and MACs are per sample (batch 1)."""

    name: str
    kind: str
    fused: tuple[str, ...]
    shape: tuple[int, ...]
    params: int  # weight + bias elements (scales and zero points excluded)
    weight_elements: int  # weight elements alone (what qonnx's mem_w counts)
    weight_bits: float | None  # bits per weight code as stored (1.6 for trits); None: none
    weight_bytes: int  # codes + scales + zero points + bias
    weight_bytes_fp32: int
    act_bits: int
    act_elements: int
    macs: int

    def act_bytes(self, batch: int, bits: int | None = None) -> int:
        """Bytes of this layer's output at ``batch`` (at ``bits``, default its own)."""
        return math.ceil(self.act_elements * batch * (bits or self.act_bits) / 8)


def _layer_footprint(layer: Layer) -> LayerFootprint:
    weight = next((p for p in layer.params if p.role == "weight"), None)
    stored = [p for p in layer.params if p.role in ("weight", "bias")]
    return LayerFootprint(
        name=layer.name, kind=layer.kind, fused=layer.fused, shape=layer.shape,
        params=sum(p.elements for p in stored), weight_elements=weight.elements if weight else 0,
        weight_bits=weight.bits if weight else None,
        weight_bytes=sum(p.nbytes for p in layer.params),
        weight_bytes_fp32=4 * sum(p.elements for p in stored), act_bits=layer.act_bits,
        act_elements=layer.elements, macs=layer.macs)


@dataclass(frozen=True)
class Footprint:
    """Memory footprint of one model at given bit widths, for ``batch_sizes``.

    Build it with :func:`lowbit.footprint`; ``with_bits`` re-accounts the same graph at other
    bit widths (the "what if this were 4-bit?" question) without re-reading the model.
    """

    graph: Graph
    batch_sizes: tuple[int, ...]
    weight_bits: int | None = None  # override applied to every conv/linear, None: the model's
    act_bits: int | None = None  # override applied to every activation tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", check_batch_sizes(self.batch_sizes))
        check_bits("weight_bits", self.weight_bits)
        check_bits("act_bits", self.act_bits)

    @property
    def source(self) -> str:
        return self.graph.source

    @cached_property
    def layers(self) -> tuple[LayerFootprint, ...]:
        return tuple(_layer_footprint(with_bits(layer, self.weight_bits, self.act_bits))
                     for layer in self.graph.layers)

    def with_bits(self, weight_bits: int | None, act_bits: int | None) -> Footprint:
        """The same model accounted at other bit widths."""
        return Footprint(self.graph, self.batch_sizes, weight_bits, act_bits)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per sample."""
        return sum(layer.macs for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def weight_bytes_fp32(self) -> int:
        return sum(layer.weight_bytes_fp32 for layer in self.layers)

    def activation_bytes(self, batch: int, *, fp32: bool = False) -> int:
        """Every layer's output added up (Figure 1's accounting), input included."""
        bits = FP32 if fp32 else None
        return sum(layer.act_bytes(batch, bits) for layer in self.layers)

    def peak(self, batch: int, *, fp32: bool = False) -> tuple[int, str]:
        """Peak live activation bytes over execution order, and the layer where it occurs."""
        layers = self.layers
        size = {g.output: f.act_bytes(batch, FP32 if fp32 else None)
                for g, f in zip(self.graph.layers, layers, strict=True)}
        last_use = {t: len(layers) for t in self.graph.outputs}
        for step, g in enumerate(self.graph.layers):
            for t in g.inputs:
                last_use[t] = max(last_use.get(t, step), step)
        best, where, live = 0, "", 0
        for step, g in enumerate(self.graph.layers):
            live += size[g.output]  # inputs are still live: freed only after this step
            if live > best:
                best, where = live, g.name
            for t in set(g.inputs) | {g.output}:
                if last_use.get(t, step) <= step:
                    live -= size[t]
        return best, where

    def peak_activation_bytes(self, batch: int, *, fp32: bool = False) -> int:
        """Peak live activation memory at ``batch`` (bytes)."""
        return self.peak(batch, fp32=fp32)[0]

    def crossover(self, *, peak: bool = False) -> int | None:
        """Smallest batch size at which activations (summed, or peak-live) exceed weights."""
        def acts(b: int) -> int:
            return self.peak_activation_bytes(b) if peak else self.activation_bytes(b)

        weights = self.weight_bytes
        if acts(MAX_BATCH) <= weights:
            return None
        lo, hi = 1, MAX_BATCH  # activations grow monotonically with the batch
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if acts(mid) <= weights else (lo, mid)
        return lo

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict: per-layer rows, totals per batch size, crossovers."""
        per_batch = {}
        for b in self.batch_sizes:
            peak, where = self.peak(b)
            per_batch[str(b)] = {
                "activation_bytes": self.activation_bytes(b),
                "activation_bytes_fp32": self.activation_bytes(b, fp32=True),
                "peak_activation_bytes": peak, "peak_at": where,
                "peak_activation_bytes_fp32": self.peak_activation_bytes(b, fp32=True)}
        return {
            "source": self.source, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
            "params": self.params, "macs": self.macs, "weight_bytes": self.weight_bytes,
            "weight_bytes_fp32": self.weight_bytes_fp32, "batch": per_batch,
            "crossover_batch": self.crossover(), "crossover_batch_peak": self.crossover(peak=True),
            "layers": [{"name": f.name, "kind": f.kind, "fused": list(f.fused),
                        "shape": list(f.shape), "params": f.params,
                        "weight_elements": f.weight_elements, "weight_bits": f.weight_bits,
                        "weight_bytes": f.weight_bytes, "weight_bytes_fp32": f.weight_bytes_fp32,
                        "act_bits": f.act_bits, "act_elements": f.act_elements,
                        "act_bytes": f.act_bytes(1), "macs": f.macs} for f in self.layers]}

    def table(self) -> str:
        """Human-readable per-layer table and totals."""
        rows = [("layer", "kind", "params", "w bits", "w bytes", "output", "a bits",
                 "a bytes/img", "MACs")]
        for f in self.layers:
            rows.append((f.name, f.kind, _n(f.params) if f.kind != INPUT else "",
                         str(f.weight_bits or ""), _n(f.weight_bytes) if f.kind in WEIGHTED
                         else "", "x".join(map(str, f.shape)), str(f.act_bits),
                         _n(f.act_bytes(1)), _n(f.macs) if f.macs else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("")
        lines.append(f"params {_n(self.params)}, MACs/img {_n(self.macs)}, weights "
                     f"{_mib(self.weight_bytes)} (fp32 {_mib(self.weight_bytes_fp32)})")
        for b in self.batch_sizes:
            peak, where = self.peak(b)
            lines.append(f"batch {b}: activations summed {_mib(self.activation_bytes(b))} "
                         f"(fp32 {_mib(self.activation_bytes(b, fp32=True))}), peak live "
                         f"{_mib(peak)} at {where} "
                         f"(fp32 {_mib(self.peak_activation_bytes(b, fp32=True))})")
        cross, cross_peak = self.crossover(), self.crossover(peak=True)
        lines.append(f"activations exceed weights from batch {cross or 'never'} (summed), "
                     f"{cross_peak or 'never'} (peak live)")
        return "\n".join(lines)


def _n(x: int) -> str:
    return f"{x:,}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB"
