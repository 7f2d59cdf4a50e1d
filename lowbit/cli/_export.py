"""``lowbit-export`` / ``lowbit export``: a checkpoint (student, or float quantized
post-training) to packed ONNX and QONNX, verified before it is written."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import _choices as c
from . import _base as b

DESCRIPTION = (
    "Export a lowbit checkpoint as packed ONNX (ternary weights as trits, five per byte; 4-bit "
    "as INT4) that stock onnxruntime runs, and/or as QONNX. A float checkpoint is quantized "
    "post-training to --bits, calibrated on --data's training split. BatchNorm is folded, "
    "activations are quantized exactly as in the student. After building, each file is run on "
    "the verification inputs (--data's test split) and compared with the PyTorch student, "
    "with onnxruntime's float kernels (the file's reference semantics) and with the integer "
    "kernels it fuses for speed; if that fails, nothing is written and the exit status is 2. "
    "Files are written atomically.")
_GATE = ("min_agreement", "max_steps", "max_near_ties")
_PTQ = {"calib_method": "method", "calib": "calib", "percentile": "percentile",
        "max_drop": "max_drop"}


def help_defaults() -> dict[str, Any]:
    """Defaults ``--help`` shows (read from the library configs)."""
    from dataclasses import asdict

    from ..export import NBits, Thresholds
    from ..quant import PTQConfig, QuantSpec

    ptq, spec = asdict(PTQConfig()), QuantSpec()
    nbits = NBits()
    return {**asdict(Thresholds()), **{arg: ptq[field] for arg, field in _PTQ.items()},
            "first_bits": spec.first_bits, "last_bits": spec.last_bits or "same",
            "nbits_block": nbits.block_size, "nbits_accuracy": nbits.accuracy_level,
            "nbits_min_weights": nbits.min_weights}


def arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lowbit-export`` (also ``lowbit export``)."""
    p.add_argument("model", help="lowbit checkpoint (.pt) or a shipped one by name: a quantized "
                   "student (lowbit distill) or a float model (quantized post-training to "
                   "--bits)")
    b.arch_options(p, "architecture the checkpoint holds (needed when it names user code)")
    b.bits_option(p, "a float checkpoint's precision (a student is exported as trained; a "
                  "contradicting --bits is an error)")
    b.layer_width_options(p, "post-training quantization; a student keeps its own")
    b.data_option(p, "data: its training split calibrates a float checkpoint, its test split "
                  "verifies the file and measures accuracy")
    p.add_argument("--calib-data", default=None, metavar="SPEC",
                   help="calibrate on this data's training split instead of --data's")
    p.add_argument("--verify-data", default=None, metavar="SPEC|random",
                   help="verify on this data's test split instead of --data's; random: 256 "
                   "random inputs (agreement with the student only, no accuracy)")
    b.limit_option(p, "verification examples")
    p.add_argument("--calib", type=b.positive, default=None, metavar="N",
                   help="post-training quantization: calibration examples")
    p.add_argument("--calib-method", choices=c.CALIB_METHODS, default=None,
                   help="post-training quantization: activation-range calibration (max |x|; "
                   "a percentile of |x|; the range of least squared error)")
    p.add_argument("--percentile", type=float, default=None,
                   help="--calib-method percentile: the percentile of |x| taken as the range")
    p.add_argument("--max-drop", type=float, default=None, metavar="FRACTION",
                   help="post-training quantization: warn when the file's top-1 accuracy "
                   "falls more than this below the float model's")
    b.output_option(p, "output .onnx (default: MODEL.onnx; QONNX goes to OUT.qonnx.onnx)")
    _file_options(p)
    _gate_options(p)
    b.threads_option(p, "torch")
    b.quiet_option(p)
    p.set_defaults(func=_export)


def _file_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=[*c.FORMATS, "both"], default="both",
                   help="onnx: packed standard ONNX for onnxruntime; qonnx: Brevitas QONNX "
                   "(Quant nodes, float weights) for qonnx/FINN")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (None: 25; 21-24 store 4-bit (and --ternary-storage int "
                   "ternary) weights as INT4, 13-20 as INT8, for older runtimes)")
    p.add_argument("--weight-form", choices=c.WEIGHT_FORMS, default="cast",
                   help="cast: INT2/INT4 -> Cast(INT8) -> DequantizeLinear, folded at load "
                   "into int8 kernels (fast); dequant: DequantizeLinear on the packed weights "
                   "(trits are always decoded to int8 first)")
    p.add_argument("--residual-add", choices=c.RESIDUAL_ADDS, default="auto",
                   help="integer: residual adds fused into onnxruntime's QLinearAdd (fastest; "
                   "its rounding differs slightly from the student's); float: in float between "
                   "the integer convolutions (exact, slower: benchmarks/results/README.md, "
                   "Runtime speed); auto: integer when it passes the gate, else float")
    p.add_argument("--ternary-storage", choices=c.TERNARY_STORAGE, default="trits",
                   help="ternary weights as trits (five per byte, 1.6 bits, decoded by a "
                   "constant Gather onnxruntime folds at load) or as ONNX integers "
                   "(INT2 at opset 25, INT4 at 21-24, INT8 below)")
    p.add_argument("--ort", action="store_true",
                   help="also write MODEL.ort (onnxruntime's ORT format, as lowbit convert-ort)")
    p.add_argument("--input", choices=c.INPUTS, default="float",
                   help="float: the file takes normalised float32; uint8: raw pixels, "
                   "normalised and quantized inside the file (any onnxruntime app feeds it image "
                   "bytes; needs a model trained on uint8 images, whose mean/std it records)")
    p.add_argument("--layout", choices=c.LAYOUTS, default="nchw",
                   help="with --input uint8: pixels as [N, C, H, W] or [N, H, W, C]")
    _nbits_options(p)


def _nbits_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--linear-kernel", choices=c.LINEAR_KERNELS, default="qdq",
                   help="qdq: Linear layers as DequantizeLinear -> Gemm (portable, exact); "
                   "nbits: wide ones as onnxruntime's MatMulNBits, 2/4/8-bit blocks read "
                   "directly (much faster at batch 1; verified to a stated bound, see "
                   "NBits in lowbit.export)")
    p.add_argument("--nbits-block", type=b.positive, default=None, metavar="N",
                   help="nbits: weights per block along the input (a power of two >= 16)")
    p.add_argument("--nbits-accuracy", type=int, choices=[1, 4], default=None,
                   help="nbits: 4 quantizes each input block to int8 on the fly (fast; a "
                   "bound, not exact); 1 computes in float (exact; slow for 2-bit weights)")
    p.add_argument("--nbits-min-weights", type=b.non_negative, default=None, metavar="N",
                   help="nbits: Linear layers with fewer weights stay Gemm")
    p.add_argument("--lut-gemm", action="store_true",
                   help="nbits: verify and run 2-bit layers with onnxruntime's table-lookup "
                   "kernels (session entry mlas.use_lut_gemm, set by lowbit's runtime)")


def _gate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="gate: least top-1 agreement with the PyTorch student")
    p.add_argument("--max-steps", type=b.non_negative_float, default=None, metavar="STEPS",
                   help="gate: largest logit difference of the median input in output "
                   "quantization steps (one flipped code of the last activation times the "
                   "largest last-layer weight); the maximum over inputs is reported")
    p.add_argument("--max-near-ties", type=float, default=None, metavar="FRACTION",
                   help="gate: largest fraction of the inputs whose top-1 flip counts as "
                   "agreeing because the student's top two classes are within the logit bound "
                   "(a near-tie)")


def _sources(args: argparse.Namespace) -> tuple[str, str | None]:
    """(verification data spec or "random", calibration data spec or None), refused before
    anything loads when the command line names neither."""
    from ..errors import UsageError

    verify = args.verify_data or args.data
    if verify is None:
        raise UsageError("the file is verified against the model before it is written: pass "
                         "--data SPEC (its test split; a float model also calibrates on its "
                         f"training split; {b.DATA_SPECS}) or --verify-data random (random "
                         "inputs: agreement only, no accuracy)")
    return verify, args.calib_data or args.data


def _load(args: argparse.Namespace, calib_spec: str | None):
    """(model, checkpoint, whether it is quantized post-training): every missing argument
    is reported together, in one line."""
    from .. import _checkpoint
    from ..errors import CheckpointError, UsageError

    ckpt = _checkpoint.load(args.model)
    problems, model = [], None
    try:
        model = _checkpoint.build(ckpt, allow=b.allowed(args), expect=args.arch,
                                  arch_kwargs=args.arch_kwargs, where=str(args.model))
    except CheckpointError as exc:
        problems.append(str(exc))
    ptq = ckpt.get("quant") is None
    if ptq and args.bits is None:
        problems.append(f"{args.model} is a float model: name the precision to quantize it "
                        f"to post-training with --bits W[/A] (e.g. --bits 4, --bits 8)")
    if ptq and calib_spec is None:
        problems.append(f"{args.model} is a float model: post-training quantization calibrates "
                        f"on data: pass --data SPEC (or --calib-data SPEC)")
    if problems:
        raise UsageError("; ".join(problems))
    return model, ckpt, ptq


def _export(args: argparse.Namespace) -> None:
    verify_spec, calib_spec = _sources(args)  # before torch loads
    from .. import _checkpoint, data
    from ..export import Thresholds, export, qonnx_path
    from ..quant import PTQConfig

    thresholds = Thresholds(**b.given(args, _GATE))
    ptq = PTQConfig(**{field: getattr(args, arg) for arg, field in _PTQ.items()
                       if getattr(args, arg) is not None})
    b.set_threads(args)
    model, ckpt, ptq_run = _load(args, calib_spec)
    out, formats = _outputs(args)
    b.claim(args, [out, qonnx_path(out) if len(formats) == 2 else None,
                   out.with_suffix(".ort") if args.ort and "onnx" in formats else None],
            [args.model, *b.spec_paths(verify_spec, calib_spec)])
    verify = calib = None
    if verify_spec != "random":
        verify = data.load(verify_spec, train=False)
        _checkpoint.check_data(ckpt, verify, args.model, f"--data {verify_spec}")
        verify = verify.subset(args.limit) if args.limit else verify
    if ptq_run:
        calib = data.load(calib_spec, train=True)
    w, a = b.resolved_bits(args.bits) if ptq_run else (args.bits or (None, None))
    if ptq_run:
        print(f"{args.model} is a float model: quantizing it post-training to {w}-bit weights, "
              f"{a}-bit activations with {min(len(calib), ptq.calib)} calibration examples of "
              f"{calib.name} ({ptq.method}); 'lowbit distill' recovers what this costs.",
              file=sys.stderr)
    result = export(model, out, bits=w, act_bits=a, layer_bits=b.layer_widths(args),
                    formats=formats, opset=args.opset, verify=verify, calib=calib, ptq=ptq,
                    data=ckpt["data"], weight_form=args.weight_form, thresholds=thresholds,
                    ternary_storage=args.ternary_storage, residual_add=args.residual_add,
                    linear_kernel=args.linear_kernel, nbits=_nbits(args), input=args.input,
                    layout=args.layout, progress=not args.quiet)
    _print_result(args, result, verify)


def _nbits(args: argparse.Namespace):
    """``--nbits-*``/``--lut-gemm`` as the export's ``NBits`` (library defaults for the rest)."""
    from ..export import NBits

    fields = {"block_size": args.nbits_block, "accuracy_level": args.nbits_accuracy,
              "min_weights": args.nbits_min_weights, "lut_gemm": args.lut_gemm or None}
    return NBits(**{k: v for k, v in fields.items() if v is not None})


def _outputs(args: argparse.Namespace):
    """(the .onnx path, the formats written)."""
    from pathlib import Path

    from ..export import qonnx_path

    given = Path(args.model)  # a shipped checkpoint's name: the file goes to NAME.onnx here
    out = Path(args.output) if args.output else \
        given.with_suffix(".onnx") if given.exists() else Path(f"{args.model}.onnx")
    formats = {"onnx": ("onnx",), "qonnx": ("qonnx",), "both": ("onnx", "qonnx")}[args.format]
    if not args.output and formats == ("qonnx",):
        out = qonnx_path(out)  # MODEL.qonnx.onnx, as with --format both
    return out, formats


def _print_result(args: argparse.Namespace, result, verify) -> None:
    prog = getattr(args, "prog", "lowbit-export")
    details = [result.layers, result.arithmetic, result.linear_kernels,
               *result.verification.values()]
    if result.kernels:
        details.insert(1, f"onnxruntime kernels: {result.kernels['integer']} integer, "
                       f"{result.kernels['float']} float conv/linear")
    for line in details if not args.quiet else ():
        if line:
            print(line)
    if result.accuracy:
        a = result.accuracy
        print(f"top-1 accuracy on {len(verify):,} {verify.name} {verify.split} examples: float "
              f"{a['float']:.2%}, quantized file {a['onnx']:.2%} (drop "
              f"{a['float'] - a['onnx']:.2%})")
    if verify is None and not args.quiet:
        print("verified on random inputs (--verify-data random): the file agrees with the "
              "model, but no accuracy was measured; pass --data SPEC to measure it")
    for note in [n for n in result.notes if n.kind != "ptq"] if not args.quiet else ():  # said
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    kinds = sorted(set(result.storage.values()))
    raw = f"input: raw uint8 pixels, {args.layout.upper()}"
    for fmt, path in result.paths.items():
        print(f"{fmt}: {path} ({path.stat().st_size:,} bytes; weights stored as "
              f"{', '.join(kinds) if fmt == 'onnx' else 'float32 + Quant nodes'}; "
              f"{raw if fmt == 'onnx' and args.input == 'uint8' else 'input: normalised float32'})")
    if args.ort and "onnx" in result.paths:
        from ..runtime import convert_ort

        ort_path = convert_ort(result.paths["onnx"])
        print(f"ort: {ort_path} ({ort_path.stat().st_size:,} bytes; onnxruntime's ORT format, "
              f"optimised for this CPU's instruction set family)")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "export", summary="export a checkpoint as packed ONNX / QONNX (verified)",
                     description=DESCRIPTION, defaults=help_defaults)
    arguments(p)
    p.set_defaults(prog="lowbit export")
