"""Command line: ``lowbit train|eval|...`` and ``lowbit-export``.

Each subcommand parses strings, calls the library function, prints. Errors the user can fix
(bad paths, wrong files, bad settings) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, OSError)


def _train(args: argparse.Namespace) -> None:
    from . import data, models
    from .distill import TrainConfig, train

    train_set, test_set = data.load(args.data, train=True), data.load(args.data, train=False)
    if args.limit:
        train_set = train_set.subset(args.limit)
    kwargs = {"num_classes": train_set.num_classes, "in_channels": train_set.input_shape[0]}
    if args.width is not None:
        kwargs["width"] = args.width
    model = models.create(args.arch, **kwargs)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, schedule=args.schedule,
                      warmup_epochs=args.warmup, precision=args.precision, seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    _, record = train(model, train_set, test_set, cfg, out=args.output, resume=args.resume)
    print(f"{args.arch} on {train_set.name}: test accuracy {record['val_acc']:.2%} "
          f"-> {args.output}")


def _eval(args: argparse.Namespace) -> None:
    from . import _checkpoint, data
    from .distill import evaluate

    model, ckpt = _checkpoint.load_model(args.checkpoint)
    test_set = data.load(args.data, train=False)
    expected = ckpt["data"]
    if test_set.input_shape != tuple(expected["input_shape"]) or \
            test_set.num_classes != len(expected["classes"]):
        raise ValueError(f"{args.checkpoint} expects {expected['name']} inputs "
                         f"{tuple(expected['input_shape'])} with {len(expected['classes'])} "
                         f"classes; {args.data} has {test_set.input_shape}, "
                         f"{test_set.num_classes} classes")
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
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
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
    p.set_defaults(func=_train)


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


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_eval,
                                                                     _add_models]


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    from . import _checkpoint, data
    from .distill import TrainingError

    try:
        args.func(args)
    except (data.DataError, _checkpoint.CheckpointError, TrainingError, *ERRORS) as exc:
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


if __name__ == "__main__":
    sys.exit(main())
