"""Command line: ``lowbit train|eval|...`` and ``lowbit-export``.

Each subcommand parses strings, calls the library function, prints. Errors the user can fix
(bad paths, wrong files, bad settings: a :class:`~lowbit.errors.LowbitError`) print one line
and exit with status 2; anything else is a bug in lowbit and shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

from ._io import check_outputs, output_lock
from .errors import LowbitError, UsageError


def _number(kind: type, least: float, name: str) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` and refuses values below ``least``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not value >= least:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


_positive = _number(int, 1, "an integer >= 1")
_non_negative = _number(int, 0, "an integer >= 0")
_non_negative_float = _number(float, 0.0, "a number >= 0")


def _check_run_outputs(args: argparse.Namespace, *inputs: object) -> None:
    """``train``/``distill``: -o (and its .json record, --teacher-out) must not replace an
    input, and replaces an existing checkpoint only with --overwrite (or continues it with
    --resume)."""
    from pathlib import Path

    out = Path(args.output)
    if out.suffix == ".json":
        raise UsageError(f"-o {out}: the checkpoint needs another suffix than .json (its "
                         f"training record is written beside it as {out.stem}.json)")
    outputs = [out, out.with_suffix(".json"), getattr(args, "teacher_out", None)]
    _claim(args, outputs, [p for p in inputs if isinstance(p, str) and Path(p).exists()])
    if args.resume or args.overwrite:
        return
    check_outputs(outputs[:1], overwrite=False,
                  hint="continue an unfinished run with --resume, or pass --overwrite to "
                  "start over and replace it")


def _claim(args: argparse.Namespace, outputs: Sequence[object], inputs: Sequence[object] = ()
           ) -> None:
    """Check the outputs (see ``check_outputs``) and lock them until the command ends: a
    second lowbit process given one of them is refused instead of racing this one."""
    check_outputs(outputs, inputs)
    args.claims.enter_context(output_lock(outputs))


_FORMATTER = argparse.ArgumentDefaultsHelpFormatter  # every --help shows the defaults
_DATA_SPECS = "cifar10:DIR, cifar100:DIR, digits or FILE.npz"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose options are added by ``options(parser)`` when it is first used.

    Defaults come from lowbit's config dataclasses (``TrainConfig``, ``KDConfig``,
    ``QuantSpec``, ``PTQConfig``), which live next to torch code: a subcommand imports them
    only when it runs or shows its help, so ``lowbit run`` starts without torch.
    """

    def __init__(self, *args, options: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._options = options

    def _fill(self) -> None:
        if self._options is not None:
            options, self._options = self._options, None
            options(self)

    def parse_known_args(self, args=None, namespace=None):
        self._fill()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._fill()
        return super().format_help()


def _parser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_FORMATTER, **kwargs)


def _arch_options(p: argparse.ArgumentParser, help_text: str, default: str | None) -> None:
    """``--arch`` (a registered model or user code) and ``--arch-kwargs``."""
    p.add_argument("--arch", default=default, metavar="NAME|package.module:factory",
                   help=f"{help_text}: a registered model (lowbit models) or a factory in your "
                   f"own importable code; a checkpoint that names user code is built only when "
                   f"you name it here")
    p.add_argument("--arch-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments of the architecture, e.g. '{\"width\": 8}' (registered "
                   "models also get num_classes and in_channels from the data)")


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _width(text: str) -> int | str:
    """``--first-bits``/``--last-bits``: weight bits, or "same" (the model's --bits)."""
    from .quant import WEIGHT_BITS

    if text == "same":
        return text
    if text.isdigit() and int(text) in WEIGHT_BITS:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, WEIGHT_BITS))} or "
                                     f"'same', got {text!r}")


def _layer_width(text: str) -> tuple[str, int]:
    """``--layer-bits NAME=BITS``."""
    name, sep, bits = text.rpartition("=")
    if not (sep and name and bits.isdigit()):
        raise argparse.ArgumentTypeError(f"expected LAYER=BITS (e.g. layer1.0.conv1=4), got "
                                         f"{text!r}")
    return name, int(bits)


def _layer_width_options(p: argparse.ArgumentParser, spec, what: str) -> None:
    """The user's precision policy: ``--first-bits``, ``--last-bits``, ``--layer-bits``."""
    def shown(bits):
        return "same" if bits is None else bits

    p.add_argument("--first-bits", type=_width, default=shown(spec.first_bits) if spec else None,
                   metavar="BITS|same", help=f"weight bits of the first conv/linear layer "
                   f"(same: --bits){what}")
    p.add_argument("--last-bits", type=_width, default=shown(spec.last_bits) if spec else None,
                   metavar="BITS|same", help=f"weight bits of the last layer (same: --bits){what}")
    p.add_argument("--layer-bits", type=_layer_width, action="append", default=[],
                   metavar="LAYER=BITS", help="weight bits of one layer by its module name "
                   "(repeatable; wins over --first-bits/--last-bits; names: lowbit footprint "
                   "or describe())")


def _layer_widths(args: argparse.Namespace) -> dict:
    """QuantSpec fields of the options ``_layer_width_options`` adds (unset ones left out)."""
    widths = {k: (None if v == "same" else v) for k, v in
              (("first_bits", args.first_bits), ("last_bits", args.last_bits)) if v is not None}
    return {**widths, **({"overrides": tuple(args.layer_bits)} if args.layer_bits else {})}


def _build(arch: str, args: argparse.Namespace, train_set, seed: int):
    """The fresh model ``--arch`` names, its weights drawn from ``--seed``."""
    from . import models

    kwargs = dict(args.arch_kwargs or {})
    if getattr(args, "width", None) is not None:
        kwargs["width"] = args.width
    if not models.is_user_code(arch):  # lowbit's models take the data's shape
        kwargs = {"num_classes": train_set.num_classes,
                  "in_channels": train_set.input_shape[0], **kwargs}
    return models.create(arch, seed=seed, **kwargs)


def _allowed(args: argparse.Namespace) -> set[str]:
    """The user-code architectures named on this command line (checkpoints may use them)."""
    return {a for a in (getattr(args, "arch", None), getattr(args, "teacher_arch", None)) if a}


def _data_options(p: argparse.ArgumentParser) -> None:
    """Training data, the validation data and lowbit's augmentation (train and distill)."""
    p.add_argument("--data", default="digits", help=f"training data: {_DATA_SPECS}")
    p.add_argument("--val-data", default=None, metavar="SPEC",
                   help="validation data; unset: the test split of cifar10/cifar100/digits, or "
                   "for FILE.npz --val-fraction of it held out")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="FILE.npz without --val-data: fraction held out for validation")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off lowbit's augmentation of uint8 images >= 16 px (pad-4 random "
                   "crop + horizontal flip); smaller images and float inputs are never augmented")
    p.add_argument("--limit", type=_non_negative, default=0,
                   help="use only the first N training examples (0: all)")


def _train_val(args: argparse.Namespace):
    """(training set, validation set) as the data options say; the latter names its split."""
    from dataclasses import replace

    from . import data

    train_set = data.load(args.data, train=True)
    if args.val_data:
        val_set = data.load(args.val_data, train=False)
        if val_set.split == "file":  # a whole file given for validation
            val_set = replace(val_set, split="validation")
    elif train_set.split == "file":  # one file: never validate on the training examples
        train_set, val_set = train_set.holdout(args.val_fraction)
    else:
        val_set = data.load(args.data, train=False)
    if args.no_augment:
        train_set = replace(train_set, augment=False)
    if args.limit:
        train_set = train_set.subset(args.limit)
    return train_set, val_set


def _spec_paths(*specs: str | None) -> list[str]:
    """The files or folders that data specs read (``cifar10:DIR`` -> DIR, FILE.npz)."""
    return [spec.partition(":")[2] or spec for spec in specs if spec]


def _measured(record: dict, val_set) -> str:
    return f"{val_set.split} accuracy {record['val_acc']:.2%} ({len(val_set)} {val_set.name} " \
        f"examples)"


def _train(args: argparse.Namespace) -> None:
    from .distill import train

    _check_run_outputs(args, *_spec_paths(args.data, args.val_data))
    train_set, val_set = _train_val(args)
    model = _build(args.arch, args, train_set, args.seed)
    _, record = train(model, train_set, val_set, _train_config(args), out=args.output,
                      resume=args.resume, progress=not args.quiet)
    print(f"{args.arch} on {train_set.name}: {_measured(record, val_set)} -> {args.output}")


def _eval(args: argparse.Namespace) -> None:
    from . import _checkpoint, data
    from .distill import evaluate

    model, ckpt = _checkpoint.load_model(args.checkpoint, allow=_allowed(args), expect=args.arch,
                                         arch_kwargs=args.arch_kwargs)
    test_set = data.as_data(data.load(args.data, train=False), stats=data.stats_of(ckpt["data"]))
    _checkpoint.check_data(ckpt, test_set, args.checkpoint, args.data)
    acc = evaluate(model, test_set, progress=not args.quiet)
    print(f"{args.checkpoint}: {ckpt['arch']['name']} top-1 accuracy {acc:.2%} on "
          f"{len(test_set)} {test_set.name} {test_set.split} examples")


def _add_train(sub: argparse._SubParsersAction) -> None:
    _parser(sub, "train", help="train a float model (e.g. a teacher)", options=_train_options,
            description="Train a float model with SGD + momentum and a cosine or step "
            "schedule. Writes a self-describing checkpoint every epoch; --resume continues an "
            "interrupted run from it. Reports the accuracy on the validation data and names "
            "its split. Defaults are those of lowbit.train (lowbit.TrainConfig).")


def _train_options(p: argparse.ArgumentParser) -> None:
    from .distill import TrainConfig

    _arch_options(p, "architecture", "resnet20")
    p.add_argument("--width", type=_positive, default=None,
                   help="channel multiplier (wide_resnet20; same as --arch-kwargs width)")
    _data_options(p)
    _add_training_options(p, TrainConfig())
    p.set_defaults(func=_train)


def _add_training_options(p: argparse.ArgumentParser, defaults) -> None:
    """SGD and run options shared by ``train`` and ``distill``: the fields of ``TrainConfig``,
    with ``defaults`` (a ``TrainConfig``) as their defaults."""
    d = defaults
    p.add_argument("--epochs", type=_positive, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="examples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--schedule", choices=["cosine", "step"], default=d.schedule,
                   help="learning-rate decay")
    p.add_argument("--warmup", dest="warmup_epochs", type=_non_negative_float,
                   default=d.warmup_epochs,
                   help="warm-up epochs (linear)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision,
                   help="bf16 autocast: faster on CPUs with AMX/AVX512-BF16 (README: Training "
                   "speed)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds every random draw: initial weights, shuffling, augmentation")
    p.add_argument("--checkpoint-every", type=_non_negative, default=d.checkpoint_every,
                   metavar="STEPS",
                   help="also checkpoint every N steps (0: once per epoch)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in -o")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at -o (else refused)")
    p.add_argument("-o", "--output", required=True, help="checkpoint path (.pt)")


_TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "schedule", "warmup_epochs",
                  "precision", "seed", "checkpoint_every")


def _train_config(args: argparse.Namespace):
    from .distill import TrainConfig

    extra = {"bn_batches": args.bn_batches} if "bn_batches" in args else {}  # distill's
    return TrainConfig(**{name: getattr(args, name) for name in _TRAIN_OPTIONS}, **extra)


def _distill(args: argparse.Namespace) -> None:
    from pathlib import Path

    from . import _checkpoint, models
    from .distill import GSLR, KDConfig, distill, student_for

    _check_run_outputs(args, args.teacher, args.init, *_spec_paths(args.data, args.val_data))
    train_set, val_set = _train_val(args)
    allow = _allowed(args)  # only names given here: never one read from a checkpoint
    teacher: object = args.teacher
    if args.scheme == "A" and not Path(args.teacher).exists() and args.teacher in models.list():
        teacher = _build(args.teacher, args, train_set, args.seed)  # trained jointly
        teacher_arch = args.teacher
    else:
        teacher_arch = _checkpoint.load(args.teacher)["arch"]["name"]
    arch = args.arch or teacher_arch
    if args.scheme == "C":  # the student starts from trained float weights of its own arch
        if not args.init and arch != teacher_arch:
            raise UsageError(f"scheme C starts the {arch} student from trained float weights: "
                             f"pass --init FLOAT.pt (a {arch} checkpoint) or --arch "
                             f"{teacher_arch}")
        init, _ = _checkpoint.load_model(args.init or args.teacher, allow=allow, expect=arch)
    else:
        init = _build(arch, args, train_set, args.seed)
    student = student_for(args.scheme, init, weight_bits=args.bits, act_bits=args.act_bits,
                          seed=args.seed, **_layer_widths(args))
    gslr = None
    if args.gslr:
        start, sep, end = args.gslr.partition(":")
        if not (sep and start.isdigit() and end.isdigit()):
            raise UsageError(f"--gslr expects START:END epochs (e.g. 0:30), got {args.gslr!r}")
        gslr = GSLR(int(start), int(end), end_value=args.gslr_to, shape=args.gslr_shape)
    kd = KDConfig(**{name: getattr(args, name) for name in _KD_OPTIONS}, gslr=gslr)
    _, record = distill(student, teacher, train_set, val_set, kd, _train_config(args),
                        out=args.output, resume=args.resume, teacher_out=args.teacher_out,
                        allow=allow, progress=not args.quiet)
    print(f"{arch} student ({args.bits}-bit weights, {args.act_bits}-bit activations, scheme "
          f"{args.scheme}) on {train_set.name}: {_measured(record, val_set)} -> {args.output}")


_KD_OPTIONS = ("scheme", "loss", "temperature", "lam", "alpha", "beta", "gamma", "teacher_grad",
               "teacher_precision")


def _add_distill(sub: argparse._SubParsersAction) -> None:
    _parser(
        sub, "distill", help="train a ternary/4-bit student from a teacher (knowledge "
        "distillation)", options=_distill_options,
        description="Quantization-aware training of a low-bit student with knowledge "
        "distillation (Hinton loss or Apprentice loss; Apprentice schemes A/B/C). Scheme C "
        "(default) starts the student from the teacher's float weights (or --init), B from "
        "scratch with the teacher frozen, A trains teacher and student jointly. Writes a "
        "checkpoint (with the KD config, history and teacher identity) and a .json record "
        "every epoch; --resume continues an interrupted run exactly. Defaults are those of "
        "lowbit.distill in Python (lowbit.distill.DISTILL_CONFIG, KDConfig, QuantSpec).")


def _distill_options(p: argparse.ArgumentParser) -> None:
    from .distill import DISTILL_CONFIG, GSLR, KDConfig
    from .quant import QuantSpec

    kd, spec, gslr = KDConfig(), QuantSpec(), GSLR(0, 1)
    p.add_argument("--teacher", required=True,
                   help="teacher checkpoint (lowbit train) or a shipped one by name "
                   "(lowbit models); scheme A also takes a model name to train a fresh "
                   "teacher jointly")
    p.add_argument("--teacher-arch", default=None, metavar="package.module:factory",
                   help="user code the teacher checkpoint names, when it is not --arch")
    _arch_options(p, "student architecture (default: the teacher's)", None)
    p.add_argument("--init", default=None,
                   help="scheme C: float checkpoint of the student arch to start from "
                   "(default: the teacher, when the architectures match)")
    _data_options(p)
    p.add_argument("--bits", type=int, default=spec.weight_bits,
                   help="weight bits: 2 (ternary), 4 or 8")
    p.add_argument("--act-bits", type=int, default=spec.act_bits, help="activation bits: 2, 4 "
                   "or 8")
    _layer_width_options(p, spec, "")
    p.add_argument("--scheme", choices=["A", "B", "C"], default=kd.scheme,
                   help="Apprentice scheme")
    p.add_argument("--loss", choices=["hinton", "apprentice"], default=kd.loss,
                   help="hinton: (1-lam) CE + lam T^2 KL; apprentice: alpha H(y,p_T) + "
                   "beta H(y,p_S) + gamma T^2 H(p_T,p_S)")
    p.add_argument("--temperature", type=float, default=kd.temperature,
                   help="softmax temperature T")
    p.add_argument("--lam", type=float, default=kd.lam, help="hinton: soft-loss weight")
    p.add_argument("--alpha", type=float, default=kd.alpha, help="apprentice: teacher CE weight")
    p.add_argument("--beta", type=float, default=kd.beta, help="apprentice: student CE weight")
    p.add_argument("--gamma", type=float, default=kd.gamma, help="apprentice: soft-loss weight")
    p.add_argument("--gslr", default=None, metavar="START:END",
                   help="gradual soft-loss reducing: the soft weight (--lam or --gamma) falls "
                   "to --gslr-to from epoch START to epoch END (0-based)")
    p.add_argument("--gslr-to", type=float, default=gslr.end_value,
                   help="soft weight after END")
    p.add_argument("--gslr-shape", choices=["linear", "cosine"], default=gslr.shape,
                   help="GSLR curve")
    p.add_argument("--teacher-grad", action="store_true",
                   help="scheme A: let the soft loss train the teacher too")
    p.add_argument("--teacher-out", default=None,
                   help="scheme A: also save the jointly trained teacher here")
    p.add_argument("--teacher-precision", choices=["fp32", "bf16"], default=kd.teacher_precision,
                   help="schemes B/C: precision of the frozen teacher's forward (None: "
                   "--precision); bf16 is faster on CPUs with AMX/AVX512-BF16")
    p.add_argument("--bn-batches", type=_non_negative, default=DISTILL_CONFIG.bn_batches,
                   help="after the last epoch, re-estimate the student's BatchNorm statistics "
                   "over this many training batches (0: keep the running averages)")
    _add_training_options(p, DISTILL_CONFIG)
    p.set_defaults(func=_distill)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "eval", help="accuracy of a checkpoint",
                description="Print the top-1 accuracy of a lowbit checkpoint on a dataset's "
                "test split (or a whole FILE.npz), naming the split.")
    p.add_argument("checkpoint", help="lowbit checkpoint (.pt) or a shipped one by name")
    p.add_argument("--data", default="digits", help=_DATA_SPECS)
    _arch_options(p, "architecture the checkpoint holds (needed when it names user code)", None)
    p.set_defaults(func=_eval)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "models", help="list architectures and shipped checkpoints",
                description="List the registered architectures (--arch NAME; your own code is "
                "--arch package.module:factory) and the checkpoints shipped with lowbit "
                "(usable by name wherever a checkpoint path is).")

    def run(_: argparse.Namespace) -> None:
        from . import models

        print("architectures:\n  " + "\n  ".join(models.list()))
        print("shipped checkpoints (test accuracy as trained; lowbit eval NAME --data ... "
              "reproduces it):")
        for name in models.list_pretrained():
            info = models.pretrained_info(name)
            w = info["weight_bits"]
            bits = "float" if w is None else (f"{'ternary' if w == 2 else f'{w}-bit'} weights, "
                                              f"{info['act_bits']}-bit activations")
            print(f"  {name:<28} {info['arch']} on {info['dataset']}, {bits}: "
                  f"{info['test_acc']:.2%}")

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
    p.add_argument("--epochs", type=_positive, default=None,
                   help="epochs per student (default: digits 8, cifar10 2)")
    p.add_argument("--limit", type=_non_negative, default=None,
                   help="training images (default: digits all, cifar10 5000; 0: all)")
    p.add_argument("--test-limit", type=_non_negative, default=None,
                   help="test images for every accuracy and the export check (default: all)")
    p.add_argument("--threads", type=_positive, default=None,
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
    return tqdm(total=total, desc=desc, unit="img", leave=False, file=sys.stderr,
                disable=None)  # None: no bar when stderr is not a terminal


def _allow_modified_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-modified", action="store_true",
                   help="read a lowbit export whose weights or graph no longer match the "
                   "digests recorded at export (refused by default: a corrupt copy still runs, "
                   "with wrong answers); for files you changed on purpose")


def _runtime_run(args: argparse.Namespace) -> None:
    from . import _datafiles
    from .runtime import Session

    session = Session(args.model, threads=args.threads, max_batch=args.batch_size,
                      allow_modified=args.allow_modified)
    test = _datafiles.load(args.data, train=False)
    n = min(len(test.labels), args.limit) if args.limit else len(test.labels)
    bar = None if args.quiet else _progress(n, "evaluating")
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
    p.add_argument("--limit", type=_non_negative, default=0,
                   help="use only the first N test images")
    p.add_argument("--threads", type=_positive, default=None,
                   help="intra-op threads (default: onnxruntime's, one per physical core)")
    p.add_argument("--batch-size", type=_positive, default=256, help="images per onnxruntime call")
    _allow_modified_option(p)
    p.set_defaults(func=_runtime_run)


def _runtime_bench(args: argparse.Namespace) -> None:
    from ._io import write_json
    from .runtime import Session, markdown_table, resident_bytes

    _claim(args, [args.json], [args.model])
    before = resident_bytes()
    session = Session(args.model, threads=args.threads, allow_modified=args.allow_modified)
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
    p.add_argument("--batch", type=_positive, nargs="+", default=[1, 8, 64], metavar="N",
                   help="batch sizes (default: 1 8 64)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="intra-op threads (default: onnxruntime's, one per physical core)")
    p.add_argument("--warmup", type=_non_negative, default=5, help="untimed runs per batch size")
    p.add_argument("--repeat", type=_positive, default=20, help="minimum timed runs per batch size")
    p.add_argument("--min-time", type=_non_negative_float, default=0.5,
                   help="minimum seconds of timed runs per batch size")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    _allow_modified_option(p)
    p.set_defaults(func=_runtime_bench)


def _runtime_convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    import numpy as np

    from .runtime import Session, convert_ort

    out = Path(args.output) if args.output else Path(args.model).with_suffix(".ort")
    _claim(args, [out], [args.model])
    out = convert_ort(args.model, out, optimization=args.optimization,
                      allow_modified=args.allow_modified)
    onnx_s, ort_s = Session(args.model, allow_modified=args.allow_modified), Session(out)
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
    _allow_modified_option(p)
    p.set_defaults(func=_runtime_convert)


def _precision(text: str) -> tuple[str, tuple[int, int]]:
    """``4`` -> 4-bit weights and activations, ``2/4`` -> 2-bit weights, 4-bit activations;
    the names of ``lowbit.footprint.PRECISIONS`` (fp32, 8-bit, 4-bit, ternary) also work."""
    from .footprint import PRECISIONS

    if text in PRECISIONS:
        return text, PRECISIONS[text]
    w, _, a = text.partition("/")
    if not (w.isdigit() and (a.isdigit() or not a)):
        raise UsageError(f"--bits expects W or W/A (e.g. 4, 2/4) or one of "
                         f"{', '.join(PRECISIONS)}, got {text!r}")
    return text, (int(w), int(a or w))


def _footprint(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from ._io import write_json
    from .footprint import PRECISIONS, footprint, plot

    model = args.model
    _claim(args, [None if args.json == "-" else args.json, args.plot], [model])
    if not Path(model).exists() and "." not in Path(model).name:
        from . import models

        if model not in models.list():
            raise UsageError(f"{model}: no such file and not a registered model "
                             f"({', '.join(models.list())})")
        if args.input_shape is None:
            raise UsageError(f"a registered model needs --input-shape C H W (e.g. 3 32 32 for "
                             f"CIFAR, 1 8 8 for digits); {model} has no data attached")
        model = models.create(model, in_channels=args.input_shape[0])
    base = footprint(model, args.batch, input_shape=args.input_shape,
                     allow_modified=args.allow_modified)
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
    p.add_argument("--input-shape", type=_positive, nargs="+", default=None, metavar="D",
                   help="input C H W (needed for a model name or an ONNX file with symbolic "
                   "spatial dims)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the full report as JSON to PATH (alone: print it to stdout)")
    p.add_argument("--plot", default=None, metavar="FIG.png",
                   help="write a Figure-1 style chart (weights + activations, stacked, per "
                   "batch size and precision)")
    _allow_modified_option(p)
    p.set_defaults(func=_footprint)


def _export(args: argparse.Namespace) -> None:
    import warnings
    from pathlib import Path

    from . import _checkpoint, data
    from .export import Thresholds, export, qonnx_path
    from .quant import PTQConfig

    prog = getattr(args, "prog", "lowbit-export")
    thresholds = Thresholds(args.min_agreement, args.max_steps, args.max_near_ties)
    ptq = PTQConfig(method=args.calib_method, calib=args.calib, percentile=args.percentile,
                    max_drop=args.max_drop)  # validates --calib >= 1 before any work
    model, ckpt = _checkpoint.load_model(args.model, allow=_allowed(args), expect=args.arch,
                                         arch_kwargs=args.arch_kwargs)
    info = ckpt["data"]
    given = Path(args.model)  # a shipped checkpoint's name: the file goes to NAME.onnx here
    out = Path(args.output) if args.output else \
        given.with_suffix(".onnx") if given.exists() else Path(f"{args.model}.onnx")
    formats = {"onnx": ("onnx",), "qonnx": ("qonnx",), "both": ("onnx", "qonnx")}[args.format]
    if not args.output and formats == ("qonnx",):
        out = qonnx_path(out)  # MODEL.qonnx.onnx, as with --format both
    outputs = [out, qonnx_path(out) if len(formats) == 2 else None,
               out.with_suffix(".ort") if args.ort and "onnx" in formats else None]
    _claim(args, outputs, [args.model, *_spec_paths(args.verify_data, args.calib_data)])
    verify = calib = None
    if args.verify_data != "random":
        verify = data.load(args.verify_data, train=False)
        _checkpoint.check_data(ckpt, verify, args.model, f"--verify-data {args.verify_data}")
        if args.verify_limit:
            verify = verify.subset(args.verify_limit)
    ptq_run = ckpt.get("quant") is None and args.bits is not None
    if ptq_run:
        source = args.calib_data or (args.verify_data if verify is not None else
                                     ("digits" if info["name"] == "digits" else None))
        if source is None:
            raise UsageError(f"{args.model} is a float checkpoint: post-training quantization "
                             f"needs calibration data; pass --calib-data or --verify-data (its "
                             f"training split calibrates)")
        calib = data.load(source, train=True)
        print(f"{prog}: warning: {args.model} is a float model; quantizing it post-training "
              f"to {args.bits}-bit weights with {min(len(calib), ptq.calib)} calibration "
              f"examples of {calib.name} ({ptq.method}). Expect an accuracy drop: 'lowbit "
              f"distill' recovers it.", file=sys.stderr)
    with warnings.catch_warnings():
        # the PTQ warnings (quantized post-training; its cost) are printed here in the CLI's words
        warnings.filterwarnings("ignore", message="(float model quantized|post-training "
                                "quantization costs)")
        result = export(model, out, bits=args.bits, act_bits=args.act_bits,
                        layer_bits=_layer_widths(args), formats=formats,
                        opset=args.opset, verify=verify, calib=calib, ptq=ptq, data=info,
                        weight_form=args.weight_form, thresholds=thresholds,
                        ternary_storage=args.ternary_storage, residual_add=args.residual_add,
                        progress=not args.quiet)
    if result.layers and not args.quiet:
        print(result.layers)  # per layer: weight bits, input bits, onnxruntime kernel
    if result.kernels and not args.quiet:
        print(f"onnxruntime kernels: {result.kernels['integer']} integer, "
              f"{result.kernels['float']} float conv/linear")
    if result.arithmetic and not args.quiet:
        print(result.arithmetic)
    for check in result.verification.values() if not args.quiet else ():
        print(check)
    if result.accuracy:
        a = result.accuracy
        print(f"top-1 accuracy on {len(verify)} {verify.name} {verify.split} examples: float "
              f"{a['float']:.2%}, quantized file {a['onnx']:.2%} (drop "
              f"{a['float'] - a['onnx']:.2%})")
    elif ptq_run:
        print("note: accuracy not measured (random verification inputs); pass --verify-data "
              "to see what post-training quantization costs")
    for note in result.notes[1 if ptq_run else 0:] if not args.quiet else ():
        print(f"note: {note}")  # (the PTQ note is said above)
    for warning in result.warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
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
    from .export import Thresholds
    from .quant import CALIB_METHODS, PTQConfig, QuantSpec

    ptq, gate = PTQConfig(), Thresholds()
    p.add_argument("model", help="lowbit checkpoint (.pt) or a shipped one by name: a quantized "
                   "student (lowbit distill) or a float model (quantized post-training to "
                   "--bits)")
    _arch_options(p, "architecture the checkpoint holds (needed when it names user code)", None)
    p.add_argument("--bits", type=int, choices=[2, 4, 8], default=None,
                   help="weight bits (2 = ternary). A student is exported as trained (a "
                   "contradicting --bits is an error); a float checkpoint needs it")
    p.add_argument("--act-bits", type=int, choices=[2, 4, 8], default=None,
                   help=f"post-training quantization: activation bits (unset: QuantSpec's "
                   f"{QuantSpec().act_bits}; a student keeps its own)")
    _layer_width_options(p, None, f" (unset: QuantSpec's {QuantSpec().first_bits}; a student "
                         f"keeps its own)")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default=ptq.method,
                   help="post-training quantization: activation-range calibration (max |x|; "
                   "a percentile of |x|; the range of least squared error)")
    p.add_argument("--calib", type=_non_negative, default=ptq.calib, metavar="N",
                   help="post-training quantization: calibration examples (>= 1)")
    p.add_argument("--calib-data", default=None, metavar="SPEC",
                   help="post-training quantization: calibration data (its training split; "
                   "unset: that of --verify-data)")
    p.add_argument("--percentile", type=float, default=ptq.percentile,
                   help="--calib-method percentile: the percentile of |x| taken as the range")
    p.add_argument("--max-drop", type=float, default=ptq.max_drop, metavar="FRACTION",
                   help="post-training quantization: warn when the file's top-1 accuracy on "
                   "--verify-data falls more than this below the float model's")
    p.add_argument("-o", "--output", default=None,
                   help="output .onnx (None: MODEL.onnx; QONNX goes to OUT.qonnx.onnx)")
    p.add_argument("--format", choices=["onnx", "qonnx", "both"], default="both",
                   help="onnx: packed standard ONNX for onnxruntime; qonnx: Brevitas QONNX "
                   "(Quant nodes, float weights) for qonnx/FINN")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (None: 25; 21-24 store 4-bit (and --ternary-storage int "
                   "ternary) weights as INT4, 13-20 as INT8, for older runtimes)")
    p.add_argument("--weight-form", choices=["cast", "dequant"], default="cast",
                   help="cast: INT2/INT4 -> Cast(INT8) -> DequantizeLinear, folded at load "
                   "into int8 kernels (fast); dequant: DequantizeLinear on the packed weights "
                   "(trits are always decoded to int8 first)")
    p.add_argument("--verify-data", default="random", metavar="SPEC|random",
                   help=f"test data for the verification gate ({_DATA_SPECS}; random: 256 "
                   f"random inputs); its training split also calibrates a float checkpoint")
    p.add_argument("--verify-limit", type=_non_negative, default=0, metavar="N",
                   help="verify on the first N test examples only (0: all)")
    p.add_argument("--min-agreement", type=float, default=gate.min_agreement,
                   metavar="FRACTION", help="gate: least top-1 agreement with the PyTorch "
                   "student")
    p.add_argument("--residual-add", choices=["auto", "integer", "float"], default="auto",
                   help="integer: residual adds fused into onnxruntime's QLinearAdd (fastest; "
                   "its rounding differs slightly from the student's); float: in float between "
                   "the integer convolutions (exact, slower: README, Runtime speed); auto: "
                   "integer when it passes the gate, else float")
    p.add_argument("--ternary-storage", choices=["trits", "int"], default="trits",
                   help="ternary weights as trits (five per byte, 1.6 bits, decoded by a "
                   "constant Gather onnxruntime folds at load) or as ONNX integers "
                   "(INT2 at opset 25, INT4 at 21-24, INT8 below)")
    p.add_argument("--ort", action="store_true",
                   help="also write MODEL.ort (onnxruntime's ORT format, as lowbit convert-ort)")
    p.add_argument("--max-steps", type=_non_negative_float, default=gate.max_steps,
                   metavar="STEPS",
                   help="gate: largest logit difference of the median input in output "
                   "quantization steps (one flipped code of the last activation times the "
                   "largest last-layer weight); the maximum over inputs is reported")
    p.add_argument("--max-near-ties", type=float, default=gate.max_near_ties,
                   metavar="FRACTION", help="gate: largest fraction of the inputs whose top-1 "
                   "flip counts as agreeing because the student's top two classes are within "
                   "the logit bound (a near-tie)")
    p.set_defaults(func=_export)


_EXPORT_DESCRIPTION = (
    "Export a lowbit checkpoint as packed ONNX (ternary weights as trits, five per byte; 4-bit "
    "as INT4) that stock onnxruntime runs, and/or as QONNX. BatchNorm is folded, activations "
    "are quantized exactly as in the student. After building, each file is run on the "
    "verification inputs and compared with the PyTorch student, with onnxruntime's float "
    "kernels (the file's reference semantics) and with the integer kernels it fuses for "
    "speed: top-1 agreement >= 99.9% and logit difference <= 4 output steps on the median "
    "input for both; if "
    "that fails, nothing is written and the exit status is 2. Files are written atomically.")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "export", help="export a checkpoint as packed ONNX / QONNX (verified)",
                description=_EXPORT_DESCRIPTION, options=_export_arguments)
    p.set_defaults(prog="lowbit export")


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_distill,
                                                                     _add_eval,
                                                                     _add_models, _add_demo,
                                                                     _add_run, _add_bench,
                                                                     _add_convert_ort,
                                                                     _add_footprint, _add_export]


@contextlib.contextmanager
def _interrupts() -> Iterator[list[int]]:
    """Let SIGTERM (``kill``, a scheduler's time limit) unwind like Ctrl-C, so the temp files
    of an unfinished write are removed, and list the signals received: an interrupt that
    lands inside a library's import can be swallowed there and resurface as another error,
    which is then still reported as the interrupt. The previous handlers are restored."""
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    try:
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield received
        return
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the result (and errors): no progress bars, per-epoch "
                   "lines or verification details (bars are never shown off a terminal)")


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    received: list[int] = []
    try:
        # parsing imports the subcommand's modules (torch: seconds), so Ctrl-C may land there
        with _interrupts() as received, contextlib.ExitStack() as claims:
            args = parser.parse_args(argv)
            args.claims = claims  # output locks, released when the command ends (_claim)
            args.func(args)
    except KeyboardInterrupt:
        received.append(signal.SIGINT)
    except LowbitError as exc:
        if not received:
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 2
    except Exception:  # noqa: BLE001  (a bug: show it as one, with its traceback)
        if not received:
            from . import __version__

            traceback.print_exc()
            print(f"{parser.prog}: internal error in lowbit {__version__}: this is a bug, "
                  f"please report it with the traceback above and the command line",
                  file=sys.stderr)
            return 1
    if received:  # also when the interrupt surfaced as another error (see _interrupts)
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``lowbit`` command line (subcommands' options are added when they are used)."""
    top = _Parser(
        prog="lowbit", description="lowbit: float model -> ternary/4-bit student -> packed ONNX.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    for name in ("train", "distill", "eval", "run", "export"):
        _add_quiet(sub.choices[name])
    return top


def _finish(code: int, argv: Sequence[str] | None) -> int:
    """The exit status; on the command line (``argv`` None) an interrupt ends the process
    here with 130: CPython would otherwise kill itself with SIGINT at exit (status -2, no
    message) when the interrupt landed in code that C ran for an import (torch's), even
    though lowbit handled it. Outputs are complete or absent by then (atomic writes)."""
    if code == 130 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit``."""
    return _finish(_run(parser(), argv), argv)



def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lowbit-export`` (same as ``lowbit export``)."""
    parser = _Parser(prog="lowbit-export", description=_EXPORT_DESCRIPTION,
                     formatter_class=_FORMATTER, options=_export_arguments)
    _add_quiet(parser)
    return _finish(_run(parser, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
