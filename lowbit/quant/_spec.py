"""``QuantSpec``: the frozen description of how a student is quantized.

The student carries it (``model.lowbit_quant``), checkpoints store it (``to_dict``), the
exporter and the footprint analyzer read it, and ONNX metadata records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .._choices import ACT_BITS, SCALE_RULES, WEIGHT_BITS
from ..errors import QuantizeError


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths and rules for a quantization-aware student.

    weight_bits: bits of every Conv2d/Linear weight (per-output-channel scales); 2 is ternary.
    act_bits: unsigned bits of the activations after each ReLU.
    input_bits: signed bits of the network input.
    first_bits / last_bits: weight bits of the first conv and the last linear layer (both
        papers keep them wider; default 8). ``None`` means "same as weight_bits".
    scale_rule: ternary threshold/scale rule: "twn" (delta = 0.7 mean|w|, alpha = mean |w|
        above delta, per channel) or "learned" (a trained per-channel scale).
    residual_bits: signed bits of the quantizer on each residual-add input that comes from a
        conv/BatchNorm (8 lets onnxruntime run the conv and the add as integer kernels);
        ``None`` leaves those inputs float (the exported model then runs them in float).
    requant_bits: signed bits of the requantizer after a float op (pooling, add, mul, cat)
        that feeds a conv/linear, and of ``residual_bits``-style quantizers on every conv
        output no quantizer covers (linear bottlenecks, float activations' inputs); ``None``
        leaves them float (those layers then run as float kernels; ``describe`` says which).
    overrides: (layer name, weight bits) pairs that win over everything else.
    """

    weight_bits: int = 2
    act_bits: int = 4
    input_bits: int = 8
    first_bits: int | None = 8
    last_bits: int | None = 8
    scale_rule: str = "twn"
    residual_bits: int | None = 8
    requant_bits: int | None = 8
    overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple((str(n), int(b)) for n, b in self.overrides))
        for name, bits in [("weight_bits", self.weight_bits), ("first_bits", self.first_bits),
                           ("last_bits", self.last_bits), *self.overrides]:
            if bits is not None and bits not in WEIGHT_BITS:
                raise QuantizeError(f"{name}: {bits}-bit weights are not supported; supported "
                                    f"weight bits: {', '.join(map(str, WEIGHT_BITS))} "
                                    f"(2 = ternary)")
        if self.act_bits not in ACT_BITS:
            raise QuantizeError(f"act_bits: {self.act_bits}-bit activations are not supported; "
                                f"supported: {', '.join(map(str, ACT_BITS))}")
        if self.input_bits != 8:
            raise QuantizeError(f"input_bits: only 8-bit inputs are supported, got "
                                f"{self.input_bits}")
        for name, bits in [("residual_bits", self.residual_bits),
                           ("requant_bits", self.requant_bits)]:
            if bits not in (None, 8):
                raise QuantizeError(f"{name}: only 8 (or None: float) is supported, got {bits}")
        if self.scale_rule not in SCALE_RULES:
            raise QuantizeError(f"scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")

    def bits_for(self, name: str, *, first: bool = False, last: bool = False) -> int:
        """Weight bits of layer ``name`` under this policy."""
        for layer, bits in self.overrides:
            if layer == name:
                return bits
        if first and self.first_bits is not None:
            return self.first_bits
        if last and self.last_bits is not None:
            return self.last_bits
        return self.weight_bits

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints and ONNX metadata."""
        d = asdict(self)
        d["overrides"] = [list(o) for o in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise QuantizeError(f"unknown QuantSpec fields: {', '.join(sorted(unknown))}")
        # specs written before residual quantizers / requantizers existed describe students
        # without them
        d = {"residual_bits": None, "requant_bits": None, **d}
        return cls(**{**d, "overrides": tuple(tuple(o) for o in d.get("overrides", ()))})
