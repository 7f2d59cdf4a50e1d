"""Float training through the library and the CLI, on the bundled digits."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import lowbit
from lowbit import _checkpoint, models
from lowbit.distill import TrainConfig, TrainingError, evaluate, train


def test_train_learns_digits_and_records(tmp_path, digits_split):
    train_set, test_set = digits_split
    out = tmp_path / "t.pt"
    model, record = train(models.create("digits_cnn", width=8), train_set, test_set,
                          epochs=4, batch_size=64, lr=0.05, out=out, progress=False)
    assert record["val_acc"] > 0.85 and len(record["history"]) == 4
    assert record["config"]["epochs"] == 4
    loaded, ckpt = _checkpoint.load_model(out)
    assert "resume" not in ckpt  # a finished run keeps no optimiser state
    assert evaluate(loaded, test_set) == pytest.approx(record["val_acc"])
    with pytest.raises(TrainingError, match="finished run"):
        train(models.create("digits_cnn", width=8), train_set, test_set, epochs=4,
              batch_size=64, lr=0.05, out=out, resume=True, progress=False)


def test_lr_schedules():
    cos = TrainConfig(epochs=10, lr=0.1)
    assert cos.lr_at(0, 100) == pytest.approx(0.1)
    assert cos.lr_at(500, 100) == pytest.approx(0.05)
    step = TrainConfig(epochs=10, lr=0.1, schedule="step", milestones=(0.5, 0.8))
    assert [step.lr_at(s, 10) for s in (0, 49, 50, 80)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    warm = TrainConfig(epochs=10, lr=0.1, warmup_epochs=1)
    assert warm.lr_at(4, 10) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_train_eval_and_errors(tmp_path):
    out = tmp_path / "digits.pt"
    r = _cli("train", "--arch", "digits_cnn", "--data", "digits", "--epochs", "2",
             "--batch-size", "64", "--lr", "0.05", "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and out.is_file()
    # off a terminal, every stage ends with one line and the time since the start
    assert re.search(r"^\[\s*[\d.]+s\] epoch 2/2: \d+ step in [\d.]+s$", r.stderr, re.M), r.stderr
    r = _cli("eval", str(out), "--data", "digits", cwd=tmp_path)
    record = json.loads(out.with_suffix(".json").read_text())  # the test split, measured once
    assert record["val_split"].startswith("digits validation (") and "held out" in \
        record["val_split"]
    assert record["test"]["split"] == "digits test"
    assert _checkpoint.load(out)["record"]["test"] == record["test"]  # the checkpoint's too
    assert r.returncode == 0 and f"{record['test']['acc']:.2%}" in r.stdout
    assert f"validation accuracy {record['val_acc']:.2%}" not in r.stdout
    for args, message in [
        (("eval", str(tmp_path / "nope.pt")), "no such file"),
        (("train", "--data", f"cifar10:{tmp_path}/none", "-o", "x.pt"), "not found"),
        (("train", "--arch", "vgg", "-o", "x.pt"), "unknown model 'vgg'"),
        (("eval", str(out), "--data", "cifar10:/nonexistent"), "not found"),
    ]:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()


def test_package_import_is_lazy():
    code = "import sys, lowbit; assert 'torch' not in sys.modules; print(lowbit.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert lowbit.train is train
