"""``export(model, path)``: a quantized student -> packed ONNX (+ QONNX), verified, atomic.

In steps: validated options (:class:`ExportOptions`) -> the student and the gate's inputs
(``_prepare``) -> one exporter per format builds its graph and runs the gate on it
(:data:`EXPORTERS`: ``_onnx_file``, ``_qonnx_file``) -> refused with ``locate``'s finding, or
written with metadata (``_metadata``), sealed, both files or neither.

Standard ONNX (``_build``): the student traced in plain torch, then the rewrites of
``_rewrites`` (fold BatchNorm, pack weights, lower activation quantizers, set the opset).
Ternary weights are stored as trits by default: five codes per byte (1.6 bits), decoded by a
Gather from a 243-entry table that onnxruntime folds at load, at any opset >= 13. With
``ternary_storage="int"`` (and for 4/8-bit weights) they take the opset's narrowest packed
integer type (the opset ladder, ``lowbit._backend.storage_for``). 8-bit weights that
could overflow onnxruntime's x86 uint8 x int8 kernels (``lowbit._backend``) are stored as
uint8 codes + 128 instead of INT8.

Every file is built and verified in memory first and written only if it passes the gate, by
``lowbit._io.atomic_write_all`` (temp files + renames, the files as a pair): a failed
export leaves no file behind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from qonnx.core.modelwrapper import ModelWrapper

from .._backend import DEFAULT_OPSET, FLOAT_KERNELS, INTEGER_KERNELS, MIN_OPSET, NBITS_OP
from .._choices import (
    FORMATS,
    INPUTS,
    LAYOUTS,
    LINEAR_KERNELS,
    RESIDUAL_ADDS,
    TERNARY_STORAGE,
    WEIGHT_FORMS,
)
from .._integrity import seal
from .._io import atomic_write_all
from ..quant import PTQConfig
from ._build import Built, build_onnx
from ._contract import KernelCheck, check_kernels, summary
from ._metadata import form_metadata, metadata
from ._nbits import NBits, use_matmul_nbits
from ._nbits import summary as nbits_summary
from ._notes import FLOAT_ADDS, FLOAT_LAYERS, PTQ_COST, Note
from ._prepare import Feed, accuracy, data_facts, onnx_runner, student_of, verify_inputs
from ._rawinput import check_form, pixel_feed, raw_pixel_graph
from ._rewrites import ExportError, FloatResidualAdds
from ._verify import Thresholds, Verification, compare, locate

KERNEL_INPUTS = 4  # verification inputs the saturating-kernel model runs on
DEFAULT_THRESHOLDS = Thresholds()
DEFAULT_PTQ = PTQConfig()
DEFAULT_NBITS = NBits()


@dataclass(frozen=True)
class ExportResult:
    """Paths written per format, their verification, how each layer's weights are stored,
    the per-layer description (``lowbit.quant.describe``), the conv/linear kernels
    onnxruntime runs for the ONNX file (``{"integer": n, "float": n}``) and the arithmetic
    contract checked per integer layer (``_contract``)."""

    paths: dict[str, Path]
    verification: dict[str, Verification]
    storage: dict[str, str]
    spec: Any = None
    notes: tuple[Note, ...] = field(default_factory=tuple)  # what happened, by kind
    accuracy: dict[str, float] = field(default_factory=dict)  # PTQ: "float" and "onnx" top-1
    warnings: tuple[Note, ...] = field(default_factory=tuple)  # what the user should act on
    layers: tuple = field(default_factory=tuple)
    kernels: dict[str, int] = field(default_factory=dict)
    contract: tuple[KernelCheck, ...] = field(default_factory=tuple)  # per integer layer
    linear: dict[str, Any] = field(default_factory=dict)  # MatMulNBits layers (meta.LINEAR)

    @property
    def arithmetic(self) -> str:
        """One line on the integer layers' contract (empty without an ONNX file)."""
        return summary(self.contract) if self.contract else ""

    @property
    def linear_kernels(self) -> str:
        """One line on the MatMulNBits layers and their contract (empty without any)."""
        return nbits_summary(self.linear) if self.linear else ""


def optimized_graph(proto: onnx.ModelProto) -> onnx.GraphProto:
    """The graph onnxruntime runs for ``proto`` at the default ("all") level."""
    import tempfile

    from ..runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimization="all")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph


def _weighted(node: onnx.NodeProto, producers: dict, inits: set[str]) -> bool:
    """Whether a float MatMul/Gemm/Conv multiplies by stored weights (a conv/linear layer),
    not by another activation (attention): its second input traces back to an initializer."""
    name = node.input[1]
    while name not in inits and name in producers and producers[name].input:
        name = producers[name].input[0]
    return name in inits


def count_kernels(proto: onnx.ModelProto) -> dict[str, int]:
    """How many conv/linear layers onnxruntime runs as integer and as float kernels (and as
    MatMulNBits, "nbits", where there are any); products of two activations are no layer."""
    graph = optimized_graph(proto)
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    ops = [n.op_type for n in graph.node]
    nbits = ops.count(NBITS_OP)
    return {"integer": sum(op in INTEGER_KERNELS for op in ops),
            "float": sum(n.op_type in FLOAT_KERNELS and _weighted(n, producers, inits)
                         for n in graph.node), **({"nbits": nbits} if nbits else {})}


def qonnx_path(path: Path) -> Path:
    """Where the QONNX file goes next to the ONNX file ``path``: ``name.qonnx.onnx``."""
    return path.with_name(path.stem + ".qonnx.onnx")




@dataclass(frozen=True)
class ExportOptions:
    """How to export, validated at construction (``export``'s keywords of the same names)."""

    formats: tuple[str, ...] = FORMATS
    opset: int = DEFAULT_OPSET
    weight_form: str = "cast"
    ternary_storage: str = "trits"
    residual_add: str = "auto"
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    progress: bool = True
    linear_kernel: str = "qdq"
    nbits: NBits = DEFAULT_NBITS
    input: str = "float"
    layout: str = "nchw"

    def __post_init__(self) -> None:
        formats = tuple(dict.fromkeys(self.formats))
        object.__setattr__(self, "formats", formats)
        if not formats or set(formats) - set(FORMATS):
            raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
        for name, allowed in (("weight_form", WEIGHT_FORMS), ("residual_add", RESIDUAL_ADDS),
                              ("ternary_storage", TERNARY_STORAGE),
                              ("linear_kernel", LINEAR_KERNELS), ("input", INPUTS),
                              ("layout", LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ExportError(f"{name} must be one of {allowed}, got "
                                  f"{getattr(self, name)!r}")
        if not MIN_OPSET <= self.opset <= DEFAULT_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: choose {MIN_OPSET}.."
                              f"{DEFAULT_OPSET} (25: INT2 ternary, 21-24: INT4, < 21: INT8 "
                              f"weights)")


@dataclass
class _Job:
    """One export in progress: the student, its baked twin and packed graph, the gate's
    inputs, and what the steps have found so far."""

    options: ExportOptions
    student: nn.Module
    baked: nn.Module
    example: torch.Tensor
    built: Built
    inputs: torch.Tensor
    source: str
    notes: list[Note]
    feed: Feed = None  # normalised inputs -> what the ONNX file takes (raw pixels)
    linear: dict[str, Any] = field(default_factory=dict)  # its MatMulNBits layers
    checks: dict[str, Verification] = field(default_factory=dict)

    def gate(self, fmt: str, run: Callable, inputs: torch.Tensor, **kw: Any) -> Verification:
        """Compare ``run`` with the student on ``inputs`` under the thresholds of the file's
        contract (the options', or a MatMulNBits file's stated bound)."""
        bound = fmt != "qonnx" and self.linear.get("contract") == "bound"
        self.checks[fmt] = compare(fmt, self.source, self.student, run, inputs,
                                   self.built.step,
                                   self.options.nbits.bound if bound else self.options.thresholds,
                                   progress=self.options.progress, **kw)
        return self.checks[fmt]

    def runner(self, proto: onnx.ModelProto, optimization: str) -> Callable:
        """The ONNX file in onnxruntime as the gate runs it (its session entries, its feed)."""
        return onnx_runner(proto, optimization, self.linear.get("session"), self.feed)


@dataclass(frozen=True)
class _File:
    """A built and gated file: its graph, the gate runs it records, its kernel contract."""

    proto: onnx.ModelProto
    ran: tuple[str, ...]
    contract: tuple[KernelCheck, ...] = ()


def _float_adds(proto: onnx.ModelProto) -> onnx.ModelProto:
    # no value_info for initializers (ModelWrapper's default fix adds ~2 KB to the file)
    wrapped = ModelWrapper(proto, make_deepcopy=True, fix_missing_initializer_valueinfo=False)
    return FloatResidualAdds().apply(wrapped)[0].model


def _onnx_file(job: _Job) -> _File:
    """The packed standard-ONNX file, gated in float and integer kernels; residual adds as
    ``residual_add`` says ("auto": integer unless only they miss the gate)."""
    proto = job.built.proto
    if job.options.residual_add == "float":
        proto = _float_adds(proto)

    def check(proto: onnx.ModelProto) -> None:
        job.gate("onnx", onnx_runner(proto, "basic", feed=job.feed), job.inputs)
        job.gate("onnx-int", job.runner(proto, "all"), job.inputs)

    check(proto)
    if job.options.residual_add == "auto" and job.checks["onnx"].passed and \
            not job.checks["onnx-int"].passed:
        job.notes.append(Note(FLOAT_ADDS, f"integer residual adds (onnxruntime's QLinearAdd) "
                                          f"agreed on {job.checks['onnx-int'].agreement:.2%} "
                                          f"only; residual adds kept in float"))
        proto = _float_adds(proto)
        check(proto)
    # the same answer on every CPU: proven, and modelled on real inputs
    contract = check_kernels(proto, (job.feed or np.asarray)(job.inputs[:KERNEL_INPUTS].numpy()),
                             job.built.storage)
    return _File(proto, ("onnx", "onnx-int"), contract)


def _qonnx_file(job: _Job) -> _File:
    """Brevitas' QONNX export of the student, run by qonnx's executor."""
    from ._qonnx import build_qonnx, qonnx_runner

    proto = build_qonnx(job.baked, job.example)
    # qonnx's Python executor is slow: a subset of the verification inputs suffices for
    # the QONNX graph, which runs Brevitas' own quantizer math.
    job.gate("qonnx", qonnx_runner(proto), job.inputs[:32], batch_size=8)
    return _File(proto, ("qonnx",))


EXPORTERS: dict[str, Callable[[_Job], _File]] = {"onnx": _onnx_file, "qonnx": _qonnx_file}


def _refuse_failed(job: _Job, files: dict[str, _File]) -> None:
    """Raise ExportError naming every failed check and where the file first departs."""
    failed = [str(v) for v in job.checks.values() if not v.passed]
    contract = files["onnx"].contract if "onnx" in files else ()
    failed += [f"integer kernels not exact on every CPU: {c}" for c in contract if not c.passed]
    if not failed:
        return
    where = ""
    if "onnx" in files:  # only the integer kernels disagree: look where they run
        level = "all" if job.checks["onnx"].passed else "basic"
        where = locate(job.student, files["onnx"].proto, job.built.acts, job.built.codes,
                       job.inputs[:16], level, job.feed)
    raise ExportError("verification failed, nothing written: " + "; ".join(failed)
                      + (f"; {where}" if where else ""))


def _ptq_cost(model: nn.Module, job: _Job, proto: onnx.ModelProto, labels: torch.Tensor,
              max_drop: float) -> tuple[dict[str, float], list[Note]]:
    """Top-1 of the float model and of the post-training quantized file on the gate's data,
    and a warning when the drop exceeds ``max_drop``."""
    with torch.inference_mode():
        float_logits = model.eval()(job.inputs)
    acc = {"float": accuracy(float_logits, labels),
           "onnx": accuracy(job.runner(proto, "all")(job.inputs.numpy()), labels)}
    drop = acc["float"] - acc["onnx"]
    if drop <= max_drop:
        return acc, []
    return acc, [Note(PTQ_COST, f"post-training quantization costs {drop:.2%} top-1 on "
                                f"{job.source} ({acc['float']:.2%} float -> {acc['onnx']:.2%} "
                                f"quantized), more than max_drop {max_drop:.2%}: distil a "
                                f"student instead (lowbit distill)")]


def _kernel_note(proto: onnx.ModelProto, layers, nbits: Sequence[str] = ()
                 ) -> tuple[dict[str, int], list[Note]]:
    """The conv/linear kernels onnxruntime runs for ``proto``, and a note naming each layer
    left in float (``describe``'s reason; ``nbits``: layers that run as MatMulNBits)."""
    kernels = count_kernels(proto)
    expected = [r for r in layers if r.weight_bits is not None and not r.integer
                and r.name not in nbits]
    if not (expected or kernels["float"]):
        return kernels, []
    return kernels, [Note(FLOAT_LAYERS,
                          f"{kernels['float']} of {kernels['float'] + kernels['integer']} "
                          f"conv/linear layers run as float kernels in onnxruntime: " +
                          "; ".join(f"{r.name}: {r.kernel}" for r in expected))]


def _file_forms(built: Built, baked: nn.Module, data: dict[str, Any], options: ExportOptions
                ) -> tuple[Built, Feed, dict[str, Any]]:
    """The ONNX graph in the forms the options ask for: raw-pixel input (a lookup of the
    student's own input codes, ``_rawinput``) and MatMulNBits Linear layers (``_nbits``);
    with what the gate feeds it and the MatMulNBits record (empty without)."""
    feed: Feed = None
    if options.input == "uint8":
        built = replace(built, proto=raw_pixel_graph(built.proto, baked, data, options.layout))
        feed = pixel_feed(data, options.layout)
    linear: dict[str, Any] = {}
    if options.linear_kernel == "nbits":
        proto, linear = use_matmul_nbits(built.proto, built.layers, built.storage, options.nbits)
        built = replace(built, proto=proto)
    return built, feed, linear


def export(model: nn.Module, path: str | Path, *, example_input: torch.Tensor | None = None,
           bits: int | None = None, formats: Sequence[str] = FORMATS, opset: int | None = None,
           verify: Any = None, calib: Any = None, data: Any = None,
           thresholds: Thresholds = DEFAULT_THRESHOLDS, weight_form: str = "cast",
           ternary_storage: str = "trits", residual_add: str = "auto",
           act_bits: int | None = None, layer_bits: dict[str, Any] | None = None,
           ptq: PTQConfig = DEFAULT_PTQ, progress: bool = True,
           linear_kernel: str = "qdq", nbits: NBits = DEFAULT_NBITS,
           input: str = "float", layout: str = "nchw",  # noqa: A002  (the issue's keyword)
           ) -> ExportResult:
    """Export a quantized student (or post-training quantize a float model) as verified files.

    ``formats``: "onnx" (packed standard ONNX, written to ``path``) and/or "qonnx" (Brevitas'
    QONNX export cleaned by qonnx; ``path`` itself when it is the only format, else
    :func:`qonnx_path`). ``bits`` must match a student's weight bits; a float model needs
    ``bits`` and ``calib`` (data as ``lowbit.data.as_data`` takes it, or a tensor of
    normalised inputs) and is quantized post-training to ``bits``-bit weights and
    ``act_bits``-bit activations (default ``QuantSpec``'s) with ``layer_bits`` (QuantSpec's
    ``first_bits``, ``last_bits``, ``overrides``: which layers stay wider; a student must
    match its own), calibrated as ``ptq`` says
    (:class:`lowbit.quant.PTQConfig`: method max/percentile/mse, examples, ``max_drop``).
    ``verify``: data for the gate (anything ``as_data`` takes, or a tensor of normalised
    inputs; default: 256 random N(0, 1) inputs); when it has labels, a post-training
    quantized export measures the float model's and the file's accuracy
    (``result.accuracy``) and warns (``result.warnings``) when the drop exceeds
    ``ptq.max_drop``. ``data``: the
    data the model takes (or a checkpoint data dict) for the metadata (classes, mean/std;
    without it no normalisation is recorded). ``weight_form``: "cast" (INT2/INT4 ->
    Cast(INT8) -> DequantizeLinear, folded at load into int8 kernels) or "dequant"
    (DequantizeLinear on the packed tensor).
    ``ternary_storage``: "trits" (5 per byte, any opset) or "int" (INT2 at opset 25, the
    ladder below it). ``residual_add``: "integer" (onnxruntime fuses residual adds into
    QLinearAdd: fastest, but it rounds slightly differently, see ``FloatResidualAdds``),
    "float" (they run in float between the integer convolutions: exact) or "auto" (integer
    when it passes the gate, else float, with a note). ``progress``: bars while calibration
    and the gate run (on a terminal only). ``linear_kernel``: "qdq" (Linear layers as
    DequantizeLinear -> Gemm, portable) or "nbits" (onnxruntime's MatMulNBits as ``nbits``
    says, gated by its bound unless it computes in float: ``_nbits``). ``input``: what the
    ONNX file takes, "float" (normalised float32 ``[N, C, H, W]``) or "uint8" (raw pixels: the
    model's normalisation and input quantization run inside, ``_rawinput``; needs ``data``
    with mean/std; the gate feeds it the verification pixels), in ``layout`` "nchw" or "nhwc"
    (``[N, H, W, C]``); the QONNX file keeps float input. Raises ExportError, writing nothing,
    when the gate fails; what happened is in ``result.notes`` (typed
    :class:`~lowbit.export.Note`).
    """
    options = ExportOptions(tuple(formats), DEFAULT_OPSET if opset is None else opset,
                            weight_form, ternary_storage, residual_add, thresholds, progress,
                            linear_kernel, nbits, input, layout)
    path = Path(path)
    data = data_facts(data, example_input)
    check_form(input, layout, data)
    example = example_input if example_input is not None else \
        torch.zeros((1, *data["input_shape"]))
    student, notes = student_of(model, bits, calib, act_bits, dict(layer_bits or {}), ptq,
                                data, progress)
    inputs, labels, source = verify_inputs(verify, example, data, pixels=input == "uint8")

    from ..quant import bake_integer_bias, describe

    baked = bake_integer_bias(student)  # integer biases as plain biases: traceable
    built = build_onnx(baked, example, opset=options.opset, weight_form=weight_form,
                       ternary_storage=ternary_storage)
    built, feed, linear = _file_forms(built, baked, data, options)
    job = _Job(options, student, baked, example, built, inputs, source, notes, feed, linear)
    files = {fmt: EXPORTERS[fmt](job) for fmt in options.formats}
    _refuse_failed(job, files)
    acc, cautions = {}, []
    if student is not model and labels is not None and "onnx" in files:  # PTQ: its cost
        acc, cautions = _ptq_cost(model, job, files["onnx"].proto, labels, ptq.max_drop)
    layers = describe(student, example)
    kernels: dict[str, int] = {}
    if "onnx" in files:
        kernels, more = _kernel_note(files["onnx"].proto, layers, linear.get("layers", ()))
        notes += more
    paths = {fmt: path if fmt == "onnx" or options.formats == ("qonnx",) else qonnx_path(path)
             for fmt in files}
    writes = {}
    for fmt, file in files.items():
        props = metadata(student, data, built.storage, [job.checks[r] for r in file.ran],
                         len(built.step), layers, file.contract)
        if fmt == "onnx":
            props.update(form_metadata(built.storage, linear, options.input, options.layout))
        onnx.helper.set_model_props(file.proto, props)
        seal(file.proto)  # format version and digests of the bytes written: the last step
        writes[paths[fmt]] = lambda tmp, p=file.proto: onnx.save(p, tmp)
    atomic_write_all(writes)  # the ONNX and QONNX files as a pair: both or neither
    return ExportResult(paths, job.checks, built.storage, student.lowbit_quant, tuple(notes),
                        accuracy=acc, warnings=tuple(cautions), layers=layers,
                        kernels=kernels, contract=files["onnx"].contract if "onnx" in files
                        else (), linear=linear)
