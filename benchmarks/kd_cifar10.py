"""Does distillation help a ternary student? Test accuracy at one training budget.

From a float teacher (the shipped ResNet20 for CIFAR-10, or a digits CNN trained here), four
ternary-weight / 4-bit-activation students of the same architecture train for ``--epochs``
epochs each, same data order and learning-rate schedule:

* ``no KD``          scheme C start (teacher's float weights), labels only (lam = 0)
* ``KD fixed``       scheme C, Hinton loss, T = ``--temperature``, lam = ``--lam`` throughout
* ``KD + GSLR``      the same, lam falling linearly to 0 from epoch ``--gslr-start`` to the last
* ``scheme B``       KD + GSLR from a fresh initialisation (frozen teacher), lr ``--lr-b``

Reported: the teacher's test accuracy and each student's after the budget (mean and spread
over ``--seeds``). Writes ``benchmarks/results/kd_<data>.{json,md}``.

Reproduce:
``python benchmarks/kd_cifar10.py --data cifar10:$LOWBIT_DATA --epochs 3`` (~1 h on 2 cores)
and ``python benchmarks/kd_cifar10.py --data digits --epochs 4 --seeds 3`` (~2 min).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import write_report

from lowbit import _checkpoint, data, models
from lowbit._io import atomic_write
from lowbit.distill import GSLR, distill, evaluate, student_for, train

RESULTS = Path(__file__).resolve().parent / "results"


def _teacher(args: argparse.Namespace, train_set: data.Dataset, test_set: data.Dataset):
    """The float teacher: ``--teacher``, the shipped CIFAR-10 ResNet20, or a digits CNN."""
    if args.teacher:
        return _checkpoint.load_model(args.teacher)[0], args.teacher
    if train_set.name == "cifar10":
        path = models.pretrained("resnet20_cifar10")
        return _checkpoint.load_model(path)[0], str(path)
    torch.manual_seed(0)
    teacher = models.create("digits_cnn", num_classes=train_set.num_classes)
    train(teacher, train_set, test_set, epochs=15, batch_size=64, lr=0.05, progress=False)
    return teacher, "digits_cnn trained here (15 epochs)"


def _students(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(name, scheme, distill settings) of each student."""
    gslr = GSLR(args.gslr_start, max(args.epochs - 1, args.gslr_start + 1))
    kd = {"temperature": args.temperature, "lam": args.lam}
    return [("no KD", "C", {"lam": 0.0}),
            ("KD fixed", "C", kd),
            ("KD + GSLR", "C", {**kd, "gslr": gslr}),
            ("scheme B (KD + GSLR)", "B", {**kd, "gslr": gslr, "lr": args.lr_b})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="cifar10:DIR or digits")
    p.add_argument("--teacher", default=None, help="float teacher checkpoint (default: shipped "
                   "resnet20_cifar10 for CIFAR-10, a digits CNN trained here for digits)")
    p.add_argument("--epochs", type=int, default=3, help="training budget of every student")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+seeds-1")
    p.add_argument("--only", nargs="+", default=None, metavar="STUDENT",
                   help="run only these rows (e.g. 'no KD' 'KD + GSLR')")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02, help="peak lr of the scheme C students")
    p.add_argument("--lr-b", type=float, default=0.1, help="peak lr of the scheme B student")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--lam", type=float, default=0.7)
    p.add_argument("--gslr-start", type=int, default=0, metavar="EPOCH",
                   help="GSLR: the soft weight stays at --lam up to this epoch (0-based), "
                   "then falls linearly to 0 at the last epoch")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="output path stem (default: results/kd_<data>)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also keep every student's checkpoint in DIR (resumable per epoch)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = data.load(args.data, train=True), data.load(args.data, train=False)
    if args.limit:
        train_set = train_set.subset(args.limit)
    if args.test_limit:
        test_set = test_set.subset(args.test_limit)
    teacher, teacher_source = _teacher(args, train_set, test_set)
    teacher_acc = evaluate(teacher, test_set)
    print(f"teacher ({teacher_source}): {teacher_acc:.2%}", flush=True)

    rows = []
    students = _students(args)
    if args.only:
        unknown = set(args.only) - {name for name, _, _ in students}
        if unknown:
            p.error(f"--only: unknown rows {sorted(unknown)}; rows: "
                    f"{[name for name, _, _ in students]}")
        students = [row for row in students if row[0] in args.only]
    for name, scheme, settings in students:
        accs, histories, seconds = [], [], 0.0
        run = {"lr": args.lr, **settings}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            torch.manual_seed(seed)
            student = student_for(scheme, teacher, weight_bits=2, act_bits=4)
            t0 = time.perf_counter()
            ckpt = None
            if args.save:
                slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
                ckpt = Path(args.save) / f"{slug}_seed{seed}.pt"
            _, record = distill(student, teacher, train_set, test_set, scheme=scheme,
                                epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                precision=args.precision, out=ckpt, progress=False, **run)
            seconds += time.perf_counter() - t0
            accs.append(record["val_acc"])
            histories.append(record["history"])
            print(f"{name} seed {seed}: {record['val_acc']:.2%}", flush=True)
        rows.append({"student": name, "scheme": scheme,
                     "settings": {k: (asdict(v) if isinstance(v, GSLR) else v)
                                  for k, v in run.items()},
                     "test_acc": accs, "mean": statistics.mean(accs),
                     "spread": max(accs) - min(accs), "seconds": seconds,
                     "histories": histories})
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    result = {"data": train_set.name, "train_images": len(train_set),
              "test_images": len(test_set), "epochs": args.epochs, "seeds": seeds,
              "batch_size": args.batch_size, "precision": args.precision,
              "student": "ternary weights (TWN), 4-bit activations, 8-bit first/last layer",
              "teacher": teacher_source, "teacher_acc": teacher_acc, "rows": rows}
    out = args.out or str(RESULTS / f"kd_{train_set.name}")
    write_report(f"{out}.json", result)
    lines = [f"| model | scheme | test accuracy ({args.seeds} seed(s): mean, spread) |",
             "|---|---|---|", f"| float teacher | - | {teacher_acc:.2%} |"]
    lines += [f"| {r['student']} | {r['scheme']} | {r['mean']:.2%} (±{r['spread'] / 2:.2%}) |"
              for r in rows]
    table = "\n".join(lines)
    atomic_write(f"{out}.md", lambda path: path.write_text(
        f"{train_set.name}: {len(train_set)} training / {len(test_set)} test images, "
        f"{args.epochs} epochs per student, batch {args.batch_size}, {args.precision}; "
        f"T = {args.temperature}, lam = {args.lam}; GSLR from epoch {args.gslr_start} "
        f"(0-based) to the last.\n\n{table}\n"))
    print(table)


if __name__ == "__main__":
    main()
