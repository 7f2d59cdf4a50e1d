"""Apprentice (Mishra & Marr, ICLR 2018) schemes A, B and C side by side, same budget.

A ternary student (2-bit weights, 4-bit activations) learns with the Apprentice loss

    alpha * H(y, p_T) + beta * H(y, p_S) + gamma * T^2 * H(p_T^T, p_S^T)

(alpha=1, beta=0.5, gamma=0.5, T=1: the paper's values) under each scheme:

    A  teacher and student trained jointly from scratch (the alpha term trains the teacher)
    B  frozen trained teacher, student from scratch
    C  frozen trained teacher, student started from the teacher's float weights

Teacher and student share the architecture: a digits CNN trained here for ``--data digits``
(offline, ~15 s on 2 cores), the shipped ResNet20 for ``--data cifar10:DIR``. Writes
``--out``/apprentice_schemes.json and prints the comparison.

    python examples/apprentice_schemes.py                                 # digits
    python examples/apprentice_schemes.py --data cifar10:DIR --epochs 2 --limit 5000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit
from lowbit import data, models

SCHEMES = {"A": "jointly trained from scratch", "B": "from scratch, frozen teacher",
           "C": "from the float weights, frozen teacher"}


def float_teacher(train: data.Dataset, val: data.Dataset, out: Path):
    """The shipped ResNet20 for CIFAR-10; a digits CNN trained here otherwise."""
    if train.name == "cifar10":
        return lowbit.load_model(models.pretrained("resnet20_cifar10"))[0], "resnet20"
    model = models.create("digits_cnn", num_classes=train.num_classes,
                          in_channels=train.input_shape[0])
    model, _ = lowbit.train(model, train, val, epochs=20, batch_size=64, lr=0.05,
                            out=out / "teacher.pt")
    return model, "digits_cnn"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="digits (default) or cifar10:DIR")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per scheme (default: digits 10, cifar10 2)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test images")
    p.add_argument("--lr", type=float, default=0.02, help="peak lr of scheme C (fine-tuning)")
    p.add_argument("--lr-scratch", type=float, default=0.1, help="peak lr of schemes A and B")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: ~2x faster training on CPUs with AMX")
    p.add_argument("--out", default="reports/apprentice", help="folder for checkpoints + JSON")
    args = p.parse_args()
    torch.manual_seed(0)  # initial weights of every model built here

    train, test = data.load(args.data), data.load(args.data, train=False)
    train = train.subset(args.limit) if args.limit else train
    train, val = data.validation_split(train)  # what the epochs report; the test split: once
    test = test.subset(args.test_limit) if args.test_limit else test
    epochs = args.epochs or (10 if train.name == "digits" else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # lowbit writes into existing folders only
    teacher, arch = float_teacher(train, val, out)
    shape = {"num_classes": train.num_classes, "in_channels": train.input_shape[0]}
    rows = [{"scheme": "-", "model": f"float teacher ({arch})",
             "test_acc": lowbit.evaluate(teacher, test)}]
    for scheme, how in SCHEMES.items():
        print(f"scheme {scheme}: student {how}")
        # A trains a fresh teacher with the student; B and C distil from the trained one.
        t = models.create(arch, **shape) if scheme == "A" else teacher
        student = lowbit.student_for(scheme, teacher, weight_bits=2, act_bits=4)
        student, record = lowbit.distill(
            student, t, train, val, scheme=scheme, loss="apprentice", alpha=1.0, beta=0.5,
            gamma=0.5, temperature=1.0, epochs=epochs, batch_size=args.batch_size,
            lr=args.lr if scheme == "C" else args.lr_scratch, precision=args.precision,
            out=out / f"student_{scheme}.pt")
        rows.append({"scheme": scheme, "model": f"ternary student, {how}",
                     "val_acc": record["val_acc"], "test_acc": lowbit.evaluate(student, test),
                     "teacher_acc": lowbit.evaluate(t, test) if scheme == "A" else None})

    print(f"\n{train.name}: {len(train):,} training / {len(val):,} validation (held out) / "
          f"{len(test):,} test images, {epochs} epochs "
          f"per scheme, Apprentice loss (alpha 1, beta 0.5, gamma 0.5, T 1)\n")
    print("| scheme | model | test accuracy |\n|---|---|---|")
    for r in rows:
        joint = f" (its teacher: {r['teacher_acc']:.2%})" if r.get("teacher_acc") else ""
        print(f"| {r['scheme']} | {r['model']} | {r['test_acc']:.2%}{joint} |")
    (out / "apprentice_schemes.json").write_text(json.dumps(
        {"data": train.name, "train_images": len(train), "validation": val.split,
         "test_images": len(test),
         "epochs": epochs, "rows": rows}, indent=2))
    print(f"\n-> {out / 'apprentice_schemes.json'}")


if __name__ == "__main__":
    main()
