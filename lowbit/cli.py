"""Command line: ``lowbit train|eval|...`` and ``lowbit-export``.

Each subcommand parses strings, calls the library function, prints. Errors the user can fix
(bad paths, wrong files, bad settings) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import LowbitError

ERRORS: tuple[type[Exception], ...] = (LowbitError, ValueError, OSError)


def _train(args: argparse.Namespace) -> None:
    from . import data, models
    from .distill import train

    train_set, test_set = data.load(args.data, train=True), data.load(args.data, train=False)
    if args.limit:
        train_set = train_set.subset(args.limit)
    kwargs = {"num_classes": train_set.num_classes, "in_channels": train_set.input_shape[0]}
    if args.width is not None:
        kwargs["width"] = args.width
    model = models.create(args.arch, **kwargs)
    _, record = train(model, train_set, test_set, _train_config(args), out=args.output,
                      resume=args.resume)
    print(f"{args.arch} on {train_set.name}: test accuracy {record['val_acc']:.2%} "
          f"-> {args.output}")


def _eval(args: argparse.Namespace) -> None:
    from . import _checkpoint, data
    from .distill import evaluate

    model, ckpt = _checkpoint.load_model(args.checkpoint)
    test_set = data.load(args.data, train=False)
    _checkpoint.check_data(ckpt, test_set, args.checkpoint, args.data)
    acc = evaluate(model, test_set)
    print(f"{args.checkpoint}: {ckpt['arch']['name']} top-1 accuracy {acc:.2%} on "
          f"{len(test_set)} {test_set.name} test images")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a float model (e.g. a teacher)",
                       description="Train a float model with SGD + momentum and a cosine or step "
                       "schedule. Writes a self-describing checkpoint every epoch; --resume "
                       "continues an interrupted run from it.")
    p.add_argument("--arch", default="resnet20", help="registered model name (lowbit models)")
    p.add_argument("--width", type=int, default=None, help="channel multiplier (wide_resnet20)")
    p.add_argument("--data", default="digits", help="cifar10:DIR, cifar100:DIR or digits")
    _add_training_options(p, lr=0.1)
    p.set_defaults(func=_train)


def _add_training_options(p: argparse.ArgumentParser, lr: float) -> None:
    """SGD and run options shared by ``train`` and ``distill`` (fields of ``TrainConfig``)."""
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine")
    p.add_argument("--warmup", type=float, default=0.0, help="warm-up epochs (linear)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocast: ~2.5x faster on CPUs with AMX/AVX512-BF16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every N steps (default: each epoch)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
    p.add_argument("--resume", action="store_true", help="continue the run saved in -o")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (.pt)")


def _train_config(args: argparse.Namespace):
    from .distill import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, schedule=args.schedule,
                       warmup_epochs=args.warmup, precision=args.precision, seed=args.seed,
                       checkpoint_every=args.checkpoint_every)


def _distill(args: argparse.Namespace) -> None:
    from pathlib import Path

    from . import _checkpoint, data, models
    from .distill import GSLR, KDConfig, distill, student_for

    train_set, test_set = data.load(args.data, train=True), data.load(args.data, train=False)
    if args.limit:
        train_set = train_set.subset(args.limit)
    kwargs = {"num_classes": train_set.num_classes, "in_channels": train_set.input_shape[0]}
    teacher: object = args.teacher
    if args.scheme == "A" and not Path(args.teacher).exists() and args.teacher in models.list():
        teacher = models.create(args.teacher, **kwargs)  # trained jointly from scratch
        teacher_arch = args.teacher
    else:
        teacher_arch = _checkpoint.load(args.teacher)["arch"]["name"]
    arch = args.arch or teacher_arch
    if args.scheme == "C":  # the student starts from trained float weights of its own arch
        if args.init:
            init, _ = _checkpoint.load_model(args.init)
        elif arch == teacher_arch:
            init, _ = _checkpoint.load_model(args.teacher)
        else:
            raise ValueError(f"scheme C starts the {arch} student from trained float weights: "
                             f"pass --init FLOAT.pt (a {arch} checkpoint) or --arch "
                             f"{teacher_arch}")
        if init.lowbit_arch["name"] != arch:
            raise ValueError(f"--init {args.init} is a {init.lowbit_arch['name']}, not {arch}")
    else:
        init = models.create(arch, **kwargs)
    student = student_for(args.scheme, init, weight_bits=args.bits, act_bits=args.act_bits)
    gslr = None
    if args.gslr:
        start, sep, end = args.gslr.partition(":")
        if not (sep and start.isdigit() and end.isdigit()):
            raise ValueError(f"--gslr expects START:END epochs (e.g. 0:30), got {args.gslr!r}")
        gslr = GSLR(int(start), int(end), end_value=args.gslr_to, shape=args.gslr_shape)
    kd = KDConfig(scheme=args.scheme, loss=args.loss, temperature=args.temperature,
                  lam=args.lam, alpha=args.alpha, beta=args.beta, gamma=args.gamma, gslr=gslr,
                  teacher_grad=args.teacher_grad, teacher_precision=args.teacher_precision)
    _, record = distill(student, teacher, train_set, test_set, kd, _train_config(args),
                        out=args.output, resume=args.resume, teacher_out=args.teacher_out)
    print(f"{arch} student ({args.bits}-bit weights, {args.act_bits}-bit activations, scheme "
          f"{args.scheme}) on {train_set.name}: test accuracy {record['val_acc']:.2%} "
          f"-> {args.output}")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="train a ternary/4-bit student from a teacher (knowledge distillation)",
        description="Quantization-aware training of a low-bit student with knowledge "
        "distillation (Hinton loss or Apprentice loss; Apprentice schemes A/B/C). Scheme C "
        "(default) starts the student from the teacher's float weights (or --init), B from "
        "scratch with the teacher frozen, A trains teacher and student jointly. Writes a "
        "checkpoint (with the KD config, history and teacher identity) and a .json record "
        "every epoch; --resume continues an interrupted run exactly.")
    p.add_argument("--teacher", required=True,
                   help="teacher checkpoint (lowbit train); scheme A also takes a model name "
                   "to train a fresh teacher jointly")
    p.add_argument("--arch", default=None, help="student architecture (default: the teacher's)")
    p.add_argument("--init", default=None,
                   help="scheme C: float checkpoint of the student arch to start from "
                   "(default: the teacher, when the architectures match)")
    p.add_argument("--data", default="digits", help="cifar10:DIR, cifar100:DIR or digits")
    p.add_argument("--bits", type=int, default=2, help="weight bits: 2 (ternary), 4 or 8")
    p.add_argument("--act-bits", type=int, default=4, help="activation bits: 2, 4 or 8")
    p.add_argument("--scheme", choices=["A", "B", "C"], default="C")
    p.add_argument("--loss", choices=["hinton", "apprentice"], default="hinton",
                   help="hinton: (1-lam) CE + lam T^2 KL; apprentice: alpha H(y,p_T) + "
                   "beta H(y,p_S) + gamma T^2 H(p_T,p_S)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T")
    p.add_argument("--lam", type=float, default=0.5, help="hinton: soft-loss weight")
    p.add_argument("--alpha", type=float, default=1.0, help="apprentice: teacher CE weight")
    p.add_argument("--beta", type=float, default=0.5, help="apprentice: student CE weight")
    p.add_argument("--gamma", type=float, default=0.5, help="apprentice: soft-loss weight")
    p.add_argument("--gslr", default=None, metavar="START:END",
                   help="gradual soft-loss reducing: the soft weight (--lam or --gamma) falls "
                   "to --gslr-to from epoch START to epoch END (0-based)")
    p.add_argument("--gslr-to", type=float, default=0.0, help="soft weight after END")
    p.add_argument("--gslr-shape", choices=["linear", "cosine"], default="linear")
    p.add_argument("--teacher-grad", action="store_true",
                   help="scheme A: let the soft loss train the teacher too")
    p.add_argument("--teacher-out", default=None,
                   help="scheme A: also save the jointly trained teacher here")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16"], default=None,
                   help="schemes B/C: precision of the frozen teacher's forward (default: "
                   "--precision); bf16 is ~3x faster on AMX CPUs")
    _add_training_options(p, lr=0.02)
    p.set_defaults(func=_distill)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test accuracy of a checkpoint",
                       description="Print the top-1 test accuracy of a lowbit checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("--data", default="digits", help="cifar10:DIR, cifar100:DIR or digits")
    p.set_defaults(func=_eval)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered architectures",
                       description="List the model names accepted by --arch.")

    def run(_: argparse.Namespace) -> None:
        from . import models

        print("\n".join(models.list()))

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the pipeline end to end on the offline default",
        description="The whole pipeline in one command: a float teacher, two ternary students "
        "at the same budget (labels only; KD + GSLR), export of the KD student as packed ONNX "
        "and QONNX verified against PyTorch, accuracy and latency in onnxruntime, memory "
        "footprint at batch 1 and 8. Prints one summary table; writes a report folder "
        "(summary.json, checkpoints, .onnx files, curves.png, footprint.png). The default data "
        "is scikit-learn's bundled 8x8 digits (no download, ~15 s on 2 cores); cifar10:DIR "
        "uses the shipped ResNet20 teacher and a small CPU budget (~4 min: 2 epochs on 5,000 "
        "images per student; change it with --epochs/--limit).")
    p.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    p.add_argument("--data", default="digits", help="digits (default) or cifar10:DIR")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per student (default: digits 8, cifar10 2)")
    p.add_argument("--limit", type=int, default=None,
                   help="training images (default: digits all, cifar10 5000; 0: all)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test images for every accuracy and the export check (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: one per physical core)")

    def run(args: argparse.Namespace) -> None:
        from ._demo import run_demo

        run_demo(args.out, args.data, epochs=args.epochs, limit=args.limit,
                 test_limit=args.test_limit, threads=args.threads)

    p.set_defaults(func=run)


_DATA_HELP = ("test data: cifar10:DIR or cifar100:DIR (official python format, test split), "
              "digits (needs scikit-learn) or FILE.npz with arrays 'images' (uint8 "
              "[N, C, H, W] raw pixels) and 'labels' - the form to use on an edge install")


def _progress(total: int, desc: str):
    """A tqdm bar when tqdm is installed (it is not in the edge install), else None."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr)


def _runtime_run(args: argparse.Namespace) -> None:
    from . import _datafiles
    from .runtime import Session

    session = Session(args.model, threads=args.threads, max_batch=args.batch_size)
    test = _datafiles.load(args.data, train=False)
    n = min(len(test.labels), args.limit) if args.limit else len(test.labels)
    bar = _progress(n, "evaluating")
    acc = session.evaluate(test, limit=n, progress=bar.update if bar else None)
    if bar:
        bar.close()
    print(f"{args.model}: top-1 accuracy {acc:.2%} on {n} {test.name} test images "
          f"(onnxruntime, threads={args.threads or 'default'})")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="accuracy of an exported .onnx/.ort model (no torch needed)",
                       description="Evaluate an exported model with the torch-free runtime "
                       "(numpy + onnxruntime): raw uint8 images are normalised with the mean/std "
                       "stored in the file, and the top-1 test accuracy is printed.")
    p.add_argument("model", help="exported .onnx or .ort file")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--limit", type=int, default=0, help="use only the first N test images")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: onnxruntime's, one per physical core)")
    p.add_argument("--batch-size", type=int, default=256, help="images per onnxruntime call")
    p.set_defaults(func=_runtime_run)


def _runtime_bench(args: argparse.Namespace) -> None:
    from ._io import write_json
    from .runtime import Session, markdown_table, resident_bytes

    before = resident_bytes()
    session = Session(args.model, threads=args.threads)
    loaded = resident_bytes()
    rows = session.benchmark(args.batch, warmup=args.warmup, repeat=args.repeat,
                             min_time=args.min_time)
    print(f"{args.model}: onnxruntime, threads={args.threads or 'default'}; resident memory "
          f"after load {loaded / 2**20:.1f} MiB (+{(loaded - before) / 2**20:.1f} MiB for the "
          f"session)")
    print(markdown_table(rows))
    if args.json:
        write_json(args.json, {"model": str(args.model), "threads": args.threads,
                               "resident_after_load": loaded,
                               "session_bytes": loaded - before,
                               "rows": [r.to_dict() for r in rows]})


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency / throughput of an exported model (no torch)",
                       description="Time one onnxruntime call per batch size on random pixels "
                       "(median and p90 latency, images/s) and report resident memory after "
                       "loading the model.")
    p.add_argument("model", help="exported .onnx or .ort file")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], metavar="N",
                   help="batch sizes (default: 1 8 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: onnxruntime's, one per physical core)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per batch size")
    p.add_argument("--repeat", type=int, default=20, help="minimum timed runs per batch size")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="minimum seconds of timed runs per batch size")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=_runtime_bench)


def _runtime_convert(args: argparse.Namespace) -> None:
    import numpy as np

    from .runtime import Session, convert_ort

    out = convert_ort(args.model, args.output, optimization=args.optimization)
    onnx_s, ort_s = Session(args.model), Session(out)
    x = np.random.default_rng(0).integers(0, 256, (8, *onnx_s.info.input_shape), dtype=np.uint8)
    x = x if onnx_s.info.mean else x.astype(np.float32) / 255.0  # no metadata: feed floats
    diff = float(np.abs(onnx_s.run(x) - ort_s.run(x)).max())
    print(f"{out}: {out.stat().st_size:,} bytes (ORT format, optimization {args.optimization}); "
          f"max |logit difference| vs {args.model} on 8 random images: {diff:.2g}")


def _add_convert_ort(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-ort", help="convert an exported .onnx to onnxruntime's .ort format",
                       description="Write the ORT (flatbuffer) format that onnxruntime's minimal "
                       "and mobile builds load, pre-optimised, with lowbit's metadata kept; the "
                       "runtime (lowbit run/bench, lowbit.runtime.Session) takes it like the "
                       ".onnx. Needs only onnxruntime (no onnx package).")
    p.add_argument("model", help="exported .onnx file")
    p.add_argument("-o", "--output", default=None, help="output .ort (default: MODEL.ort)")
    p.add_argument("--optimization", choices=["disable", "basic", "extended", "all"],
                   default="all", help="graph optimisations baked into the file (default: all, "
                   "without the CPU-specific NCHWc layout)")
    p.set_defaults(func=_runtime_convert)


def _precision(text: str) -> tuple[str, tuple[int, int]]:
    """``4`` -> 4-bit weights and activations, ``2/4`` -> 2-bit weights, 4-bit activations;
    the names of ``lowbit.footprint.PRECISIONS`` (fp32, 8-bit, 4-bit, ternary) also work."""
    from .footprint import PRECISIONS

    if text in PRECISIONS:
        return text, PRECISIONS[text]
    w, _, a = text.partition("/")
    if not (w.isdigit() and (a.isdigit() or not a)):
        raise ValueError(f"--bits expects W or W/A (e.g. 4, 2/4) or one of "
                         f"{', '.join(PRECISIONS)}, got {text!r}")
    return text, (int(w), int(a or w))


def _footprint(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from ._io import write_json
    from .footprint import PRECISIONS, footprint, plot

    model = args.model
    if not Path(model).exists() and "." not in Path(model).name:
        from . import models

        if model not in models.list():
            raise ValueError(f"{model}: no such file and not a registered model "
                             f"({', '.join(models.list())})")
        if args.input_shape is None:
            raise ValueError(f"a registered model needs --input-shape C H W (e.g. 3 32 32 for "
                             f"CIFAR, 1 8 8 for digits); {model} has no data attached")
        model = models.create(model, in_channels=args.input_shape[0])
    base = footprint(model, args.batch, input_shape=args.input_shape)
    chosen = dict(_precision(b) for b in args.bits) if args.bits else PRECISIONS
    reports = {label: base.with_bits(w, a) for label, (w, a) in chosen.items()}
    shown = next(iter(reports.values())) if args.bits else base
    if args.plot:
        plot(reports, args.plot)
    doc = {"model": str(args.model), "as_is": base.to_dict(),
           "precisions": {k: r.to_dict() for k, r in reports.items()}}
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return
    if args.json:
        write_json(args.json, doc)
    print(shown.table())
    head = ["bits (w/a)", "weights", *[f"acts b={b}" for b in base.batch_sizes],
            *[f"peak b={b}" for b in base.batch_sizes], "crossover"]
    rows = [head]
    for label, r in {"as is": base, **reports}.items():
        rows.append([label, _kib(r.weight_bytes),
                     *[_kib(r.activation_bytes(b)) for b in r.batch_sizes],
                     *[_kib(r.peak_activation_bytes(b)) for b in r.batch_sizes],
                     f"{r.crossover() or '-'} / {r.crossover(peak=True) or '-'}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("\nweights vs activations (KiB; crossover: first batch where summed / peak-live "
          "activations exceed weights)")
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for path in (args.json, args.plot):
        if path:
            print(f"-> {path}")


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f}"


def _add_footprint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "footprint", help="memory footprint: weights vs activations per batch size",
        description="Per-layer parameters, weight bytes at each layer's bit width (plus "
        "scales and bias), activation bytes, MACs; totals of weights, summed activations "
        "(Apprentice Figure 1) and peak live activation memory per batch size, each with its "
        "fp32 equivalent, and the batch size from which activations exceed weights. MODEL is "
        "an .onnx file (torch not needed), a lowbit checkpoint (.pt) or a registered model "
        "name (float, with --input-shape). BatchNorm is counted folded into the preceding "
        "conv (as exported); ReLU/quantizers run in place.")
    p.add_argument("model", metavar="MODEL", help=".onnx file, lowbit checkpoint or model name")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], metavar="N",
                   help="batch sizes (default: 1 8 64)")
    p.add_argument("--bits", nargs="+", default=None, metavar="W[/A]",
                   help="what-if precisions: W-bit weights and A-bit activations (A defaults "
                   "to W), or fp32|8-bit|4-bit|ternary; the table shows the first. Default: "
                   "the model's own bits, compared with fp32, 8-bit, 4-bit, ternary (2/4)")
    p.add_argument("--input-shape", type=int, nargs="+", default=None, metavar="D",
                   help="input C H W (needed for a model name or an ONNX file with symbolic "
                   "spatial dims)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the full report as JSON to PATH (alone: print it to stdout)")
    p.add_argument("--plot", default=None, metavar="FIG.png",
                   help="write a Figure-1 style chart (weights + activations, stacked, per "
                   "batch size and precision)")
    p.set_defaults(func=_footprint)


def _export(args: argparse.Namespace) -> None:
    import warnings
    from pathlib import Path

    from . import _checkpoint, data
    from .export import Thresholds, export

    thresholds = Thresholds(args.min_agreement, args.max_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on refused pickles: the error says it
        model, ckpt = _checkpoint.load_model(args.model)
    info = ckpt["data"]
    out = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    formats = {"onnx": ("onnx",), "qonnx": ("qonnx",), "both": ("onnx", "qonnx")}[args.format]
    verify = calib = None
    if args.verify_data != "random":
        verify = data.load(args.verify_data, train=False)
        _checkpoint.check_data(ckpt, verify, args.model, f"--verify-data {args.verify_data}")
        if args.verify_limit:
            verify = verify.subset(args.verify_limit)
    if ckpt.get("quant") is None and args.bits is not None:
        source = args.verify_data if verify is not None else \
            ("digits" if info["name"] == "digits" else None)
        if source is None:
            raise ValueError(f"{args.model} is a float checkpoint: post-training quantization "
                             f"needs calibration images; pass --verify-data (its training split "
                             f"calibrates)")
        calib_set = data.load(source, train=True).subset(args.calib)
        calib = [data.normalize(calib_set.images[i:i + 128], calib_set.mean, calib_set.std)
                 for i in range(0, len(calib_set), 128)]
        prog = getattr(args, "prog", "lowbit-export")
        print(f"{prog}: warning: {args.model} is a float model; quantizing it "
              f"post-training to {args.bits}-bit weights with {len(calib_set)} calibration "
              f"images. Expect an accuracy drop: 'lowbit distill' recovers it.", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PTQ warning is printed above; library chatter
        result = export(model, out, bits=args.bits, formats=formats, opset=args.opset,
                        verify=verify, calib=calib, data=info, weight_form=args.weight_form,
                        thresholds=thresholds, ternary_storage=args.ternary_storage,
                        residual_add=args.residual_add)
    if result.layers:
        print(result.layers)  # per layer: weight bits, input bits, onnxruntime kernel
    if result.kernels:
        print(f"onnxruntime kernels: {result.kernels['integer']} integer, "
              f"{result.kernels['float']} float conv/linear")
    for check in result.verification.values():
        print(check)
    for note in result.notes[1 if calib is not None else 0:]:  # the PTQ note is said above
        print(f"note: {note}")
    kinds = sorted(set(result.storage.values()))
    for fmt, path in result.paths.items():
        print(f"{fmt}: {path} ({path.stat().st_size:,} bytes; weights stored as "
              f"{', '.join(kinds) if fmt == 'onnx' else 'float32 + Quant nodes'})")
    if args.ort and "onnx" in result.paths:
        from .runtime import convert_ort

        ort_path = convert_ort(result.paths["onnx"])
        print(f"ort: {ort_path} ({ort_path.stat().st_size:,} bytes; onnxruntime's ORT format, "
              f"optimised for this CPU's instruction set family)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="lowbit checkpoint (.pt): a quantized student (lowbit distill) "
                   "or a float model (quantized post-training to --bits)")
    p.add_argument("--bits", type=int, choices=[2, 4, 8], default=None,
                   help="weight bits (2 = ternary). A student is exported as trained (a "
                   "contradicting --bits is an error); a float checkpoint needs it")
    p.add_argument("-o", "--output", default=None,
                   help="output .onnx (default: MODEL.onnx; QONNX goes to OUT.qonnx.onnx)")
    p.add_argument("--format", choices=["onnx", "qonnx", "both"], default="both",
                   help="onnx: packed standard ONNX for onnxruntime; qonnx: Brevitas QONNX "
                   "(Quant nodes, float weights) for qonnx/FINN (default: both)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 25; 21-24 store 4-bit (and --ternary-storage int "
                   "ternary) weights as INT4, 13-20 as INT8, for older runtimes)")
    p.add_argument("--weight-form", choices=["cast", "dequant"], default="cast",
                   help="cast: INT2/INT4 -> Cast(INT8) -> DequantizeLinear, folded at load "
                   "into int8 kernels (fast); dequant: DequantizeLinear on the packed weights "
                   "(trits are always decoded to int8 first)")
    p.add_argument("--verify-data", default="random", metavar="cifar10:DIR|digits|random",
                   help="test images for the verification gate (default: 256 random inputs); "
                   "its training split also calibrates a float checkpoint")
    p.add_argument("--verify-limit", type=int, default=0, metavar="N",
                   help="verify on the first N test images only (default: all)")
    p.add_argument("--calib", type=int, default=512, metavar="N",
                   help="calibration images for a float checkpoint (default 512)")
    p.add_argument("--min-agreement", type=float, default=0.999, metavar="FRACTION",
                   help="gate: least top-1 agreement with the PyTorch student (default 0.999)")
    p.add_argument("--residual-add", choices=["auto", "integer", "float"], default="auto",
                   help="integer: residual adds fused into onnxruntime's QLinearAdd (fastest; "
                   "its rounding differs slightly from the student's); float: in float between "
                   "the integer convolutions (exact, ~15-25%% slower on 2 threads); auto "
                   "(default): integer when it passes the gate, else float")
    p.add_argument("--ternary-storage", choices=["trits", "int"], default="trits",
                   help="ternary weights as trits (five per byte, 1.6 bits, decoded by a "
                   "constant Gather onnxruntime folds at load; default) or as ONNX integers "
                   "(INT2 at opset 25, INT4 at 21-24, INT8 below)")
    p.add_argument("--ort", action="store_true",
                   help="also write MODEL.ort (onnxruntime's ORT format, as lowbit convert-ort)")
    p.add_argument("--max-steps", type=float, default=4.0, metavar="STEPS",
                   help="gate: largest logit difference in output quantization steps (one "
                   "flipped code of the last activation times the largest last-layer weight; "
                   "default 4)")
    p.set_defaults(func=_export)


_EXPORT_DESCRIPTION = (
    "Export a lowbit checkpoint as packed ONNX (ternary weights as trits, five per byte; 4-bit "
    "as INT4) that stock onnxruntime runs, and/or as QONNX. BatchNorm is folded, activations "
    "are quantized exactly as in the student. After building, each file is run on the "
    "verification inputs and compared with the PyTorch student, with onnxruntime's float "
    "kernels (the file's reference semantics) and with the integer kernels it fuses for "
    "speed: top-1 agreement >= 99.9% and max logit difference <= 4 output steps for both; if "
    "that fails, nothing is written and the exit status is 2. Files are written atomically.")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint as packed ONNX / QONNX (verified)",
                       description=_EXPORT_DESCRIPTION)
    _export_arguments(p)
    p.set_defaults(prog="lowbit export")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_distill,
                                                                     _add_eval,
                                                                     _add_models, _add_demo,
                                                                     _add_run, _add_bench,
                                                                     _add_convert_ort,
                                                                     _add_footprint, _add_export]


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ERRORS as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit``."""
    parser = argparse.ArgumentParser(
        prog="lowbit", description="lowbit: float model -> ternary/4-bit student -> packed ONNX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return _run(parser, argv)



def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit-export`` (same as ``lowbit export``)."""
    parser = argparse.ArgumentParser(prog="lowbit-export", description=_EXPORT_DESCRIPTION)
    _export_arguments(parser)
    return _run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
