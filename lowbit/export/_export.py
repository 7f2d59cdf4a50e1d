"""``export(model, path)``: a quantized student -> packed ONNX (+ QONNX), verified, atomic.

Standard ONNX: the student traced in plain torch (``_trace``), then the rewrites of
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

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.general import RemoveStaticGraphInputs

from .. import __version__, _pixels
from .. import _onnx_meta as meta
from .._backend import FLOAT_KERNELS, INTEGER_KERNELS, NBITS_OP, cpu_features
from .._choices import FORMATS, LINEAR_KERNELS, RESIDUAL_ADDS, TERNARY_STORAGE, WEIGHT_FORMS
from .._integrity import seal
from .._io import atomic_write_all
from ..quant import PTQConfig
from ._contract import KernelCheck, check_kernels, summary
from ._nbits import NBits, use_matmul_nbits
from ._nbits import summary as nbits_summary
from ._rawinput import check_form, pixel_feed, raw_pixel_graph
from ._rewrites import (
    DropDefaultAttributes,
    ExportError,
    FloatResidualAdds,
    FoldBatchNorm,
    PackWeights,
    QuantizeActivations,
    QuantizeBias,
    SetOpset,
    ShareConstants,
    ShortenNames,
)
from ._trace import TRACE_OPSET, Act, shadow, trace
from ._verify import RANDOM, Thresholds, Verification, compare, locate

DEFAULT_OPSET = 25
MIN_OPSET = 13  # per-axis DequantizeLinear
RANDOM_INPUTS = 256
KERNEL_INPUTS = 4  # verification inputs the saturating-kernel model runs on
DEFAULT_THRESHOLDS = Thresholds()
DEFAULT_PTQ = PTQConfig()
DEFAULT_NBITS = NBits()
Feed = Callable[[np.ndarray], np.ndarray] | None  # normalised inputs -> what the file takes


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
    notes: tuple[str, ...] = field(default_factory=tuple)
    accuracy: dict[str, float] = field(default_factory=dict)  # PTQ: "float" and "onnx" top-1
    warnings: tuple[str, ...] = field(default_factory=tuple)  # what the user should act on
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


def optimized_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types of the graph onnxruntime runs for ``proto`` at the default ("all") level."""
    import tempfile

    from ..runtime._session import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimization="all")
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def count_kernels(proto: onnx.ModelProto) -> dict[str, int]:
    """How many conv/linear layers onnxruntime runs as integer and as float kernels (and as
    MatMulNBits, "nbits", where there are any)."""
    ops = optimized_ops(proto)
    nbits = ops.count(NBITS_OP)
    return {"integer": sum(op in INTEGER_KERNELS for op in ops),
            "float": sum(op in FLOAT_KERNELS for op in ops), **({"nbits": nbits} if nbits else {})}


def _data_info(data: Any, example: torch.Tensor | None) -> dict[str, Any]:
    """Metadata about the inputs: a ``lowbit.data.Dataset``, a checkpoint's data dict or None."""
    if data is not None and not isinstance(data, dict):
        from .._checkpoint import data_info

        data = data_info(data)
    if data is None:
        if example is None:
            raise ExportError("give example_input (or data) so the input shape is known")
        # normalisation unknown: the file takes inputs as they are (none recorded)
        data = {"name": "unknown", "classes": None, "mean": None, "std": None,
                "input_shape": list(example.shape[1:])}
    return data


def _student(model: nn.Module, bits: int | None, calib: Any, act_bits: int | None,
             layer_bits: dict[str, Any], ptq: PTQConfig, data: dict[str, Any],
             progress: bool) -> tuple[nn.Module, list[str]]:
    """The model as a quantized student: as trained, or post-training quantized to ``bits``
    (``layer_bits``: QuantSpec's first_bits / last_bits / overrides)."""
    from ..data import stats_of
    from ..quant import QuantSpec, calibrate_data, quantize

    spec = getattr(model, "lowbit_quant", None)
    if spec is not None:
        asked = QuantSpec(**{**spec.to_dict(), **layer_bits})
        for key in layer_bits:
            if getattr(asked, key) != getattr(spec, key):
                raise ExportError(f"the model is a student trained with {key} = "
                                  f"{getattr(spec, key)} but {getattr(asked, key)} was asked; "
                                  f"export it as trained or distill another student")
        if bits is not None and bits != spec.weight_bits:
            raise ExportError(f"the model is a {spec.weight_bits}-bit student but {bits}-bit "
                              f"export was asked; export it at {spec.weight_bits} bits (drop "
                              f"--bits) or distill a {bits}-bit student")
        if act_bits is not None and act_bits != spec.act_bits:
            raise ExportError(f"the model is a student with {spec.act_bits}-bit activations "
                              f"but {act_bits} were asked; drop --act-bits")
        return model.eval(), []
    if bits is None:
        raise ExportError("the model is a float model: give bits (2 = ternary, 4 or 8) to "
                          "quantize it post-training")
    if calib is None:
        raise ExportError("post-training quantization of a float model needs calibration "
                          "data (calib=...)")
    spec = QuantSpec(weight_bits=bits, **({} if act_bits is None else {"act_bits": act_bits}),
                     **layer_bits)
    student, n = calibrate_data(quantize(model, spec), calib, ptq, stats_of(data), progress)
    note = (f"float model quantized post-training to {bits}-bit weights and {spec.act_bits}-bit "
            f"activations ({ptq.method} calibration on {n} examples); expect an accuracy "
            f"drop, 'lowbit distill' (quantization-aware training) recovers it")
    warnings.warn(note, stacklevel=3)
    return student, [note]


def _output_step(layers, acts: list[Act]) -> np.ndarray:
    """Output step per class: s_a * max_j |W[c, j]| of the last layer (see ``_verify``)."""
    last = layers[-1]
    w = (last.int_weight.double() * last.scale.double().reshape(-1, *[1] * (
        last.int_weight.ndim - 1))).abs().flatten(1).amax(1).numpy()
    s_a = float(np.max(acts[-1].scale)) if acts else 1.0
    return np.maximum(w * s_a, np.finfo(np.float32).tiny)


def _verify_inputs(verify: Any, example: torch.Tensor, data: dict[str, Any],
                   pixels: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(normalised float inputs, labels or None, source name) for the gate; user data is
    normalised as the model's ``data`` says. ``pixels``: random inputs are random uint8
    pixels, normalised (a raw-pixel-input file is fed those pixels)."""
    if verify is None:
        gen = torch.Generator().manual_seed(0)
        shape = (RANDOM_INPUTS, *example.shape[1:])
        if pixels:
            drawn = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()
            return torch.from_numpy(_pixels.normalize(drawn, data["mean"], data["std"])), \
                None, RANDOM
        return torch.randn(shape, generator=gen), None, RANDOM
    if isinstance(verify, torch.Tensor):
        return verify.float(), None, "given"
    from ..data import as_data, stats_of

    verify = as_data(verify, stats=stats_of(data))
    xs, ys = zip(*verify.loader(RANDOM_INPUTS), strict=True)
    return torch.cat(xs), torch.cat(ys), verify.name


def _accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(1) == labels).float().mean())


def _onnx_runner(proto: onnx.ModelProto, optimization: str, config: dict | None = None,
                 feed: Feed = None):
    """``x -> logits`` in onnxruntime: "basic" runs float kernels (the graph's reference
    semantics), "all" the integer kernels it fuses (what ``lowbit.runtime`` runs), with the
    session ``config`` entries the file asks for (``meta.LINEAR``); ``feed``: what the file
    takes for the normalised inputs ``x`` (a raw-pixel-input file: pixels)."""
    from ..runtime._session import session_options

    sess = ort.InferenceSession(proto.SerializeToString(),
                                session_options(optimization=optimization, config=config),
                                providers=["CPUExecutionProvider"])
    feed = feed or (lambda x: x)
    return lambda x: sess.run([meta.OUTPUT_NAME], {meta.INPUT_NAME: feed(x)})[0]


def build_onnx(student: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET,
               weight_form: str = "cast", ternary_storage: str = "trits",
               ) -> tuple[onnx.ModelProto, dict[str, str], list, list[Act]]:
    """The packed standard-ONNX graph of a baked ``student`` (``bake_integer_bias``: no
    eval-mode hooks to trace), unverified and without metadata, with the weight storage per
    layer and the student's layer and activation infos. Residual adds stay ``Add``."""
    from ..quant import act_quants, quant_layers, weight_storages

    layers = quant_layers(student)
    acts = [Act(a.name, a.bits, a.signed, a.scale.detach().float().numpy(),
                a.zero_point.detach().numpy().round().astype(np.int64))
            for a in act_quants(student)]
    if not layers:
        raise ExportError("the student has no quantized conv/linear layer")
    traced = trace(shadow(student, layers, acts), example, min(opset, TRACE_OPSET))
    storage = weight_storages(student, opset, ternary_storage)
    params = {t.name for t in traced.graph.initializer}
    codes = {}
    for info in layers:
        wname = info.name + ".weight"
        if wname not in params:
            raise ExportError(f"{info.name}: weight not found in the traced graph")
        codes[wname] = (info.int_weight.detach().numpy(), storage[info.name])
    scales = {a.name: a.scale for a in acts}
    bias_inputs = {info.name + ".weight": np.float32(scales[info.bias_input])
                   for info in layers if info.bias_input is not None}
    model = ModelWrapper(traced)
    for rewrite in (RemoveStaticGraphInputs(), FoldBatchNorm(),
                    PackWeights(codes, cast=weight_form == "cast"), QuantizeBias(bias_inputs),
                    QuantizeActivations(),
                    SetOpset(opset, min(opset, TRACE_OPSET))):
        model = model.transform(rewrite)
    keep = frozenset([*storage, meta.TRITS_TABLE])  # layer-named weights, the shared trit table
    for rewrite in (ShareConstants(), DropDefaultAttributes(), ShortenNames(keep)):
        model = model.transform(rewrite, cleanup=False)  # cleanup would un-share constants
    proto = model.model
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}"
                          ) from None
    return proto, storage, layers, acts


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))  # compact: metadata counts in the file size


def _layer_table(layers) -> list[list]:
    """Per conv/linear, in the order of the storage metadata's layer names (forward order):
    [weight bits, input code bits or None (float input), 1 if an integer kernel else 0]."""
    return [[r.weight_bits, r.input_bits, int(r.integer)] for r in layers
            if r.weight_bits is not None]


def _kernel_record(contract: Sequence[KernelCheck]) -> dict[str, Any]:
    """The file's arithmetic guarantee (``meta.KERNELS``)."""
    pairs = [c.bound.pair for c in contract if c.bound.pair is not None]
    return {"exact": all(c.passed for c in contract), "layers": len(contract),
            "pair": max(pairs, default=None),
            "int32": max((c.bound.int32 for c in contract), default=0),
            "cpu": cpu_features(), "onnxruntime": ort.__version__}


def _metadata(student: nn.Module, data: dict[str, Any], storage: dict[str, str],
              verification: list[Verification], num_classes: int,
              layers=(), contract: Sequence[KernelCheck] = ()) -> dict[str, str]:
    spec = student.lowbit_quant
    classes = data.get("classes") or [str(i) for i in range(num_classes)]
    return {meta.VERSION: __version__, meta.WEIGHT_BITS: _json(spec.weight_bits),
            meta.LAYERS: _json(_layer_table(layers)),
            meta.ACT_BITS: _json(spec.act_bits),
            meta.QUANT_SPEC: _json(spec.to_dict()), meta.STORAGE: _json(storage),
            meta.CLASSES: _json(list(classes)), meta.MEAN: _json(data["mean"]),
            meta.STD: _json(data["std"]),
            meta.INPUT_SHAPE: _json(list(data["input_shape"])),
            meta.ARCH: _json(getattr(student, "lowbit_arch", None)),
            meta.VERIFICATION: _json([v.to_dict() for v in verification]),
            meta.KERNELS: _json(_kernel_record(contract))}


def _set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    onnx.helper.set_model_props(proto, props)


def qonnx_path(path: Path) -> Path:
    """Where the QONNX file goes next to the ONNX file ``path``: ``name.qonnx.onnx``."""
    return path.with_name(path.stem + ".qonnx.onnx")


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
    (``result.accuracy``) and warns when the drop exceeds ``ptq.max_drop``. ``data``: the
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
    (``[N, H, W, C]``); the QONNX file keeps float input.
    Raises ExportError, writing nothing, when the gate fails.
    """
    path = Path(path)
    formats = tuple(dict.fromkeys(formats))
    if not formats or set(formats) - set(FORMATS):
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    if weight_form not in WEIGHT_FORMS:
        raise ExportError(f"weight_form must be one of {WEIGHT_FORMS}, got {weight_form!r}")
    if residual_add not in RESIDUAL_ADDS:
        raise ExportError(f"residual_add must be one of {RESIDUAL_ADDS}, got {residual_add!r}")
    if ternary_storage not in TERNARY_STORAGE:
        raise ExportError(f"ternary_storage must be one of {TERNARY_STORAGE}, got "
                          f"{ternary_storage!r}")
    if linear_kernel not in LINEAR_KERNELS:
        raise ExportError(f"linear_kernel must be one of {LINEAR_KERNELS}, got {linear_kernel!r}")
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is not supported: choose {MIN_OPSET}..{DEFAULT_OPSET} "
                          f"(25: INT2 ternary, 21-24: INT4, < 21: INT8 weights)")
    data = _data_info(data, example_input)
    check_form(input, layout, data)
    example = example_input if example_input is not None else \
        torch.zeros((1, *data["input_shape"]))
    student, notes = _student(model, bits, calib, act_bits, dict(layer_bits or {}), ptq, data,
                              progress)
    inputs, labels, source = _verify_inputs(verify, example, data, pixels=input == "uint8")

    from ..quant import bake_integer_bias

    built: dict[str, tuple[Path, onnx.ModelProto]] = {}
    checks: dict[str, Verification] = {}
    baked = bake_integer_bias(student)  # integer biases as plain biases: traceable
    proto, storage, layers, acts = build_onnx(baked, example, opset=opset,
                                              weight_form=weight_form,
                                              ternary_storage=ternary_storage)
    feed = None
    if input == "uint8":  # raw pixels in: the lookup replaces the input's QuantizeLinear
        proto, feed = raw_pixel_graph(proto, baked, data, layout), pixel_feed(data, layout)
    step = _output_step(layers, acts)
    linear: dict[str, Any] = {}
    if linear_kernel == "nbits":
        proto, linear = use_matmul_nbits(proto, layers, storage, nbits)
    gate = nbits.bound if linear.get("contract") == "bound" else thresholds

    def float_adds(proto: onnx.ModelProto) -> onnx.ModelProto:
        # no value_info for initializers (ModelWrapper's default fix adds ~2 KB to the file)
        wrapped = ModelWrapper(proto, make_deepcopy=True,
                               fix_missing_initializer_valueinfo=False)
        return FloatResidualAdds().apply(wrapped)[0].model

    def check_onnx(proto: onnx.ModelProto) -> None:
        checks["onnx"] = compare("onnx", source, student,
                                 _onnx_runner(proto, "basic", feed=feed), inputs, step, gate,
                                 progress=progress)
        checks["onnx-int"] = compare("onnx-int", source, student,
                                     _onnx_runner(proto, "all", linear.get("session"), feed),
                                     inputs, step, gate, progress=progress)

    if "onnx" in formats:
        if residual_add == "float":
            proto = float_adds(proto)
        check_onnx(proto)
        # "auto": the faster integer adds, unless they miss the gate where float adds pass
        if residual_add == "auto" and checks["onnx"].passed and not checks["onnx-int"].passed:
            notes.append(f"integer residual adds (onnxruntime's QLinearAdd) agreed on "
                         f"{checks['onnx-int'].agreement:.2%} only; residual adds kept in float")
            proto = float_adds(proto)
            check_onnx(proto)
        built["onnx"] = (path, proto)
    if "qonnx" in formats:
        from ._qonnx import build_qonnx, qonnx_runner

        qproto = build_qonnx(baked, example)
        # qonnx's Python executor is slow: a subset of the verification inputs suffices for
        # the QONNX graph, which runs Brevitas' own quantizer math.
        checks["qonnx"] = compare("qonnx", source, student, qonnx_runner(qproto),
                                  inputs[:32], step, thresholds, batch_size=8,
                                  progress=progress)
        built["qonnx"] = (path if formats == ("qonnx",) else qonnx_path(path), qproto)
    failed = [str(v) for v in checks.values() if not v.passed]
    contract: tuple[KernelCheck, ...] = ()
    if "onnx" in formats:  # the same answer on every CPU: proven, and modelled on real inputs
        contract = check_kernels(proto, (feed or np.asarray)(inputs[:KERNEL_INPUTS].numpy()),
                                 storage)
        failed += [f"integer kernels not exact on every CPU: {c}" for c in contract
                   if not c.passed]
    if failed:
        # only the integer kernels disagree: look where they run
        level = "all" if "onnx" in checks and checks["onnx"].passed else "basic"
        where = locate(student, proto, acts, inputs[:16], level, feed) \
            if "onnx" in formats else ""
        raise ExportError("verification failed, nothing written: " + "; ".join(failed)
                          + (f"; {where}" if where else ""))
    accuracy, cautions = {}, []
    if student is not model and labels is not None and "onnx" in built:  # PTQ: its cost
        with torch.inference_mode():
            float_logits = model.eval()(inputs)
        accuracy = {"float": _accuracy(float_logits, labels),
                    "onnx": _accuracy(_onnx_runner(built["onnx"][1], "all", linear.get("session"),
                                                   feed)(inputs.numpy()), labels)}
        drop = accuracy["float"] - accuracy["onnx"]
        if drop > ptq.max_drop:
            warning = (f"post-training quantization costs {drop:.2%} top-1 on {source} "
                       f"({accuracy['float']:.2%} float -> {accuracy['onnx']:.2%} quantized), "
                       f"more than max_drop {ptq.max_drop:.2%}: distil a student instead "
                       f"(lowbit distill)")
            warnings.warn(warning, stacklevel=2)
            cautions.append(warning)

    from ..quant import describe

    layers = describe(student)
    kernels: dict[str, int] = {}
    if "onnx" in built:
        kernels = count_kernels(built["onnx"][1])
        expected = [r for r in layers if r.weight_bits is not None and not r.integer
                    and r.name not in linear.get("layers", ())]
        if expected or kernels["float"]:
            notes.append(f"{kernels['float']} of {kernels['float'] + kernels['integer']} "
                         f"conv/linear layers run as float kernels in onnxruntime: " +
                         "; ".join(f"{r.name}: {r.kernel}" for r in expected))
    num_classes = len(step)
    writes = {}
    for fmt, (out, p) in built.items():
        ran = [checks[fmt]] + ([checks["onnx-int"]] if fmt == "onnx" else [])
        props = _metadata(student, data, storage, ran, num_classes, layers,
                          contract if fmt == "onnx" else ())
        if linear and fmt == "onnx":  # MatMulNBits layers: their storage, kernel and gate
            props.update({meta.STORAGE: _json({**storage, **linear["storage"]}),
                          meta.LINEAR: _json(linear)})
        if fmt == "onnx" and input == "uint8":  # absent: normalised float32 NCHW
            props[meta.INPUT] = _json({"dtype": "uint8", "layout": layout})
        _set_metadata(p, props)
        seal(p)  # format version and digests of the bytes written: the last step before it
        writes[out] = lambda tmp, p=p: onnx.save(p, tmp)
    atomic_write_all(writes)  # the ONNX and QONNX files as a pair: both or neither
    return ExportResult({fmt: out for fmt, (out, _) in built.items()}, checks, storage,
                        student.lowbit_quant, tuple(notes), accuracy=accuracy,
                        warnings=tuple(cautions), layers=layers, kernels=kernels,
                        contract=contract, linear=linear)

