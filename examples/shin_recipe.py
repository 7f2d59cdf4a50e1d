"""Shin, Boo & Sung (2019) recipe: a ternary ResNet20 distilled from float teachers, in pieces.

"Knowledge Distillation for Optimization of Quantized Deep Neural Networks" (arXiv:1909.01688)
reports 92.7% CIFAR-10 and 67.0% CIFAR-100 test accuracy for ResNet20 with ternary weights
trained with KD: the teacher's softmax distribution (set by its size and the temperature T)
matters more than its accuracy, and GSLR (gradual soft-loss reducing) lowers the soft-loss
weight during training. This script runs those experiments with lowbit:

1. teachers: a float ResNet20 trained here (or ``--resnet20 CKPT``), optionally a wide
   ResNet20xN (``--teachers resnet20 wide_resnet20``, or ``--wide CKPT``);
2. for each activation width (``--act-bits``, default: the budget's): ternary ResNet20
   students started from the float ResNet20 (Apprentice scheme C) trained with KD at a
   fixed soft weight ``--lam`` (at each temperature of the sweep), with KD + GSLR at the
   temperature best on validation examples held out of the training data (5,000, at most
   10%; the test split is only reported) (lam held for about half the epochs, then falling
   linearly to 0 at the last epoch), and on labels only (run in that order, so the KD rows
   come first).

Every step is a checkpointed lowbit run in ``--out``: a finished step is read back, an
unfinished one resumes exactly from its last epoch, so the long schedules run piece by piece
(``--hours H`` stops cleanly after H hours, between epochs' checkpoints; run the same command
again to continue). The table gives each step's validation and test accuracy, epochs, wall
time and CPU threads.

Budgets: ``tiny`` (a smoke run: 256 images, seconds on digits), ``cpu`` (10,000 images, 2
epochs per student, T sweep), ``long`` (full training set: 200-epoch teacher, 40-epoch
students, 8- and 4-bit activations, T = 4: about a day on 2 CPU cores, run in pieces),
``paper`` (200-epoch teachers including the wide one, 100-epoch students).

    python examples/shin_recipe.py --budget tiny             # digits, offline, seconds
    python examples/shin_recipe.py --data cifar10:DIR --budget long --hours 2.5 \
        --out runs/shin_cifar10                              # one piece; rerun to go on
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lowbit
from lowbit import _checkpoint, data, models

TARGETS = {"cifar10": 0.927, "cifar100": 0.670}  # Shin, Boo & Sung 2019, ternary ResNet20


@dataclass(frozen=True)
class Budget:
    teacher_epochs: int
    epochs: int  # per student
    limit: int  # training images (0: all)
    test_limit: int  # test images (0: all)
    temperatures: tuple[float, ...]
    act_bits: tuple[int, ...]


BUDGETS = {
    "tiny": Budget(2, 2, limit=256, test_limit=256, temperatures=(1.0, 4.0), act_bits=(4,)),
    "cpu": Budget(3, 2, limit=10_000, test_limit=0, temperatures=(1.0, 2.0, 4.0, 8.0),
                  act_bits=(4,)),
    "long": Budget(200, 40, limit=0, test_limit=0, temperatures=(4.0,), act_bits=(8, 4)),
    "paper": Budget(200, 100, limit=0, test_limit=0, temperatures=(1.0, 2.0, 4.0, 8.0),
                    act_bits=(8, 4)),
}


class OutOfTime(BaseException):
    """The ``--hours`` budget of this piece is spent. A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` it interrupts (a kernel compiler's fallback) swallows it."""


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime


class Recipe:
    """Runs named steps once each; finished steps are read back from their checkpoints."""

    def __init__(self, args: argparse.Namespace, train: data.Dataset, val: data.Dataset,
                 test: data.Dataset):
        self.args, self.train, self.val, self.test = args, train, val, test
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "shin_recipe.json"
        self.log = json.loads(self.log_path.read_text()) if self.log_path.exists() else {}
        self.log.setdefault("steps", {})
        self.settings = {"batch_size": args.batch_size, "precision": args.precision,
                         "seed": args.seed}

    def run(self, name: str, build, fit) -> dict:
        """Step ``name``: ``fit(model, out, resume)`` on ``build()`` unless already finished."""
        path = self.out / f"{name}.pt"
        ckpt = _checkpoint.load(path) if path.exists() else None
        step = self.log["steps"].setdefault(name, {"pieces": []})
        if ckpt is None or "resume" in ckpt:
            print(f"== {name}: {'resuming' if ckpt else 'starting'} -> {path}", flush=True)
            start, first = time.time(), len(ckpt["record"]["history"]) if ckpt else 0
            try:
                fit(build(), path, ckpt is not None)
            finally:  # also when the time budget interrupts the step: record the piece
                done = _checkpoint.load(path) if path.exists() else None
                step["pieces"].append({"threads": torch.get_num_threads(),
                                       "epochs": [first, len(done["record"]["history"])
                                                  if done else 0],
                                       "wall_s": round(time.time() - start, 1)})
                self._save_log()
            ckpt = _checkpoint.load(path)
        record = ckpt["record"]
        if "test_acc" not in step:  # the test split: measured once per finished step
            step["test_acc"] = lowbit.evaluate(_checkpoint.build(ckpt), self.test)
        step.update(val_acc=record["val_acc"], epochs=len(record["history"]),
                    train_s=round(sum(h["seconds"] for h in record["history"]), 1))
        self._save_log()
        return step

    def model(self, name: str) -> torch.nn.Module:
        """The finished float model of step ``name``."""
        return _checkpoint.load_model(self.out / f"{name}.pt")[0]

    def _save_log(self) -> None:
        tmp = self.log_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.log, indent=2))
        tmp.replace(self.log_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", help="cifar10:DIR, cifar100:DIR or digits")
    p.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    p.add_argument("--teachers", nargs="+", choices=["resnet20", "wide_resnet20"],
                   default=["resnet20"])
    p.add_argument("--width", type=int, default=4, help="N of the wide ResNet20xN teacher")
    p.add_argument("--resnet20", default=None, help="trained float ResNet20 checkpoint "
                   "(teacher and the students' start; default: trained here)")
    p.add_argument("--wide", default=None, help="trained wide ResNet20xN checkpoint")
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="T sweep (default: the budget's)")
    p.add_argument("--act-bits", type=int, nargs="+", choices=[2, 4, 8], default=None,
                   help="students' activation bits (default: the budget's)")
    p.add_argument("--lam", type=float, default=0.7, help="soft-loss weight (GSLR's start)")
    p.add_argument("--lr", type=float, default=0.02, help="students' peak learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16",
                   help="bf16: ~2x faster training on CPUs with AMX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hours", type=float, default=None,
                   help="stop this piece after H hours (between checkpoints); rerun to go on")
    p.add_argument("--out", default="reports/shin_recipe", help="folder for checkpoints + JSON")
    args = p.parse_args()
    if args.hours:
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(max(1, int(args.hours * 3600)))

    budget = BUDGETS[args.budget]
    temperatures = tuple(args.temperatures or budget.temperatures)
    train, test = data.load(args.data), data.load(args.data, train=False)
    train = train.subset(budget.limit) if budget.limit else train
    # the temperature is chosen on examples held out of the training data, never on the test set
    train, val = data.validation_split(train)
    test = test.subset(budget.test_limit) if budget.test_limit else test
    recipe = Recipe(args, train, val, test)
    rows: list[dict] = []
    try:
        run_steps(recipe, budget, temperatures, rows)
    except OutOfTime:
        print(f"\n--hours {args.hours} spent: every finished epoch is checkpointed in "
              f"{recipe.out}; run the same command again to continue.")
    report(recipe, budget, rows)


def run_steps(recipe: Recipe, budget: Budget, temperatures: tuple[float, ...],
              rows: list[dict]) -> None:
    """Teachers; then per activation width KD (T sweep), KD + GSLR, labels only."""
    args, train, val, test = recipe.args, recipe.train, recipe.val, recipe.test
    kwargs = {"num_classes": train.num_classes, "in_channels": train.input_shape[0]}
    teacher_cfg = dict(epochs=budget.teacher_epochs, lr=0.1, weight_decay=5e-4,
                       **recipe.settings)

    def float_teacher(name: str, arch: str, given: str | None, **extra) -> torch.nn.Module:
        if given:
            model = _checkpoint.load_model(given)[0]
            rows.append({"step": name, "given": given, "val_acc": lowbit.evaluate(model, val),
                         "test_acc": lowbit.evaluate(model, test)})
            return model
        step = recipe.run(name, lambda: models.create(arch, seed=args.seed, **kwargs, **extra),
                          lambda m, out, resume: lowbit.train(m, train, val, out=out,
                                                              resume=resume, **teacher_cfg))
        rows.append({"step": name, **step})
        return recipe.model(name)

    resnet20 = float_teacher("resnet20_teacher", "resnet20", args.resnet20)
    teachers = {"resnet20": resnet20}
    if "wide_resnet20" in args.teachers:
        teachers["wide_resnet20"] = float_teacher(f"wide_resnet20x{args.width}_teacher",
                                                  "wide_resnet20", args.wide, width=args.width)
    student_cfg = dict(epochs=budget.epochs, lr=args.lr, **recipe.settings)
    hold = (budget.epochs - 1) // 2  # epochs at the full soft weight before GSLR starts
    gslr = lowbit.GSLR(hold, max(budget.epochs - 1, hold + 1))

    def student(name: str, act_bits: int, teacher: str | None = None, temperature: float = 1.0,
                schedule: lowbit.GSLR | None = None) -> dict:
        def build() -> torch.nn.Module:  # scheme C: the float ResNet20's weights
            return lowbit.quantize(resnet20, weight_bits=2, act_bits=act_bits)

        def fit(model, out, resume):
            if teacher is None:  # labels only: plain QAT through the same training loop
                return lowbit.train(model, train, val, out=out, resume=resume, **student_cfg)
            return lowbit.distill(model, teachers[teacher], train, val, scheme="C",
                                  temperature=temperature, lam=args.lam, gslr=schedule,
                                  out=out, resume=resume, **student_cfg)

        step = recipe.run(name, build, fit)
        row = {"step": name, "act_bits": act_bits, "teacher": teacher,
               "temperature": temperature if teacher else None, "gslr": schedule is not None,
               **step}
        rows.append(row)
        return row

    # the goals first (KD at each width), then GSLR at the sweep's best T, then labels only:
    # a long run that is stopped early has its most important rows
    widths = budget.act_bits if args.act_bits is None else args.act_bits
    best = {}
    for a in widths:
        for name in teachers:
            sweep = [student(f"ternary_a{a}_kd_{name}_T{t:g}", a, name, t) for t in temperatures]
            best[a, name] = max(sweep, key=lambda r: r["val_acc"])["temperature"]
    for (a, name), t in best.items():
        student(f"ternary_a{a}_kd_gslr_{name}_T{t:g}", a, name, t, gslr)
    for a in widths:
        student(f"ternary_a{a}_labels", a)


def report(recipe: Recipe, budget: Budget, rows: list[dict]) -> None:
    """Print and write the table of finished steps (markdown next to the JSON log)."""
    args, train, val, test = recipe.args, recipe.train, recipe.val, recipe.test
    lines = [f"{train.name}: {len(train):,} training / {len(val):,} validation (held out of "
             f"the training data; picks T) / {len(test):,} test images, budget "
             f"{args.budget} (teachers {budget.teacher_epochs} epochs, students "
             f"{budget.epochs}), ternary weights, lam = {args.lam}; GSLR: lam held for "
             f"{(budget.epochs - 1) // 2 + 1} epoch(s), then linearly to 0 at the last", "",
             "| step | validation accuracy | test accuracy | epochs | train time | CPU threads |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        threads = sorted({p["threads"] for p in r.get("pieces", [])})
        lines.append(f"| {r['step']} | {r['val_acc']:.2%} | {r['test_acc']:.2%} | "
                     f"{r.get('epochs', '-')} | "
                     f"{r.get('train_s', 0) / 60:.0f} min | "
                     f"{', '.join(map(str, threads)) or '-'} |")
    target = TARGETS.get(train.name)
    if target:
        lines += ["", f"Shin, Boo & Sung (2019) report {target:.1%} for the ternary ResNet20 on "
                  f"{train.name}."]
    print("\n" + "\n".join(lines))
    (recipe.out / "shin_recipe.md").write_text("\n".join(lines) + "\n")
    print(f"\n-> {recipe.log_path}")


if __name__ == "__main__":
    main()
