"""``lowbit run``, ``bench``, ``convert-ort`` (numpy + onnxruntime only) and ``footprint``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _base as b

_TEST_DATA = ("test data: cifar10:DIR or cifar100:DIR (official python format, test split), "
              "digits (needs scikit-learn) or FILE.npz with arrays 'images' (uint8 [N, C, H, W] "
              "raw pixels, or float inputs of any shape) and 'labels' - the form to use on an "
              "edge install")
_FOOTPRINT_BITS = tuple(range(1, 33))


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported .onnx or .ort file")


def _run(args: argparse.Namespace) -> None:
    from .. import _datafiles
    from .._progress import bar
    from ..runtime import Session

    session = Session(args.model, threads=args.threads, max_batch=args.batch_size,
                      allow_modified=args.allow_modified)
    test = _datafiles.load(args.data, train=False)
    n = min(len(test.labels), args.limit) if args.limit else len(test.labels)
    with bar(total=n, desc="evaluating", unit="example", enabled=not args.quiet) as shown:
        acc = session.evaluate(test, limit=n, progress=shown.update)
    print(f"{args.model}: top-1 accuracy {acc:.2%} on {n:,} {test.name} test examples "
          f"(onnxruntime, threads={args.threads or 'default'})")


def add_run(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "run", summary="accuracy of an exported .onnx/.ort model (no torch "
                     "needed)", description="Evaluate an exported model with the torch-free "
                     "runtime (numpy + onnxruntime): raw uint8 images are normalised with the "
                     "mean/std stored in the file, and the top-1 test accuracy is printed.")
    _model_option(p)
    p.add_argument("--data", required=True, metavar="SPEC", help=_TEST_DATA)
    b.limit_option(p, "test examples")
    b.batch_size_option(p, "examples per onnxruntime call", default=256)
    b.threads_option(p, "onnxruntime intra-op")
    b.allow_modified_option(p)
    b.quiet_option(p)
    p.set_defaults(func=_run)


def _bench(args: argparse.Namespace) -> None:
    from .._io import write_json
    from ..runtime import Session, markdown_table, resident_bytes

    b.claim(args, [args.json], [args.model])
    before = resident_bytes()
    session = Session(args.model, threads=args.threads, allow_modified=args.allow_modified)
    loaded = resident_bytes()
    rows = session.benchmark(args.batch_size, warmup=args.warmup, repeat=args.repeat,
                             min_time=args.min_time)
    print(f"{args.model}: onnxruntime, threads={args.threads or 'default'}; resident memory "
          f"after load {loaded / 2**20:.1f} MiB (+{(loaded - before) / 2**20:.1f} MiB for the "
          f"session)")
    print(markdown_table(rows))
    if args.json:
        write_json(args.json, {"model": str(args.model), "threads": args.threads,
                               "resident_after_load": loaded, "session_bytes": loaded - before,
                               "rows": [r.to_dict() for r in rows]})


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "bench", summary="latency / throughput of an exported model (no torch)",
                     description="Time one onnxruntime call per batch size on random inputs "
                     "(median and p90 latency, examples/s) and report resident memory after "
                     "loading the model.")
    _model_option(p)
    b.batch_size_option(p, "batch sizes", default=[1, 8, 64], many=True)
    b.threads_option(p, "onnxruntime intra-op")
    p.add_argument("--warmup", type=b.non_negative, default=5, help="untimed runs per batch size")
    p.add_argument("--repeat", type=b.positive, default=20,
                   help="minimum timed runs per batch size")
    p.add_argument("--min-time", type=b.non_negative_float, default=0.5,
                   help="minimum seconds of timed runs per batch size")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    b.allow_modified_option(p)
    p.set_defaults(func=_bench)


def _convert(args: argparse.Namespace) -> None:
    import numpy as np

    from ..runtime import Session, convert_ort

    out = Path(args.output) if args.output else Path(args.model).with_suffix(".ort")
    b.claim(args, [out], [args.model])
    out = convert_ort(args.model, out, optimization=args.optimization,
                      allow_modified=args.allow_modified)
    onnx_s, ort_s = Session(args.model, allow_modified=args.allow_modified), Session(out)
    x = np.random.default_rng(0).integers(0, 256, (8, *onnx_s.info.input_shape), dtype=np.uint8)
    x = x if onnx_s.info.mean else x.astype(np.float32) / 255.0  # no metadata: feed floats
    diff = float(np.abs(onnx_s.run(x) - ort_s.run(x)).max())
    print(f"{out}: {out.stat().st_size:,} bytes (ORT format, optimization {args.optimization}); "
          f"max |logit difference| vs {args.model} on 8 random inputs: {diff:.2g}")


def add_convert_ort(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "convert-ort", summary="convert an exported .onnx to onnxruntime's .ort "
                     "format", description="Write the ORT (flatbuffer) format that "
                     "onnxruntime's minimal and mobile builds load, pre-optimised, with lowbit's "
                     "metadata kept; the runtime (lowbit run/bench, lowbit.runtime.Session) "
                     "takes it like the .onnx. Needs only onnxruntime (no onnx package).")
    p.add_argument("model", help="exported .onnx file")
    b.output_option(p, "output .ort (default: MODEL.ort)")
    p.add_argument("--optimization", choices=["disable", "basic", "extended", "all"],
                   default="all", help="graph optimisations baked into the file (all: without "
                   "the CPU-specific NCHWc layout)")
    b.allow_modified_option(p)
    p.set_defaults(func=_convert)


# ------------------------------------------------------------------ footprint

def _footprint_model(args: argparse.Namespace):
    """What ``footprint`` reads: an ONNX path, or a torch model and its input shape (from a
    checkpoint, a shipped checkpoint's name or a registered architecture's name)."""
    from ..errors import UsageError

    path = Path(args.model)
    if path.suffix in (".onnx", ".ort") or (path.is_file() and path.suffix != ".pt"):
        return args.model, args.input_shape
    from .. import _checkpoint, models

    if path.is_file() or args.model in models.list_pretrained():
        model, ckpt = _checkpoint.load_model(args.model, allow=b.allowed(args), expect=args.arch,
                                             arch_kwargs=args.arch_kwargs)
        return model, args.input_shape or tuple(ckpt["data"]["input_shape"])
    if args.model not in models.list():
        raise UsageError(f"{args.model}: no such file, shipped checkpoint or registered model "
                         f"(lowbit models lists them)")
    if args.input_shape is None:
        raise UsageError(f"a registered model needs --input-shape C H W (e.g. 3 32 32 for "
                         f"CIFAR, 1 8 8 for digits); {args.model} has no data attached")
    kwargs = {"in_channels": args.input_shape[0], **(args.arch_kwargs or {})}
    return models.create(args.model, **kwargs), args.input_shape


def _footprint(args: argparse.Namespace) -> None:
    import json

    from .._io import write_json
    from ..footprint import PRECISIONS, footprint, plot

    b.claim(args, [None if args.json == "-" else args.json, args.plot], [args.model])
    model, shape = _footprint_model(args)
    base = footprint(model, args.batch_size, input_shape=shape,
                     allow_modified=args.allow_modified)
    chosen = ({f"{w}/{w if a is None else a}": (w, w if a is None else a) for w, a in args.bits}
              if args.bits else PRECISIONS)
    reports = {label: base.with_bits(w, a) for label, (w, a) in chosen.items()}
    if args.plot:
        plot(reports, args.plot)
    doc = {"model": str(args.model), "as_is": base.to_dict(),
           "precisions": {k: r.to_dict() for k, r in reports.items()}}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return
    if args.json:
        write_json(args.json, doc)
    print((next(iter(reports.values())) if args.bits else base).table())
    _print_precisions(base, reports)
    for path in (args.json, args.plot):
        if path:
            print(f"-> {path}")


def _print_precisions(base, reports: dict) -> None:
    def kib(nbytes: int) -> str:
        return f"{nbytes / 1024:,.1f}"

    head = ["bits (w/a)", "weights", *[f"acts b={n}" for n in base.batch_sizes],
            *[f"peak b={n}" for n in base.batch_sizes], "crossover"]
    rows = [head]
    for label, r in {"as is": base, **reports}.items():
        rows.append([label, kib(r.weight_bytes), *[kib(r.activation_bytes(n))
                                                  for n in r.batch_sizes],
                     *[kib(r.peak_activation_bytes(n)) for n in r.batch_sizes],
                     f"{r.crossover() or '-'} / {r.crossover(peak=True) or '-'}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("\nweights vs activations (KiB; crossover: first batch where summed / peak-live "
          "activations exceed weights)")
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def _what_if(text: str) -> tuple[int, int | None]:
    return b.bits(text, _FOOTPRINT_BITS, _FOOTPRINT_BITS)


def add_footprint(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(
        sub, "footprint", summary="memory footprint: weights vs activations per batch size",
        description="Per-layer parameters, weight bytes at each layer's bit width (plus "
        "scales and bias), activation bytes, MACs; totals of weights, summed activations "
        "(Apprentice Figure 1) and peak live activation memory per batch size, each with its "
        "fp32 equivalent, and the batch size from which activations exceed weights. MODEL is "
        "an .onnx file (needs the onnx package), a lowbit checkpoint (.pt) or a shipped one by "
        "name, or a registered architecture's name (float, with --input-shape). BatchNorm is "
        "counted folded into the preceding conv (as exported); ReLU/quantizers run in place.")
    p.add_argument("model", metavar="MODEL",
                   help=".onnx file, lowbit checkpoint, shipped checkpoint or model name")
    b.batch_size_option(p, "batch sizes", default=[1, 8, 64], many=True)
    p.add_argument("--bits", type=_what_if, nargs="+", default=None, metavar="W[/A]",
                   help="what-if precisions: W-bit weights and A-bit activations (A defaults "
                   "to W; 32 is float); the table shows the first. Default: the model's own "
                   "bits, compared with 32, 8, 4 and 2/4 (ternary)")
    b.arch_options(p, "architecture a checkpoint holds (needed when it names user code), "
                   "or the arguments of a registered model")
    p.add_argument("--input-shape", type=b.positive, nargs="+", default=None, metavar="D",
                   help="input C H W (needed for a model name or an ONNX file with symbolic "
                   "spatial dims)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the full report as JSON to PATH (alone: print it to stdout)")
    p.add_argument("--plot", default=None, metavar="FIG.png",
                   help="write a Figure-1 style chart (weights + activations, stacked, per "
                   "batch size and precision)")
    b.allow_modified_option(p)
    p.set_defaults(func=_footprint)

