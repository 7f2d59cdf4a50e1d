"""User-facing errors: one hierarchy, so the CLI can tell a user's mistake from a bug in lowbit.

Every error a user can fix (a bad path, a wrong file, a setting out of range, a model lowbit
cannot quantize, an export that fails its gate) is a :class:`LowbitError`; the CLI prints
exactly those as one line and exits with status 2, and lets anything else surface as a bug.
The subclasses also derive from the built-in they refine (mostly ``ValueError``), so code
that catches those keeps working. Torch-free: the edge runtime raises them too.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "ExportError", "FootprintError", "InputError",
           "LowbitError", "ModelError", "OutputError", "QuantizeError", "TrainingError",
           "UsageError"]


class LowbitError(Exception):
    """Base of every error the user can fix; its message is one line that says how."""


class UsageError(LowbitError, ValueError):
    """An option or argument has a value lowbit does not accept."""


class DataError(LowbitError, ValueError):
    """A dataset is missing, truncated, corrupt, in the wrong format or does not fit a model."""


class CheckpointError(LowbitError, ValueError):
    """A file is not a loadable lowbit checkpoint, or describes a model that cannot be built."""


class QuantizeError(LowbitError, ValueError):
    """A model (a layer, an operation, a policy) that lowbit cannot quantize as asked."""


class TrainingError(LowbitError, RuntimeError):
    """Training cannot go on (non-finite loss, mismatched resume state)."""


class ExportError(LowbitError, ValueError):
    """A student cannot be exported as asked, or the export fails its verification gate."""


class ModelError(LowbitError, ValueError):
    """A model file is missing, not ONNX/ORT, or not a model the runtime can drive."""


class InputError(LowbitError, ValueError):
    """An input batch does not match the model (shape, dtype, size, non-finite values)."""


class FootprintError(LowbitError, ValueError):
    """A model the footprint analyzer cannot account for (unknown ops, no shapes, settings)."""


class OutputError(LowbitError, OSError):
    """An output path that must not be written: an input, a finished result, a non-file."""
