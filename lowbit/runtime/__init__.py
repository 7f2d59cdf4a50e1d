"""Torch-free edge runtime: run, evaluate and benchmark exported models in onnxruntime.

Imports only the standard library, numpy and onnxruntime, so ``pip install lowbit`` (the
core install, no ``[train]`` extra) is enough on a device::

    from lowbit.runtime import Session
    s = Session("resnet20_ternary.onnx", threads=2)
    s.predict(images_uint8)          # raw pixels [N, C, H, W]; normalisation from metadata
    s.evaluate("cifar10:DATA_DIR")   # top-1 accuracy on the test split
    s.benchmark([1, 8, 64])          # latency / throughput rows
"""

from .._datafiles import DataError
from ._bench import Timing, markdown_table, resident_bytes
from ._convert import convert_ort
from ._session import InputError, ModelError, ModelInfo, Session, session_options

__all__ = ["DataError", "InputError", "ModelError", "ModelInfo", "Session", "Timing",
           "convert_ort", "markdown_table", "resident_bytes", "session_options"]
