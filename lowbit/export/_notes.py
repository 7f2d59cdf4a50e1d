"""What an export tells its caller, typed: a :class:`Note` per fact, not a ``warnings.warn``.

``ExportResult.notes`` holds what happened (``kind`` says which rule), ``ExportResult.warnings``
what the user should act on; a front end picks by ``kind`` instead of matching text.
"""

from __future__ import annotations

from dataclasses import dataclass

PTQ = "ptq"  # a float model was quantized post-training
FLOAT_ADDS = "float-adds"  # residual adds kept in float: the integer adds missed the gate
FLOAT_LAYERS = "float-kernels"  # conv/linear layers onnxruntime runs as float kernels
PTQ_COST = "ptq-cost"  # warning: post-training quantization costs more than max_drop
KINDS = (PTQ, FLOAT_ADDS, FLOAT_LAYERS, PTQ_COST)


@dataclass(frozen=True)
class Note:
    """One note or warning of an export: ``kind`` (one of :data:`KINDS`) and its text."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"note kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return self.text
