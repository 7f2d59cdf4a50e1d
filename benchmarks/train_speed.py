"""Training speed: distillation (ternary QAT student + frozen teacher forward) vs float training.

Same architecture (ResNet20), same batch (128), same thread count, same process, through the
real training loop (``lowbit.train`` / ``lowbit.distill``: loader, augmentation, SGD, no
checkpoints). Each configuration trains ``--steps`` steps per epoch for two epochs and the
second epoch's img/s is kept (the first includes warm-up and the student's activation-range
initialisation); configurations are interleaved over ``--rounds`` rounds and the best round
is reported, so background load hits every configuration alike. Rows:

* ``float``          float training (the baseline)
* ``qat``            ternary student trained on labels alone (no teacher)
* ``distill``        ternary student + frozen float teacher (scheme C, Hinton loss)
* ``distill_tbf16``  the same with the teacher's forward alone in bf16 (fp32 training)

each in fp32 and bf16 autocast. Images are CIFAR-10 (``--data``/``LOWBIT_DATA``) or random
uint8 of the same shape: speed does not depend on pixel values. Writes
``benchmarks/results/train_speed.{json,md}``.

Reproduce: ``python benchmarks/train_speed.py --threads 2`` (~10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import write_report

from lowbit import data, models
from lowbit._io import atomic_write
from lowbit.distill import distill, student_for, train

RESULTS = Path(__file__).resolve().parent / "results"


def _images(spec: str | None, n: int) -> data.Dataset:
    """``n`` CIFAR-10 training images, or random CIFAR-shaped ones when no data is given."""
    if spec:
        return data.load(spec, train=True).subset(n)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return data.Dataset("random", images, labels, tuple(map(str, range(10))),
                        (125.3, 123.0, 113.9), (63.0, 62.1, 66.7))


def _measure(kind: str, precision: str, train_set: data.Dataset, teacher: torch.nn.Module,
             batch: int) -> float:
    """img/s of the second of two epochs of ``kind`` training."""
    torch.manual_seed(0)
    settings = dict(epochs=2, batch_size=batch, lr=0.02, precision=precision, progress=False)
    if kind == "float":
        _, record = train(models.create("resnet20", num_classes=10), train_set, **settings)
    elif kind == "qat":
        _, record = train(student_for("C", teacher, weight_bits=2, act_bits=4), train_set,
                          **settings)
    else:
        student = student_for("C", teacher, weight_bits=2, act_bits=4)
        fast = "bf16" if kind == "distill_tbf16" else None
        _, record = distill(student, teacher, train_set, scheme="C", temperature=4.0, lam=0.7,
                            teacher_precision=fast, **settings)
    return record["history"][-1]["img_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="cifar10:DIR (default: $LOWBIT_DATA, else "
                   "random images)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12, help="steps per epoch (two epochs each)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--out", default=str(RESULTS / "train_speed"), help="output path stem")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = args.data or (f"cifar10:{os.environ['LOWBIT_DATA']}"
                         if os.environ.get("LOWBIT_DATA") else None)
    train_set = _images(spec, args.steps * args.batch_size)
    teacher = models.create("resnet20", num_classes=10).eval()  # weights do not change speed
    configs = [(k, pr) for pr in args.precisions.split(",")
               for k in ("float", "qat", "distill", "distill_tbf16")
               if not (k == "distill_tbf16" and pr == "bf16")]
    best: dict[tuple[str, str], float] = {}
    for r in range(args.rounds):
        for kind, precision in configs:
            t0 = time.perf_counter()
            ips = _measure(kind, precision, train_set, teacher, args.batch_size)
            best[kind, precision] = max(best.get((kind, precision), 0.0), ips)
            print(f"round {r + 1}: {kind:8s} {precision}: {ips:7.1f} img/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [{"kind": k, "precision": pr, "img_per_s": best[k, pr],
             "vs_float_same_precision": best[k, pr] / best["float", pr],
             "vs_float_fp32": best[k, pr] / best["float", "fp32"]
             if ("float", "fp32") in best else None} for k, pr in configs]
    result = {"arch": "resnet20", "student": "ternary weights, 4-bit activations (scheme C)",
              "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps,
              "rounds": args.rounds, "data": train_set.name, "torch": torch.__version__,
              "rows": rows,
              "load_average": os.getloadavg()}
    write_report(f"{args.out}.json", result)
    lines = ["| training | precision | img/s | vs float (same precision) | vs float fp32 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['precision']} | {r['img_per_s']:.0f} | "
              f"{r['vs_float_same_precision']:.2f}x | "
              f"{'-' if r['vs_float_fp32'] is None else format(r['vs_float_fp32'], '.2f') + 'x'} |"
              for r in rows]
    table = "\n".join(lines)
    atomic_write(f"{args.out}.md", lambda path: path.write_text(
        f"ResNet20, batch {args.batch_size}, {args.threads} threads, best of {args.rounds} "
        f"interleaved rounds, {train_set.name} images; load average at the end "
        f"{os.getloadavg()[0]:.1f}.\n\n{table}\n"))
    print(table)


if __name__ == "__main__":
    main()
