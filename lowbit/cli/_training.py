"""``lowbit train``, ``distill``, ``eval``, ``models``, ``demo``: the commands that need torch."""

from __future__ import annotations

import argparse
from typing import Any

from .. import _choices as c
from . import _base as b

_TRAIN_OPTIONS = ("epochs", "optimizer", "batch_size", "lr", "weight_decay", "schedule",
                  "warmup_epochs", "precision", "seed", "checkpoint_every")
_KD_OPTIONS = ("scheme", "loss", "temperature", "lam", "alpha", "beta", "gamma",
               "teacher_precision", "hidden", "attention")


# ------------------------------------------------------------------ data and validation

def _val_size(text: str) -> float:
    """``--val-size``: a number of examples (>= 1) or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value == int(value)) and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of examples (>= 1) or a fraction "
                                         f"in (0, 1), got {text!r}")
    return value


def _data_options(p: argparse.ArgumentParser) -> None:
    """Training data, how validation is held out of it, lowbit's augmentation."""
    b.data_option(p, "training data", default="digits")
    p.add_argument("--val-size", type=_val_size, default=None, metavar="N|FRACTION",
                   help=f"examples held out of the training data for validation, which picks "
                   f"nothing but is what every epoch reports (default: {c.VALIDATION_SIZE:,}, at "
                   f"most 10%% of the data); the test split is measured once, at the end")
    p.add_argument("--val-data", default=None, metavar="SPEC",
                   help="validate on this data instead (its test split, or a whole FILE.npz); "
                   "the training data is then used whole")
    p.add_argument("--no-augment", action="store_true",
                   help="turn off lowbit's augmentation of uint8 images >= 16 px (pad-4 random "
                   "crop + horizontal flip); smaller images and float inputs are never augmented")
    b.limit_option(p, "training examples (taken before validation is held out)")


def _splits(args: argparse.Namespace):
    """(training set, validation set, test set or None): validation is held out of the
    training data unless ``--val-data`` names other data; the test split is kept for the
    one report at the end."""
    from dataclasses import replace

    from .. import data

    train_set = data.load(args.data, train=True)
    if args.limit:
        train_set = train_set.subset(args.limit)
    test_set = None if train_set.split == "file" else data.load(args.data, train=False)
    if args.val_data:
        val_set = data.load(args.val_data, train=False)
        if val_set.split == "file":  # a whole file given for validation
            val_set = replace(val_set, split="validation")
    else:
        train_set, val_set = data.validation_split(train_set, args.val_size)
    if args.no_augment:
        train_set = replace(train_set, augment=False)
    return train_set, val_set, test_set


def _report(args: argparse.Namespace, what: str, model, record: dict, val_set, test_set) -> None:
    """Print the validation figure and the test figure (measured here, once) and keep the
    test figure in the run's records: the checkpoint's and the JSON beside it."""
    from pathlib import Path

    from .._ckptfile import add_to_record
    from .._io import write_json
    from ..distill import evaluate

    line = f"{what}: {val_set.split} accuracy {record['val_acc']:.2%} ({len(val_set):,} examples)"
    if test_set is not None:
        acc = evaluate(model, test_set, progress=not args.quiet)
        line += f"; test accuracy {acc:.2%} ({len(test_set):,} {test_set.name} test examples)"
        test = {"split": f"{test_set.name} test", "examples": len(test_set), "acc": acc}
        add_to_record(args.output, test=test)
        write_json(Path(args.output).with_suffix(".json"), {**record, "test": test})
    print(f"{line} -> {args.output}")


def _check_run_outputs(args: argparse.Namespace, *inputs: object) -> None:
    """``train``/``distill``: -o (and its .json record, --teacher-out) must not replace an
    input, and replaces an existing checkpoint only with --overwrite (or continues it with
    --resume)."""
    from pathlib import Path

    from .._io import check_outputs
    from ..errors import UsageError

    out = Path(args.output)
    if out.suffix == ".json":
        raise UsageError(f"-o {out}: the checkpoint needs another suffix than .json (its "
                         f"training record is written beside it as {out.stem}.json)")
    outputs = [out, out.with_suffix(".json"), getattr(args, "teacher_out", None)]
    b.claim(args, outputs, [p for p in inputs if isinstance(p, str) and Path(p).exists()])
    if args.resume or args.overwrite:
        return
    check_outputs(outputs[:1], overwrite=False,
                  hint="continue an unfinished run with --resume, or pass --overwrite to "
                  "start over and replace it")


def _build(arch: str, args: argparse.Namespace, train_set, seed: int):
    """The fresh model ``--arch`` names, its weights drawn from ``--seed``."""
    from .. import models

    kwargs = dict(args.arch_kwargs or {})
    if getattr(args, "width", None) is not None:
        kwargs["width"] = args.width
    if not models.is_user_code(arch):  # lowbit's models take the data's shape
        kwargs = {"num_classes": train_set.num_classes,
                  "in_channels": train_set.input_shape[0], **kwargs}
    return models.create(arch, seed=seed, **kwargs)


def _train_config(args: argparse.Namespace, base):
    from dataclasses import replace

    return replace(base, **b.given(args, [*_TRAIN_OPTIONS, "bn_batches"]))


# ------------------------------------------------------------------ train

def _train(args: argparse.Namespace) -> None:
    from ..distill import TrainConfig, train

    _check_run_outputs(args, *b.spec_paths(args.data, args.val_data))
    b.set_threads(args)
    cfg = _train_config(args, TrainConfig())
    train_set, val_set, test_set = _splits(args)
    model = _build(args.arch, args, train_set, cfg.seed)
    model, record = train(model, train_set, val_set, cfg, out=args.output, resume=args.resume,
                          progress=not args.quiet)
    _report(args, f"{args.arch} on {train_set.name}", model, record, val_set, test_set)


def _training_defaults(config) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(config).items() if k in (*_TRAIN_OPTIONS, "bn_batches")}


def _train_help_defaults() -> dict[str, Any]:
    from ..distill import TrainConfig

    return _training_defaults(TrainConfig())


def add_train(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "train", summary="train a float model (e.g. a teacher)",
                     defaults=_train_help_defaults,
                     description="Train a float model with SGD + momentum (or AdamW) and a "
                     "cosine or step schedule. Validation is held out of the training data; the "
                     "test split is measured once, at the end. Writes a self-describing "
                     "checkpoint every epoch and a .json record beside it; --resume continues "
                     "an interrupted run from it. Defaults are those of lowbit.train "
                     "(lowbit.TrainConfig).")
    b.arch_options(p, "architecture", "resnet20")
    p.add_argument("--width", type=b.positive, default=None,
                   help="channel multiplier (wide_resnet20; same as --arch-kwargs width)")
    _data_options(p)
    _training_options(p)
    p.set_defaults(func=_train)


def _training_options(p: argparse.ArgumentParser) -> None:
    """SGD and run options shared by ``train`` and ``distill`` (the fields of ``TrainConfig``;
    unset ones keep the command's config)."""
    p.add_argument("--epochs", type=b.positive, default=None, help="training epochs")
    b.batch_size_option(p, "examples per step")
    p.add_argument("--optimizer", choices=c.OPTIMIZERS, default=None,
                   help="sgd (momentum 0.9, Nesterov) or adamw (transformers)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay (L2 for sgd, decoupled for adamw)")
    p.add_argument("--schedule", choices=c.SCHEDULES, default=None,
                   help="learning-rate decay")
    p.add_argument("--warmup", dest="warmup_epochs", type=b.non_negative_float, default=None,
                   help="warm-up epochs (linear)")
    p.add_argument("--precision", choices=c.PRECISIONS, default=None,
                   help="bf16 autocast: faster on CPUs with AMX/AVX512-BF16 "
                   "(benchmarks/results/README.md: Training speed)")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds every random draw: initial weights, shuffling, augmentation")
    p.add_argument("--checkpoint-every", type=b.non_negative, default=None, metavar="STEPS",
                   help="also checkpoint every N steps (0: once per epoch)")
    b.threads_option(p, "torch")
    p.add_argument("--resume", action="store_true", help="continue the run saved in -o")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at -o (else refused)")
    b.output_option(p, "checkpoint path (.pt); its record goes beside it as .json",
                    required=True)
    b.quiet_option(p)


# ------------------------------------------------------------------ distill

def _teacher_and_init(args: argparse.Namespace, train_set, allow: set[str], seed: int):
    """(teacher: a checkpoint path/name or a fresh model for scheme A, its arch, the float
    model the student starts from)."""
    from pathlib import Path

    from .. import _checkpoint, models
    from ..errors import UsageError

    teacher: object = args.teacher
    if args.scheme == "A" and not Path(args.teacher).exists() and args.teacher in models.list():
        teacher = _build(args.teacher, args, train_set, seed)  # trained jointly
        teacher_arch = args.teacher
    else:
        teacher_arch = _checkpoint.load(args.teacher)["arch"]["name"]
    arch = args.arch or teacher_arch
    if (args.scheme or "C") == "C":  # the student starts from trained float weights
        if not args.init and arch != teacher_arch:
            raise UsageError(f"scheme C starts the {arch} student from trained float weights: "
                             f"pass --init FLOAT.pt (a {arch} checkpoint) or --arch "
                             f"{teacher_arch}")
        init, _ = _checkpoint.load_model(args.init or args.teacher, allow=allow, expect=arch)
    else:
        init = _build(arch, args, train_set, seed)
    return teacher, arch, init


def _gslr(args: argparse.Namespace):
    from ..distill import GSLR
    from ..errors import UsageError

    if not args.gslr:
        return None
    start, sep, end = args.gslr.partition(":")
    if not (sep and start.isdigit() and end.isdigit()):
        raise UsageError(f"--gslr expects START:END epochs (e.g. 0:30), got {args.gslr!r}")
    options = {"end_value": args.gslr_to, "shape": args.gslr_shape}
    return GSLR(int(start), int(end), **{k: v for k, v in options.items() if v is not None})


def _distill(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from ..distill import DISTILL_CONFIG, KDConfig, distill, student_for

    _check_run_outputs(args, args.teacher, args.init, *b.spec_paths(args.data, args.val_data))
    b.set_threads(args)
    cfg = _train_config(args, DISTILL_CONFIG)
    train_set, val_set, test_set = _splits(args)
    allow = b.allowed(args)  # only names given here: never one read from a checkpoint
    teacher, arch, init = _teacher_and_init(args, train_set, allow, cfg.seed)
    w, a = b.resolved_bits(args.bits) if args.bits else (None, None)
    spec = {"weight_bits": w, "act_bits": a} if args.bits else {}
    student = student_for(args.scheme or "C", init, seed=cfg.seed, **spec,
                          **b.layer_widths(args))
    kd = replace(KDConfig(), **b.given(args, _KD_OPTIONS), gslr=_gslr(args),
                 teacher_grad=args.teacher_grad, hidden_layers=args.hidden_layers)
    student, record = distill(student, teacher, train_set, val_set, kd, cfg, out=args.output,
                              resume=args.resume, teacher_out=args.teacher_out, allow=allow,
                              progress=not args.quiet)
    q = student.lowbit_quant
    _report(args, f"{arch} student ({q.weight_bits}/{q.act_bits} bits, scheme {kd.scheme}) on "
            f"{train_set.name}", student, record, val_set, test_set)


def _distill_help_defaults() -> dict[str, Any]:
    from dataclasses import asdict

    from ..distill import DISTILL_CONFIG, GSLR, KDConfig
    from ..quant import QuantSpec

    spec, gslr, kd = QuantSpec(), GSLR(0, 1), asdict(KDConfig())
    return {**_training_defaults(DISTILL_CONFIG), **{k: kd[k] for k in _KD_OPTIONS},
            "bits": f"{spec.weight_bits}/{spec.act_bits}", "first_bits": spec.first_bits,
            "last_bits": spec.last_bits or "same", "gslr_to": gslr.end_value,
            "gslr_shape": gslr.shape}


def add_distill(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(
        sub, "distill", summary="train a ternary/4-bit student from a teacher (knowledge "
        "distillation)", defaults=_distill_help_defaults,
        description="Quantization-aware training of a low-bit student with knowledge "
        "distillation (Hinton loss or Apprentice loss; Apprentice schemes A/B/C). Scheme C "
        "(default) starts the student from the teacher's float weights (or --init), B from "
        "scratch with the teacher frozen, A trains teacher and student jointly. Validation is "
        "held out of the training data; the test split is measured once, at the end. Writes a "
        "checkpoint (with the KD config, history and teacher identity) and a .json record "
        "every epoch; --resume continues an interrupted run exactly. Defaults are those of "
        "lowbit.distill in Python (DISTILL_CONFIG and KDConfig in lowbit.distill, QuantSpec).")
    p.add_argument("--teacher", required=True,
                   help="teacher checkpoint (lowbit train) or a shipped one by name "
                   "(lowbit models); scheme A also takes a model name to train a fresh "
                   "teacher jointly")
    p.add_argument("--teacher-arch", default=None, metavar="package.module:factory",
                   help="user code the teacher checkpoint names, when it is not --arch")
    b.arch_options(p, "student architecture (default: the teacher's)")
    p.add_argument("--init", default=None,
                   help="scheme C: float checkpoint of the student arch to start from "
                   "(default: the teacher, when the architectures match)")
    _data_options(p)
    b.bits_option(p, "the student's precision")
    b.layer_width_options(p, "unset: QuantSpec's")
    _kd_options(p)
    p.add_argument("--bn-batches", type=b.non_negative, default=None,
                   help="after the last epoch, re-estimate the student's BatchNorm statistics "
                   "over this many training batches (0: keep the running averages)")
    _training_options(p)
    p.set_defaults(func=_distill)


def _kd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=c.SCHEMES, default=None, help="Apprentice scheme")
    p.add_argument("--loss", choices=c.LOSSES, default=None,
                   help="hinton: (1-lam) CE + lam T^2 KL; apprentice: alpha H(y,p_T) + "
                   "beta H(y,p_S) + gamma T^2 H(p_T,p_S)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature T")
    p.add_argument("--lam", type=float, default=None, help="hinton: soft-loss weight")
    p.add_argument("--alpha", type=float, default=None, help="apprentice: teacher CE weight")
    p.add_argument("--beta", type=float, default=None, help="apprentice: student CE weight")
    p.add_argument("--gamma", type=float, default=None, help="apprentice: soft-loss weight")
    p.add_argument("--gslr", default=None, metavar="START:END",
                   help="gradual soft-loss reducing: the soft weight (--lam or --gamma) falls "
                   "to --gslr-to from epoch START to epoch END (0-based)")
    p.add_argument("--gslr-to", type=float, default=None, help="soft weight after END")
    p.add_argument("--gslr-shape", choices=c.GSLR_SHAPES, default=None, help="GSLR curve")
    p.add_argument("--teacher-grad", action="store_true",
                   help="scheme A: let the soft loss train the teacher too")
    p.add_argument("--teacher-out", default=None,
                   help="scheme A: also save the jointly trained teacher here")
    p.add_argument("--teacher-precision", choices=c.PRECISIONS, default=None,
                   help="schemes B/C: precision of the frozen teacher's forward (default: "
                   "--precision); bf16 is faster on CPUs with AMX/AVX512-BF16")
    p.add_argument("--hidden", type=b.non_negative_float, default=None,
                   help="weight of the hidden-state loss (TernaryBERT: MSE of each block's "
                   "output, summed over blocks; 0: off)")
    p.add_argument("--attention", type=b.non_negative_float, default=None,
                   help="weight of the attention loss (MSE of the scores each softmax in the "
                   "blocks reads)")
    p.add_argument("--hidden-layers", type=lambda text: tuple(text.split(",")), default=(),
                   metavar="PATH,...", help="module paths of the blocks whose outputs are "
                   "matched (default: the teacher's blocks, the children of its largest "
                   "nn.Sequential or nn.ModuleList of one class)")


# ------------------------------------------------------------------ eval, models, demo

def _eval(args: argparse.Namespace) -> None:
    from .. import _checkpoint, data
    from ..distill import evaluate

    b.set_threads(args)
    model, ckpt = _checkpoint.load_model(args.checkpoint, allow=b.allowed(args),
                                         expect=args.arch, arch_kwargs=args.arch_kwargs)
    test_set = data.as_data(data.load(args.data, train=False), stats=data.stats_of(ckpt["data"]))
    _checkpoint.check_data(ckpt, test_set, args.checkpoint, args.data)
    if args.limit:
        test_set = test_set.subset(args.limit)
    acc = evaluate(model, test_set, batch_size=args.batch_size, progress=not args.quiet)
    print(f"{args.checkpoint}: {ckpt['arch']['name']} top-1 accuracy {acc:.2%} on "
          f"{len(test_set):,} {test_set.name} {test_set.split} examples")


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "eval", summary="accuracy of a checkpoint",
                     description="Print the top-1 accuracy of a lowbit checkpoint on a "
                     "dataset's test split (or a whole FILE.npz), naming the split.")
    p.add_argument("checkpoint", help="lowbit checkpoint (.pt) or a shipped one by name")
    b.data_option(p, "test data", default="digits")
    b.limit_option(p, "test examples")
    b.batch_size_option(p, "examples per forward pass", default=500)
    b.threads_option(p, "torch")
    b.arch_options(p, "architecture the checkpoint holds (needed when it names user code)")
    b.quiet_option(p)
    p.set_defaults(func=_eval)


def _models(_: argparse.Namespace) -> None:
    from .. import models

    print("architectures:\n  " + "\n  ".join(models.list()))
    print("shipped checkpoints (test accuracy as trained; lowbit eval NAME --data ... "
          "reproduces it):")
    for name in models.list_pretrained():
        info = models.pretrained_info(name)
        w = info["weight_bits"]
        kind = "float" if w is None else (f"{'ternary' if w == 2 else f'{w}-bit'} weights, "
                                          f"{info['act_bits']}-bit activations")
        print(f"  {name:<28} {info['arch']} on {info['dataset']}, {kind}: "
              f"{info['test_acc']:.2%}")


def add_models(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(sub, "models", summary="list architectures and shipped checkpoints",
                     description="List the registered architectures (--arch NAME; your own "
                     "code is --arch package.module:factory) and the checkpoints shipped with "
                     "lowbit (usable by name wherever a checkpoint path is).")
    p.set_defaults(func=_models)


def _demo(args: argparse.Namespace) -> None:
    from .._demo import run_demo

    run_demo(args.output, args.data, epochs=args.epochs, limit=args.limit,
             test_limit=args.test_limit, threads=args.threads)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = b.subcommand(
        sub, "demo", summary="run the pipeline end to end on the offline default",
        description="The whole pipeline in one command: a float teacher, two ternary students "
        "at the same budget (labels only; KD + GSLR), export of the KD student as packed ONNX "
        "and QONNX verified against PyTorch, accuracy and latency in onnxruntime, memory "
        "footprint at batch 1 and 8. Prints one summary table; writes a report folder "
        "(summary.json, checkpoints, .onnx files, curves.png, footprint.png). The default data "
        "is scikit-learn's bundled 8x8 digits (no download, ~15 s on 2 cores); cifar10:DIR "
        "uses the shipped ResNet20 teacher and a small CPU budget (~4 min: 2 epochs on 5,000 "
        "images per student; change it with --epochs/--limit).")
    b.output_option(p, "report folder", default="reports/demo")
    b.data_option(p, "digits or cifar10:DIR", default="digits")
    p.add_argument("--epochs", type=b.positive, default=None,
                   help="epochs per student (default: digits 8, cifar10 2)")
    p.add_argument("--limit", type=b.non_negative, default=None, metavar="N",
                   help="training examples (default: digits all, cifar10 5000; 0: all)")
    p.add_argument("--test-limit", type=b.non_negative, default=None, metavar="N",
                   help="test examples for every accuracy and the export check (default: all)")
    b.threads_option(p, "onnxruntime intra-op")
    p.set_defaults(func=_demo)
