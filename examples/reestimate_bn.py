"""Re-estimate a quantized student's BatchNorm statistics: make a stopped QAT run usable.

While the learning rate is high, QAT weights near a quantization threshold flip from step to
step and BatchNorm's running averages lag behind them (Nagel et al. 2022), so a checkpoint
from the middle of a run evaluates, and exports, worse than its weights allow. This script
re-estimates the statistics over augmented training batches with the checkpoint's weights
(``lowbit.distill``'s ``reestimate_bn``, what ``lowbit distill --bn-batches N`` does after the last
epoch), prints the test accuracy before and after, and with ``-o`` writes the student as a
finished checkpoint that ``lowbit eval`` and ``lowbit-export`` take.

    python examples/reestimate_bn.py runs/student.pt --data cifar10:DIR -o student_bn.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lowbit
from lowbit import data
from lowbit.distill import reestimate_bn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a quantized student's checkpoint (finished or not) or "
                   "a shipped one's name")
    p.add_argument("--data", required=True,
                   help="the data it trained on (cifar10:DIR, cifar100:DIR, digits, FILE.npz): "
                   "training batches re-estimate, the test split measures")
    p.add_argument("--batches", type=int, default=100, help="training batches to average over")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("-o", "--output", default=None,
                   help="write the re-estimated student here (an existing file is refused)")
    args = p.parse_args()
    if args.output and Path(args.output).exists():
        p.error(f"{args.output} exists: choose another -o")
    if args.batches < 1:
        p.error("--batches must be >= 1")
    try:
        model, ckpt = lowbit.load_model(args.checkpoint)
    except lowbit.LowbitError as exc:  # not a lowbit checkpoint, no such file...
        p.error(str(exc))
    if ckpt.get("quant") is None:
        p.error(f"{args.checkpoint} is a float model: its running statistics need no fix")
    stats = data.stats_of(ckpt["data"])
    train = data.as_data(data.load(args.data), stats=stats)
    test = data.as_data(data.load(args.data, train=False), stats=stats)
    record = ckpt["record"]
    before = lowbit.evaluate(model, test, progress=True)
    used = reestimate_bn(model, train, args.batches, batch_size=args.batch_size,
                         seed=record.get("config", {}).get("seed", 0),
                         epoch=len(record.get("history", [])))
    after = lowbit.evaluate(model, test, progress=True)
    print(f"{args.checkpoint}: {test.name} {test.split} accuracy {before:.2%} -> {after:.2%} "
          f"with BatchNorm statistics re-estimated over {used} training batches")
    if args.output:
        record = {**record, "val_acc": after, "val_split": f"{test.name} {test.split}",
                  "bn_reestimated": {"batches": used, "val_acc_before": before, "val_acc": after}}
        lowbit.save_checkpoint(args.output, model, data=ckpt["data"], record=record)
        print(f"-> {args.output}")


if __name__ == "__main__":
    main()
