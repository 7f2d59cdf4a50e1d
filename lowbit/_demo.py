"""``lowbit demo``: the whole pipeline on the offline default (digits), as a user sees it."""

from __future__ import annotations

from pathlib import Path

from . import data, models
from ._io import write_json
from .distill import TrainConfig, evaluate, train


def run_demo(out_dir: str | Path = "reports/demo", data_spec: str = "digits") -> dict:
    """Train the float digits teacher, report its test accuracy; returns the summary dict."""
    out = Path(out_dir)
    train_set, test_set = data.load(data_spec, train=True), data.load(data_spec, train=False)
    teacher = models.create("digits_cnn", num_classes=train_set.num_classes)
    cfg = TrainConfig(epochs=30, batch_size=64, lr=0.05, seed=0)
    teacher, record = train(teacher, train_set, test_set, cfg, out=out / "teacher.pt")
    summary = {"data": train_set.name, "teacher": {"arch": "digits_cnn",
               "test_acc": evaluate(teacher, test_set), "checkpoint": str(out / "teacher.pt"),
               "epochs": cfg.epochs}}
    write_json(out / "summary.json", summary)
    print(f"float teacher digits_cnn: test accuracy {summary['teacher']['test_acc']:.2%} "
          f"({len(test_set)} test images) -> {out / 'teacher.pt'}")
    return summary


__all__ = ["run_demo"]
