"""Ternary scale rules: "twn" vs "learned", by accuracy after a short QAT run and by speed.

Two settings, each student started from float weights (Apprentice scheme C) and trained on
labels alone with the shared training loop (``lowbit.train``):

* ``digits``: digits_cnn trained in float for ``--digits-float-epochs``, then each rule
  for ``--digits-epochs`` QAT epochs; accuracy on the digits test split.
* ``cifar10``: a float ResNet20 checkpoint (``--teacher``; default the shipped teacher), then
  ``--cifar-steps`` QAT steps of ``--cifar-batch`` (128) images of a CIFAR-10 training
  subset; accuracy on the first ``--cifar-val`` test images, also right after quantization
  and calibration of the activation ranges on 4 batches (step 0).

Writes ``benchmarks/results/quant_rules.{json,md}``. Reproduce:
``python benchmarks/quant_rules.py --threads 2 --data cifar10:$LOWBIT_DATA``.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice
from pathlib import Path

import torch
from common import write_report

from lowbit import _checkpoint, data, models
from lowbit._io import atomic_write
from lowbit.distill import evaluate, train
from lowbit.quant import calibrate, quantize

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("twn", "learned")


def _qat(float_model, rule: str, train_set, val_set, **settings) -> dict:
    torch.manual_seed(0)
    student = quantize(float_model, weight_bits=2, act_bits=4, scale_rule=rule)
    t0 = time.perf_counter()
    _, record = train(student, train_set, None, progress=False, **settings)
    seconds = time.perf_counter() - t0
    return {"rule": rule, "val_acc": evaluate(student, val_set),
            "img_per_s": record["history"][-1]["img_per_s"], "seconds": round(seconds, 1)}


def digits_rows(args) -> list[dict]:
    train_set, val_set = data.digits(train=True), data.digits(train=False)
    torch.manual_seed(0)
    teacher, _ = train(models.create("digits_cnn"), train_set, epochs=args.digits_float_epochs,
                       batch_size=64, lr=0.05, progress=False)
    rows = [{"setting": "digits", "rule": "float", "val_acc": evaluate(teacher, val_set)}]
    for rule in RULES:
        rows.append({"setting": "digits",
                     **_qat(teacher, rule, train_set, val_set, epochs=args.digits_epochs,
                            batch_size=64, lr=0.02)})
    return rows


def cifar_rows(args) -> list[dict]:
    teacher, _ = _checkpoint.load_model(args.teacher or models.pretrained("resnet20_cifar10"))
    train_set = data.load(args.data, train=True).subset(args.cifar_steps * args.cifar_batch)
    val_set = data.load(args.data, train=False).subset(args.cifar_val)
    rows = [{"setting": "cifar10", "rule": "float", "val_acc": evaluate(teacher, val_set)}]
    for rule in RULES:
        start = quantize(teacher, weight_bits=2, act_bits=4, scale_rule=rule)
        calibrate(start, (x for x, _ in islice(data.Loader(train_set, args.cifar_batch), 4)))
        row = _qat(teacher, rule, train_set, val_set, epochs=1, batch_size=args.cifar_batch,
                   lr=0.01, weight_decay=5e-4)
        row["val_acc_step0"] = evaluate(start, val_set)  # calibrated ranges, no training
        rows.append({"setting": "cifar10", **row})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", help="cifar10:DIR for the CIFAR-10 setting (skipped without it)")
    p.add_argument("--teacher", help="float ResNet20 checkpoint (default: shipped teacher)")
    p.add_argument("--digits-float-epochs", type=int, default=15)
    p.add_argument("--digits-epochs", type=int, default=10)
    p.add_argument("--cifar-steps", type=int, default=300)
    p.add_argument("--cifar-batch", type=int, default=128)
    p.add_argument("--cifar-val", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = digits_rows(args) + (cifar_rows(args) if args.data else [])
    out = {"threads": args.threads, "args": vars(args), "rows": rows}
    write_report(RESULTS / "quant_rules.json", out)
    keys = ["setting", "rule", "val_acc", "val_acc_step0", "img_per_s", "seconds"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float)
                                       else str(r.get(k, "")) for k in keys) + " |")
    atomic_write(RESULTS / "quant_rules.md", lambda f: f.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
