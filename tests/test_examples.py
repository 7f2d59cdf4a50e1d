"""Every example and ``lowbit demo`` run as written, in their shortest setting (offline digits).

Each runs in a fresh process with this Python on real components (training, export,
onnxruntime); the checks read what a user would look at: printed accuracies, written files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd``; fail with the end of its output if it exits non-zero."""
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{args} exited {res.returncode}:\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res


def percent(pattern: str, text: str) -> float:
    """The percentage following ``pattern`` in ``text`` (e.g. 'accuracy 98.61%' -> 98.61)."""
    match = re.search(pattern + r"\s*([\d.]+)%", text)
    assert match, f"no {pattern!r} percentage in:\n{text[-2000:]}"
    return float(match.group(1))


def test_quickstart(tmp_path: Path) -> None:
    res = run([sys.executable, str(EXAMPLES / "quickstart.py")], tmp_path)
    assert percent("onnxruntime accuracy", res.stdout) > 90
    assert percent("ternary student", res.stdout) > 90
    assert (tmp_path / "digits_ternary.onnx").stat().st_size > 0


def test_your_model(tmp_path: Path) -> None:
    res = run([sys.executable, str(EXAMPLES / "your_model.py")], tmp_path)
    assert percent("onnxruntime accuracy", res.stdout) > 90
    assert percent("ternary student", res.stdout) > 90
    assert "layer2.downsample.0  Conv2d  2       4        QLinearConv" in res.stdout
    assert "onnxruntime kernels: {'integer': 6, 'float': 1}" in res.stdout
    assert (tmp_path / "resnet_ternary.onnx").stat().st_size > 0


def test_shin_recipe_runs_each_step_once_and_continues_where_it_stopped(tmp_path: Path) -> None:
    cmd = [sys.executable, str(EXAMPLES / "shin_recipe.py"), "--budget", "tiny", "--out",
           str(tmp_path / "shin")]
    first = run(cmd, tmp_path)
    log = json.loads((tmp_path / "shin" / "shin_recipe.json").read_text())["steps"]
    assert list(log) == ["resnet20_teacher", "ternary_a4_kd_resnet20_T1",
                         "ternary_a4_kd_resnet20_T4", f"ternary_a4_kd_gslr_{_best(log)}",
                         "ternary_a4_labels"]  # KD rows first: a run stopped early has them
    assert all(len(s["pieces"]) == 1 and s["epochs"] == 2 for s in log.values())
    # GSLR: the soft weight is lam in the first epoch and 0 in the last
    gslr = torch.load(tmp_path / "shin" / f"ternary_a4_kd_gslr_{_best(log)}.pt",
                      weights_only=True)["record"]["history"]
    assert [h["soft_weight"] for h in gslr] == [0.7, 0.0]
    # the table printed and written is the measured one, step by step
    report = (tmp_path / "shin" / "shin_recipe.md").read_text()
    for name, step in log.items():
        row = f"| {name} | {step['val_acc']:.2%} | {step['test_acc']:.2%} |"
        assert row in report and row in first.stdout
    # a second run trains nothing (every step is finished) and reports the same table
    second = run(cmd, tmp_path)
    again = json.loads((tmp_path / "shin" / "shin_recipe.json").read_text())["steps"]
    assert all(len(s["pieces"]) == 1 for s in again.values())
    assert "starting" not in second.stdout and "resuming" not in second.stdout
    table = first.stdout[first.stdout.index("| step |"):]
    assert second.stdout.endswith(table)


def _best(log: dict) -> str:
    """``resnet20_T<best>``: the KD step of the sweep best on validation (never on test)."""
    t1, t4 = log["ternary_a4_kd_resnet20_T1"], log["ternary_a4_kd_resnet20_T4"]
    return "resnet20_T1" if t1["val_acc"] >= t4["val_acc"] else "resnet20_T4"


def test_apprentice_schemes(tmp_path: Path) -> None:
    res = run([sys.executable, str(EXAMPLES / "apprentice_schemes.py"), "--epochs", "2",
               "--out", str(tmp_path / "app")], tmp_path)
    result = json.loads((tmp_path / "app" / "apprentice_schemes.json").read_text())
    accs = {r["scheme"]: r["test_acc"] for r in result["rows"]}
    assert set(accs) == {"-", "A", "B", "C"}
    assert accs["-"] > 0.9 and accs["C"] > 0.8  # scheme C starts from the trained weights
    assert result["rows"][1]["teacher_acc"] is not None  # scheme A's jointly trained teacher
    assert "| C |" in res.stdout


@pytest.mark.skipif(shutil.which("bash") is None or not (ROOT / ".venv/bin/lowbit").exists(),
                    reason="needs bash and the full install in .venv (make demo)")
def test_edge_deploy(tmp_path: Path) -> None:
    res = run(["bash", str(EXAMPLES / "edge_deploy.sh"), "--min-agreement", "0.95",
               str(tmp_path)], ROOT)
    assert "edge install OK: no torch, same accuracy" in res.stdout
    assert percent("edge install: model.onnx: top-1 accuracy", res.stdout) > 50
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.ort").is_file()


def test_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = run([sys.executable, "-m", "lowbit.cli", "demo", "-o", str(out)], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "digits" and summary["test_images"] == 359
    assert summary["teacher"]["test_acc"] > 0.95
    for student in summary["students"].values():
        assert student["test_acc"] > 0.9
        assert len(student["history"]) == summary["budget"]["epochs"]
    assert summary["students"]["kd_gslr"]["history"][-1]["soft_weight"] == 0.0  # GSLR's end
    onnx, qonnx = summary["export"]["onnx"], summary["export"]["qonnx"]
    assert onnx["verification"]["passed"] and qonnx["verification"]["passed"]
    assert onnx["ort_acc"] > 0.9 and onnx["bits_per_weight"] < 4 < qonnx["bits_per_weight"]
    assert [t["batch"] for t in onnx["latency"]] == [1, 8]
    fp32, ternary = summary["footprint"]["fp32"], summary["footprint"]["ternary (exported)"]
    assert ternary["weight_bytes"] * 8 < fp32["weight_bytes"]
    assert set(ternary["peak_activation_bytes"]) == {"1", "8"}
    for name in ("student.onnx", "student.qonnx.onnx", "teacher.pt", "student_kd_gslr.pt"):
        assert (out / name).is_file(), name
    for png in summary["plots"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "in onnxruntime" in res.stdout and "bits/w" in res.stdout


@pytest.mark.parametrize("spec", ["cifar10:{tmp}/missing", "mnist"])
def test_demo_bad_data(tmp_path: Path, spec: str) -> None:
    res = subprocess.run([sys.executable, "-m", "lowbit.cli", "demo", "-o",
                          str(tmp_path / "demo"), "--data", spec.format(tmp=tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), res.stderr


def test_reestimate_bn_writes_a_finished_student_and_keeps_inputs(tmp_path: Path) -> None:
    import lowbit
    from lowbit import data, models, quantize

    student = quantize(models.create("digits_cnn", width=4), weight_bits=2, act_bits=4)
    lowbit.train(student, data.digits(), data.digits(train=False), epochs=1, batch_size=64,
                 out=tmp_path / "s.pt", progress=False)
    before = (tmp_path / "s.pt").read_bytes()
    cmd = [sys.executable, str(EXAMPLES / "reestimate_bn.py"), str(tmp_path / "s.pt"),
           "--data", "digits", "--batches", "3", "-o", str(tmp_path / "bn.pt")]
    res = run(cmd, tmp_path)
    got = re.search(r"accuracy (\S+)% -> (\S+)% with BatchNorm statistics re-estimated over 3 "
                    r"training batches", res.stdout)
    ckpt = torch.load(tmp_path / "bn.pt", weights_only=True)
    info = ckpt["record"]["bn_reestimated"]
    assert got and info["batches"] == 3 and "resume" not in ckpt
    assert f"{100 * info['val_acc_before']:.2f}" == got[1]
    assert f"{100 * info['val_acc']:.2f}" == got[2] == f"{100 * ckpt['record']['val_acc']:.2f}"
    assert (tmp_path / "s.pt").read_bytes() == before
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
