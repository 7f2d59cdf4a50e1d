"""An onnxruntime session that takes raw uint8 images: normalisation and classes from metadata.

Torch-free on purpose (standard library, numpy, onnxruntime only): this is what an edge
device installs. Works on lowbit's exported ``.onnx``/``.ort`` files and on any ONNX image
classifier with one float ``[N, C, H, W]`` input (without lowbit metadata it takes float32
input that is already normalised).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .. import _datafiles, _integrity, _pixels
from .. import _onnx_meta as meta
from .._backend import DEFAULT_OPSET, min_onnxruntime
from ..errors import InputError, ModelError, UsageError
from ._bench import Timing, time_calls

# Every exception class onnxruntime raises from C++ (none derives from a Python built-in).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    getattr(_ort_state, n) for n in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel",
                                     "EngineError", "RuntimeException", "InvalidProtobuf",
                                     "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    if hasattr(_ort_state, n))

OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,  # constant folding, no fusions
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,  # + QDQ -> QLinearConv etc.
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # + layout (NCHWc) transforms
}


def ort_message(exc: Exception) -> str:
    """The first line of an onnxruntime error without its ``[ONNXRuntimeError] : N : KIND :``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(" : ", 3)[-1] if text.startswith("[ONNXRuntimeError]") else text


def session_options(threads: int | None = None, optimization: str = "all",
                    config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (None: onnxruntime's default, one per
    physical core), sequential execution, graph optimisation level by name, and session
    ``config`` entries (e.g. ``mlas.use_lut_gemm``)."""
    if optimization not in OPTIMIZATION:
        raise UsageError(f"unknown optimization {optimization!r}; expected one of "
                         f"{', '.join(OPTIMIZATION)}")
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1 (or None for onnxruntime's default), got "
                         f"{threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION[optimization]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1  # a CNN is a chain: inter-op parallelism only adds overhead
    if threads is not None:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # errors only: warnings would break the CLI's one-line output
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def available_memory() -> int | None:
    """Bytes the OS can still give this process without swapping (Linux ``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ModelInfo:
    """What the file says about itself: the shape of one input (``[C, H, W]`` for images,
    ``[features]`` for an MLP, ``[C, L]`` for sequences), classes, normalisation, bits."""

    input_name: str
    input_shape: tuple[int, ...]
    num_outputs: int | None
    classes: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # every metadata_props entry
    pixel_layout: str | None = None  # "nchw"/"nhwc": the file takes raw uint8 pixels


def _json_meta(props: dict[str, str], key: str, path: Path) -> object:
    if key not in props:
        return None
    try:
        return json.loads(props[key])
    except json.JSONDecodeError:
        raise ModelError(f"{path}: metadata {key} is not valid JSON: {props[key][:60]!r}") from None


def _checked(path: Path, key: str, value: object, ok: bool, expected: str) -> object:
    if value is not None and not ok:
        raise ModelError(f"{path}: metadata {key} must be {expected}; found "
                         f"{json.dumps(value)[:80]}")
    return value


def _numbers(value: object, n: int | None = None) -> bool:
    return isinstance(value, list) and (n is None or len(value) == n) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
        for v in value)


def _model_info(sess: ort.InferenceSession, path: Path) -> ModelInfo:
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelError(f"{path}: expected one input tensor and a logits output, found "
                         f"inputs {[i.name for i in inputs]} and outputs "
                         f"{[o.name for o in outputs]}")
    inp, out = inputs[0], outputs[0]
    props = dict(sess.get_modelmeta().custom_metadata_map)
    shape_meta = _json_meta(props, meta.INPUT_SHAPE, path)
    _checked(path, meta.INPUT_SHAPE, shape_meta,
             _numbers(shape_meta) and 1 <= len(shape_meta) <= 4
             and all(isinstance(d, int) and d >= 1 for d in shape_meta),
             "a list of 1 to 4 positive integers")
    dims = inp.shape[1:] if len(inp.shape) >= 2 else None
    if shape_meta is not None:
        shape = tuple(int(d) for d in shape_meta)
    elif dims is not None and all(isinstance(d, int) for d in dims):
        shape = tuple(dims)
    else:
        raise ModelError(f"{path}: input {inp.name!r} has shape {inp.shape}; expected a batch "
                         f"of fixed-shape inputs ([N, C, H, W] images, [N, features], ...) or "
                         f"{meta.INPUT_SHAPE} metadata")
    form = _json_meta(props, meta.INPUT, path)
    _checked(path, meta.INPUT, form, isinstance(form, dict) and form.get("dtype") == "uint8"
             and form.get("layout") in ("nchw", "nhwc"),
             '{"dtype": "uint8", "layout": "nchw" or "nhwc"}')
    expected = "tensor(uint8)" if form else "tensor(float)"
    if inp.type != expected:
        raise ModelError(f"{path}: input {inp.name!r} is {inp.type}; expected {expected} "
                         f"inputs [N, {', '.join(map(str, shape))}]")
    width = out.shape[-1] if out.shape and isinstance(out.shape[-1], int) else None
    classes = _json_meta(props, meta.CLASSES, path)
    _checked(path, meta.CLASSES, classes, isinstance(classes, list) and len(classes) >= 1,
             "a non-empty list of class names")
    mean, std = (_json_meta(props, k, path) for k in (meta.MEAN, meta.STD))
    if (mean is None) != (std is None) or (mean is not None and not (
            _numbers(mean, shape[0]) and _numbers(std, shape[0])
            and all(v > 0 for v in std))):
        raise ModelError(f"{path}: metadata {meta.MEAN}/{meta.STD} must both give {shape[0]} "
                         f"finite per-channel values, std > 0; found {mean} / {std}")
    bits = {k: _json_meta(props, k, path) for k in (meta.WEIGHT_BITS, meta.ACT_BITS)}
    for key, value in bits.items():
        _checked(path, key, value, isinstance(value, int) and not isinstance(value, bool),
                 "an integer bit width")
    return ModelInfo(
        input_name=inp.name, input_shape=shape,
        num_outputs=len(classes) if classes is not None else width,
        classes=tuple(str(c) for c in classes) if classes is not None else None,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        weight_bits=bits[meta.WEIGHT_BITS], act_bits=bits[meta.ACT_BITS], metadata=props,
        pixel_layout=form["layout"] if form else None)


def file_session_config(props: dict[str, str], path: Path) -> dict[str, str]:
    """The onnxruntime session config entries a lowbit file runs and was verified with
    (metadata ``lowbit.linear``: its MatMulNBits layers); {} for any other file."""
    record = _json_meta(props, meta.LINEAR, path)
    config = record.get("session") if isinstance(record, dict) else None
    _checked(path, meta.LINEAR, record, isinstance(config, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()),
        'an object whose "session" maps config keys to strings')
    return dict(config or {})


MIN_ORT_DEFAULT_EXPORT = min_onnxruntime(DEFAULT_OPSET)  # pyproject's floor
_NEWER_RUNTIME = ("IR version", "opset", "Could not find an implementation", "not supported")


def _newer_runtime_hint(message: str) -> str:
    """For a file written for a newer onnxruntime: which one, and how to export for this one."""
    if not any(k in message for k in _NEWER_RUNTIME):
        return ""
    return (f"; lowbit's default export (opset {DEFAULT_OPSET}) needs onnxruntime >= "
            f"{MIN_ORT_DEFAULT_EXPORT}: upgrade onnxruntime, or export for "
            f"{ort.__version__} with 'lowbit-export --opset 21' (onnxruntime "
            f"{min_onnxruntime(21)}) or '--opset 20' ({min_onnxruntime(20)}-1.22)")


def load_session(path: str | Path, so: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``path`` (.onnx or .ort); one-line :class:`ModelError`s."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelError(f"{p}: {'is a directory' if p.is_dir() else 'not found'}; expected an "
                         f".onnx or .ort model file (lowbit-export writes one)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or p.suffix in (".pt", ".pth"):
        raise ModelError(f"{p}: is a PyTorch checkpoint, not an exported model; export it with "
                         f"'lowbit-export {p}' and run the .onnx file")
    try:
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        msg = ort_message(exc)
        if "Unsupported model IR version" in msg:  # drop onnxruntime's source location
            msg = "Unsupported model IR version" + msg.split("Unsupported model IR version")[-1]
        raise ModelError(f"{p}: not a model onnxruntime {ort.__version__} can load; expected an "
                         f"ONNX or ORT-format file ({msg}){_newer_runtime_hint(msg)}") from None


class Session:
    """Run an exported image classifier in onnxruntime on raw uint8 images.

    ``run`` normalises uint8 ``[N, C, H, W]`` pixels with the file's ``mean``/``std``
    (``x = (pixels - mean) / std`` per channel, 0..255 scale: ``lowbit._pixels``) and feeds
    batches of at most ``max_batch`` images; float32 input is taken as already normalised.
    A file exported with ``input="uint8"`` normalises inside: it is fed the pixels as they
    are (transposed to NHWC for an NHWC file) and takes no float input. Float input with a
    NaN or inf is refused (:class:`InputError`): the quantized graph would map NaN to code 0
    and return a confident class; ``allow_nonfinite=True`` passes it through unchanged.
    Other inputs (``[N, features]``, ``[N, C, L]``) are taken alike, in the file's shape.

    A file that lowbit exported is refused (:class:`ModelError`) when its weights or graph
    differ from the digests recorded at export (a corrupt copy; ``allow_modified=True`` for a
    file changed on purpose) or when a newer lowbit wrote it in a newer file format.

    ``config``: onnxruntime session config entries; None takes those the file was verified
    with (:func:`file_session_config`, e.g. ``mlas.use_lut_gemm`` for MatMulNBits layers;
    such a file is loaded twice, the first load reading its metadata).
    """

    def __init__(self, path: str | Path, threads: int | None = None, *,
                 optimization: str = "all", max_batch: int = 256,
                 allow_nonfinite: bool = False, allow_modified: bool = False,
                 config: Mapping[str, str] | None = None) -> None:
        if max_batch < 1:
            raise UsageError(f"max_batch must be >= 1, got {max_batch}")
        self.path = Path(path).expanduser()
        self.threads, self.optimization, self.max_batch = threads, optimization, max_batch
        self.allow_nonfinite = allow_nonfinite
        self._ort = load_session(self.path, session_options(threads, optimization, config))
        props = dict(self._ort.get_modelmeta().custom_metadata_map)
        _integrity.check(self.path, props, allow_modified)
        self.config = dict(config) if config is not None else \
            file_session_config(props, self.path)
        if config is None and self.config:
            self._ort = load_session(self.path, session_options(threads, optimization,
                                                                self.config))
        self.info = _model_info(self._ort, self.path)
        self._output = self._ort.get_outputs()[0].name
        self._per_image: int | None = None  # bytes onnxruntime needs per image, measured lazily

    @property
    def classes(self) -> tuple[str, ...] | None:
        return self.info.classes

    def __repr__(self) -> str:
        return (f"Session({str(self.path)!r}, input {self._shape()}, "
                f"{self.info.num_outputs} outputs, weight_bits={self.info.weight_bits})")

    # -- inputs ------------------------------------------------------------------------------
    def _shape(self) -> str:
        return f"[N, {', '.join(map(str, self.info.input_shape))}]"

    def _expected(self) -> str:
        kinds = "uint8 raw pixels (normalised inside the file)" if self.info.pixel_layout else \
            "uint8 raw pixels or float32 normalised" if self.info.mean else \
            "float32 normalised (the file has no normalisation metadata)"
        what = "images" if len(self.info.input_shape) == 3 else "inputs"
        return f"{what} {self._shape()} {kinds}"

    def _check(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == len(self.info.input_shape):
            x = x[None]
        if x.ndim != len(self.info.input_shape) + 1 or tuple(x.shape[1:]) != self.info.input_shape:
            raise InputError(f"{self.path.name}: expected {self._expected()}, got shape "
                             f"{tuple(x.shape)}")
        if x.dtype != np.uint8 and self.info.pixel_layout:
            raise InputError(f"{self.path.name}: expected {self._expected()}, got dtype "
                             f"{x.dtype}")
        if x.dtype == np.uint8 and self.info.mean is None and not self.info.pixel_layout:
            raise InputError(f"{self.path.name}: uint8 input needs normalisation, but the file "
                             f"has no {meta.MEAN}/{meta.STD} metadata; pass float32 images "
                             f"already normalised")
        if x.dtype not in (np.uint8, np.float32):
            raise InputError(f"{self.path.name}: expected {self._expected()}, got dtype "
                             f"{x.dtype}")
        if x.dtype == np.float32 and not self.allow_nonfinite and not np.isfinite(x).all():
            bad = int((~np.isfinite(x.reshape(len(x), -1))).any(1).sum())
            raise InputError(f"{self.path.name}: {bad} of {len(x)} images contain NaN or inf "
                             f"values; expected finite pixels (pass allow_nonfinite=True to run "
                             f"them anyway)")
        return x

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, C, ...]`` -> float32 ``(x - mean) / std`` per channel (dim 1); float32
        passes through."""
        if images.dtype == np.float32:
            return images
        return _pixels.normalize(images, self.info.mean, self.info.std)

    def feed(self, images: np.ndarray) -> np.ndarray:
        """What the file takes for images ``[N, C, H, W]``: the uint8 pixels as they are
        (NHWC for an NHWC file) when it normalises inside, else :meth:`normalize`'s floats
        (uint8 without normalisation metadata: pixels / 255, as ``benchmark`` feeds)."""
        if self.info.pixel_layout:
            return np.ascontiguousarray(images.transpose(0, 2, 3, 1)) \
                if self.info.pixel_layout == "nhwc" else images
        if images.dtype == np.uint8 and not self.info.mean:
            return images.astype(np.float32) / 255.0
        return self.normalize(images)

    # -- memory ------------------------------------------------------------------------------
    def bytes_per_image(self) -> int:
        """Memory one image costs in a batch: float32 input plus onnxruntime's peak arena use,
        measured once with onnxruntime's profiler at batch 1 (activations scale with batch)."""
        if self._per_image is None:
            with tempfile.TemporaryDirectory() as tmp:
                so = session_options(1, self.optimization, self.config)
                so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "profile")
                sess = load_session(self.path, so)
                sess.run(None, {self.info.input_name: self.feed(
                    np.zeros((1, *self.info.input_shape), np.uint8))})
                with open(sess.end_profiling()) as f:
                    events = json.load(f)
            peak = 0
            for e in events:
                args = e.get("args", {}) if e.get("cat") == "Node" else {}
                # arena peak where reported, else this node's inputs + outputs (a lower bound)
                peak = max(peak, int(args.get("mem_in_use_peak", 0)),
                           int(args.get("activation_size", 0)) + int(args.get("output_size", 0)))
            self._per_image = 4 * math.prod(self.info.input_shape) + peak
        return self._per_image

    def check_fits(self, batch: int) -> None:
        """Raise :class:`InputError` when a batch of ``batch`` images cannot fit in memory."""
        if batch < 1:
            raise InputError(f"batch size must be >= 1, got {batch}")
        free = available_memory()
        if free is None or batch * 4 * math.prod(self.info.input_shape) * 256 < free:
            return  # far below the limit: skip the profiling run
        need = batch * self.bytes_per_image()
        if need > free:
            fits = max(free // self.bytes_per_image(), 0)
            raise InputError(f"{self.path.name}: a batch of {batch} images needs about "
                             f"{need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is available; "
                             f"expected a batch of at most {fits} images")

    # -- inference ---------------------------------------------------------------------------
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits float32 ``[N, classes]`` for inputs of the file's shape, any rank: images
        ``[N, C, H, W]``, sequences ``[N, C, L]``, features ``[N, F]`` (or one without N)."""
        x = self._check(np.asarray(x))
        self.check_fits(min(len(x), self.max_batch))
        out = [self._call(self.feed(x[i:i + self.max_batch]))
               for i in range(0, len(x), self.max_batch)]
        return np.concatenate(out) if out else np.zeros((0, self.info.num_outputs or 0),
                                                        np.float32)

    def _call(self, x: np.ndarray) -> np.ndarray:
        """One onnxruntime call on a batch as the file takes it (:meth:`feed`)."""
        try:
            return self._ort.run([self._output], {self.info.input_name: x})[0]
        except ORT_ERRORS as exc:
            raise ModelError(f"{self.path.name}: onnxruntime failed on a batch of {len(x)} "
                             f"images ({ort_message(exc)})") from None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices int64 ``[N]`` (names: ``session.classes[i]``)."""
        return self.run(x).argmax(axis=1)

    def evaluate(self, data: str | _datafiles.Arrays | tuple[np.ndarray, np.ndarray], *,
                 limit: int | None = None,
                 progress: Callable[[int], None] | None = None) -> float:
        """Top-1 accuracy on a data spec (``cifar10:DIR``, ``digits``, ``FILE.npz``: its test
        split), an object with ``images``/``labels``, an ``(images, labels)`` pair, or a torch
        ``Dataset``/``DataLoader`` of them (read through numpy; torch is not imported here).

        ``progress(n)`` is called after each batch of ``n`` images (e.g. ``tqdm.update``).
        """
        if isinstance(data, str):
            data = _datafiles.load(data, train=False)
        images, labels = _datafiles.as_arrays(data)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"expected labels as integer class indices [N], got "
                             f"{labels.dtype} of shape {tuple(labels.shape)} (one-hot or float "
                             f"labels: labels.argmax(1) or labels.astype(int))")
        if len(images) != len(labels) or len(images) == 0:
            raise InputError(f"expected as many labels as images (at least one), got "
                             f"{len(images)} images and {len(labels)} labels")
        n_out = self.info.num_outputs
        if n_out is not None and (labels.min() < 0 or labels.max() >= n_out):
            raise InputError(f"{self.path.name} has {n_out} classes but the labels range over "
                             f"{labels.min()}..{labels.max()}")
        correct = 0
        for i in range(0, len(images), self.max_batch):
            batch = images[i:i + self.max_batch]
            correct += int((self.predict(batch) == labels[i:i + self.max_batch]).sum())
            if progress is not None:
                progress(len(batch))
        return correct / len(images)

    def benchmark(self, batch_sizes: Sequence[int] = (1, 8, 64), *, warmup: int = 5,
                  repeat: int = 20, min_time: float = 0.5, seed: int = 0) -> list[Timing]:
        """Latency and throughput of ``run`` per batch size on random pixels.

        Each size gets ``warmup`` untimed runs, then timed runs until both ``repeat`` runs and
        ``min_time`` seconds are reached; latency is the median of one onnxruntime call on a
        batch as the file takes it (:meth:`feed`: normalisation outside the file is not timed;
        a raw-pixel-input file's own normalisation is).
        """
        for b in batch_sizes:
            self.check_fits(b)
        rng = np.random.default_rng(seed)
        rows = []
        for b in batch_sizes:
            pixels = rng.integers(0, 256, (b, *self.info.input_shape), dtype=np.uint8)
            x = self.feed(pixels)
            times = time_calls(lambda x=x: self._call(x), warmup=warmup,
                               repeat=repeat, min_time=min_time)
            rows.append(Timing.from_times(b, times))
        return rows

