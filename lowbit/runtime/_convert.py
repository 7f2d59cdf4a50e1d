"""ONNX -> ORT format (onnxruntime's flatbuffer format for minimal/mobile builds), torch-free.

Does what ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does for one file
(that tool imports ``onnx``, which an edge install lacks): load the model in an
onnxruntime session at the given optimisation level and let onnxruntime save the optimised
graph with ``session.save_model_format=ORT``. As in that tool, the NCHWc layout transformer
is excluded so the file runs on any CPU, not only the one that converted it.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .. import _integrity
from .._io import atomic_write, check_outputs
from ._session import ORT_ERRORS, ModelError, load_session, ort_message, session_options


def convert_ort(src: str | Path, dst: str | Path | None = None, *,
                optimization: str = "all", allow_modified: bool = False) -> Path:
    """Write ``src`` (.onnx) as an ORT-format file (default: ``src`` with suffix ``.ort``).

    Metadata (normalisation, classes, bit widths) is kept, so :class:`Session` takes the
    ``.ort`` file exactly like the ``.onnx`` one. Returns the path written (atomically).
    A lowbit export whose weights or graph changed since export is refused (the ``.ort``
    file carries no digest of its own); ``allow_modified=True`` converts it anyway.
    """
    src = Path(src).expanduser()
    dst = Path(dst).expanduser() if dst is not None else src.with_suffix(".ort")
    check_outputs([dst], [src])
    sess = load_session(src, session_options(1, "disable"))  # one line for a bad input
    _integrity.check(src, dict(sess.get_modelmeta().custom_metadata_map), allow_modified)

    def write(tmp: Path) -> None:
        so = session_options(1, optimization)
        so.optimized_model_filepath = str(tmp)
        so.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["NchwcTransformer"])
        except ORT_ERRORS as exc:
            raise ModelError(f"{src}: onnxruntime could not convert it to ORT format "
                             f"({ort_message(exc)})") from None

    return atomic_write(dst, write)
