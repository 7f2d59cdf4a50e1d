"""Nothing lost, nothing broken passed as good (issue 13): through the CLI where users hit it.

Outputs never replace inputs, links or devices; finished runs need --overwrite; interrupted
writes leave no temp files; --resume refuses changed settings; the gate fails non-finite
outputs; crafted or wrong files give one-line errors; bugs show as bugs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from lowbit import _checkpoint, cli, data, models
from lowbit._io import atomic_write_all
from lowbit.cli import export_main, main
from lowbit.errors import (
    InputError,
    ModelError,
    OutputError,
    QuantizeError,
    TrainingError,
    UsageError,
)
from lowbit.export import Thresholds
from lowbit.export._build import build_onnx
from lowbit.export._verify import compare, locate
from lowbit.quant import act_quants, bake_integer_bias, quantize
from lowbit.runtime import Session
from tests.conftest import without_stages

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "digits_cnn", "--width", "4", "--data", "digits", "--batch-size", "64"]

RANDOM = ["--verify-data", "random"]  # verification data is not what these tests are about


def _one_line_error(capsys, prog: str = "lowbit") -> str:
    err = without_stages(capsys.readouterr().err).strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-W", "always", "-m", "lowbit.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "t.pt"
    assert main(["train", *TINY, "--epochs", "2", "--lr", "0.05", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher) -> Path:
    out = tmp_path_factory.mktemp("student") / "s.pt"
    assert main(["distill", "--teacher", str(teacher), "--data", "digits", "--epochs", "1",
                 "--batch-size", "64", "-o", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------ data loss


@pytest.mark.parametrize("fmt", ["onnx", "qonnx", "both"])
def test_export_never_overwrites_its_checkpoint(tmp_path, student, capsys, fmt):
    before = student.read_bytes()
    other_spelling = student.parent / "sub" / ".." / student.name
    (student.parent / "sub").mkdir(exist_ok=True)
    assert export_main([str(student), "--format", fmt, "-o", str(other_spelling), *RANDOM]) == 2
    assert "would overwrite the input" in _one_line_error(capsys, "lowbit-export")
    assert student.read_bytes() == before


def test_distill_never_overwrites_its_teacher(teacher, capsys):
    before = teacher.read_bytes()
    assert main(["distill", "--teacher", str(teacher), "--epochs", "1", "-o", str(teacher)]) == 2
    assert "would overwrite the input" in _one_line_error(capsys)
    assert teacher.read_bytes() == before


def test_train_over_a_finished_run_needs_overwrite(tmp_path, teacher, capsys):
    out = tmp_path / "t.pt"
    out.write_bytes(teacher.read_bytes())
    args = ["train", *TINY, "--epochs", "1", "--limit", "128", "-o", str(out)]
    assert main(args) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == teacher.read_bytes()
    assert main([*args, "--overwrite"]) == 0
    assert len(_checkpoint.load(out)["record"]["history"]) == 1


def test_qonnx_only_export_defaults_beside_the_checkpoint(tmp_path, student):
    src = tmp_path / "student.pt"
    src.write_bytes(student.read_bytes())
    assert export_main([str(src), "--format", "qonnx", *RANDOM]) == 0
    assert (tmp_path / "student.qonnx.onnx").is_file() and not (tmp_path / "student.onnx").exists()
    assert src.read_bytes() == student.read_bytes()


def test_output_link_or_device_is_refused(tmp_path, student, capsys):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"keep")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    assert export_main([str(student), "--format", "onnx", "-o", str(link), *RANDOM]) == 2
    assert "symbolic link" in _one_line_error(capsys, "lowbit-export")
    assert link.is_symlink() and target.read_bytes() == b"keep"
    assert export_main([str(student), "--format", "onnx", "-o", os.devnull, *RANDOM]) == 2
    assert "not a regular file" in _one_line_error(capsys, "lowbit-export")


def test_failed_pair_write_keeps_old_files_and_leaves_no_temp(tmp_path):
    a, b = tmp_path / "m.onnx", tmp_path / "m.qonnx.onnx"
    a.write_text("old a")
    b.write_text("old b")

    def interrupted(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_all({a: lambda tmp: tmp.write_text("new a"), b: interrupted})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.qonnx.onnx"]
    with pytest.raises(OutputError, match="symbolic link"):
        link = tmp_path / "l"
        link.symlink_to(a)
        atomic_write_all({link: lambda tmp: tmp.write_text("x")})


def test_interrupt_right_after_the_temp_is_created_leaves_no_temp(tmp_path, monkeypatch):
    """SIGTERM lands on any bytecode: here, between creating the temp file and writing it."""
    close = os.close

    def close_then_interrupt(fd: int) -> None:
        close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_all({tmp_path / "run.json": lambda tmp: tmp.write_text("{}")})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _killed_run(tmp_path: Path, *args: str) -> tuple[Path, subprocess.Popen]:
    """Start a long run that checkpoints every step; SIGTERM it once a checkpoint exists."""
    out = tmp_path / "run.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *args, "--checkpoint-every",
                             "1", "-o", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it be in the middle of some step or write
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return out, proc


def test_killed_run_leaves_no_temp_and_resume_refuses_changed_settings(tmp_path, capsys):
    def run(width: str = "4", limit: str = "256", lr: str = "0.1") -> list[str]:
        return ["train", "--arch", "digits_cnn", "--width", width, "--data", "digits",
                "--batch-size", "64", "--epochs", "3000", "--limit", limit, "--lr", lr]

    out, proc = _killed_run(tmp_path, *run())
    assert proc.returncode == 130, proc.stderr.read()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert "resume" in _checkpoint.load(out)
    for args, field in ((run(limit="128"), "data.examples"), (run(width="8"), "arch.kwargs"),
                        (run(lr="0.2"), "config.lr")):
        assert main([*args, "--checkpoint-every", "1", "-o", str(out), "--resume"]) == 2
        assert field in _one_line_error(capsys)


def test_resume_refuses_changed_bits(tmp_path, teacher, capsys):
    run = ["distill", "--teacher", str(teacher), "--data", "digits", "--bits", "2",
           "--epochs", "3000", "--limit", "256", "--batch-size", "64"]
    out, proc = _killed_run(tmp_path, *run)
    assert proc.returncode == 130
    assert main([*run[:5], "--bits", "4", *run[7:], "--checkpoint-every", "1", "-o", str(out),
                 "--resume"]) == 2
    assert "quant.weight_bits: 2 in the checkpoint, 4 now" in _one_line_error(capsys)


def test_checkpoint_without_new_fields_still_resumes(tmp_path, teacher):
    ckpt = _checkpoint.load(teacher)
    model = _checkpoint.build(ckpt)
    data = dict(ckpt["data"], examples=1797)
    old = dict(ckpt, data={k: v for k, v in ckpt["data"].items() if k != "examples"})
    _checkpoint.check_resume(teacher, old, model, data, {"kind": "train"})  # no error
    with pytest.raises(TrainingError, match="data.examples"):
        _checkpoint.check_resume(teacher, dict(ckpt, data=dict(data, examples=5)), model, data,
                                 {})


# -------------------------------------------------------------------- broken passed as good


def _batchnorms_and_next_quantizer(model: nn.Module) -> list[tuple[nn.BatchNorm2d, str]]:
    """Each BatchNorm of a graph-mode student with the first activation quantizer after it."""
    acts = {a.name for a in act_quants(model)}
    found = []
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            node = next(n for n in model.graph.nodes if n.target == name)
            while node.target not in acts:
                node = next(iter(node.users))
            found.append((bn, node.target))
    return found


def test_gate_fails_nan_batchnorm_and_writes_nothing(tmp_path, student, capsys):
    model, ckpt = _checkpoint.load_model(student)
    bn, after = _batchnorms_and_next_quantizer(model)[0]
    bn.running_var[0] = float("nan")
    bad = _checkpoint.save(tmp_path / "bad.pt", model, data=ckpt["data"], record={})
    assert export_main([str(bad), "--format", "onnx", "-o", str(tmp_path / "bad.onnx"),
                        *RANDOM]) == 2
    line = _one_line_error(capsys, "lowbit-export")
    assert "FAILED" in line and "non-finite" in line
    # and where: the quantizer after the NaN channel, the whole channel (1 of 16 here)
    assert f"first difference at quantizer {after}: " in line, line
    assert line.endswith(" non-finite in the student")
    assert not (tmp_path / "bad.onnx").exists()


def test_locate_names_where_a_wrong_graph_departs_and_calls_ties_ties(student):
    model = _checkpoint.load_model(student)[0]
    baked = bake_integer_bias(model)
    x = next(iter(data.load("digits", train=False).loader(128)))[0]
    built = build_onnx(baked, x[:1])
    # the file is the student: any first difference is a float rounding tie
    where = locate(baked, built.proto, built.acts, built.codes, x)
    assert where == "" or re.search(r": (\d+) of \d+ codes, off by up to 1, \1 at a rounding "
                                    r"tie$", where), where
    bn, after = _batchnorms_and_next_quantizer(baked)[1]
    with torch.no_grad():
        bn.running_mean += 3 * bn.running_var.sqrt()  # now the file computes another network
    where = locate(baked, built.proto, built.acts, built.codes, x)
    found = re.fullmatch(rf"first difference at quantizer {re.escape(after)}: (\d+) of \d+ "
                         r"codes, off by up to (\d+), (\d+) at a rounding tie", where)
    assert found, where
    assert int(found[2]) > 1 and int(found[3]) < int(found[1]) / 10


def test_gate_all_nan_rows_do_not_agree():
    student = nn.Linear(3, 4)
    x = torch.randn(8, 3)
    nan = compare("onnx", "given", student, lambda a: np.full((len(a), 4), np.nan, np.float32),
                  x, np.full(4, float("nan")), Thresholds(), progress=False)
    assert not nan.passed and nan.nonfinite == 8 and "non-finite" in str(nan)
    same = compare("onnx", "given", student, lambda a: student(torch.from_numpy(a)).detach()
                   .numpy(), x, np.ones(4), Thresholds(), progress=False)
    assert same.passed


def test_gate_bounds_the_median_input_and_reports_the_largest():
    """A flipped code at a near-tie moves some inputs' logits by many output steps, a wrong
    graph moves every input's: the logit bound is gated on the median input."""
    student = nn.Linear(3, 4)
    x = torch.randn(8, 3)

    def shifted(rows: int, steps: float):  # every logit of the first ``rows`` inputs
        def run(a: np.ndarray) -> np.ndarray:
            out = student(torch.from_numpy(a)).detach().numpy()
            out[:rows] += steps
            return out
        return run

    few = compare("onnx", "given", student, shifted(3, 10.0), x, np.ones(4), Thresholds(),
                  progress=False)
    assert few.passed and few.agreement == 1.0
    assert few.max_steps == pytest.approx(10.0) and few.median_steps < 1e-5
    assert "10.00 output steps; median input 0.00" in str(few)
    most = compare("onnx", "given", student, shifted(5, 10.0), x, np.ones(4), Thresholds(),
                   progress=False)
    assert not most.passed and most.median_steps == pytest.approx(10.0)


def test_gate_counts_a_flip_at_a_near_tie_as_agreeing():
    """A file that swaps the student's top two classes on one input of eight agrees at a
    near-tie (the student's margin within the logit bound), and disagrees beyond it."""
    student = nn.Linear(3, 4)
    x = torch.randn(8, 3)
    ref = student(x).detach().numpy()
    top2 = np.argsort(ref[0])[-2:]
    margin = float(ref[0, top2[1]] - ref[0, top2[0]])

    def swapped(a: np.ndarray) -> np.ndarray:
        out = student(torch.from_numpy(a)).detach().numpy()
        out[0, top2] = out[0, top2[::-1]]
        return out

    for step, tie in [(margin / 3, True), (margin / 5, False)]:  # the bound: 4 steps
        check = compare("onnx", "given", student, swapped, x, np.full(4, step), Thresholds(),
                        progress=False)
        assert check.agreement == 7 / 8 and check.near_ties == int(tie)
        assert check.passed == tie and ("near-ties" in str(check)) == tie


def test_session_refuses_non_finite_input(tmp_path, student):
    out = tmp_path / "m.onnx"
    assert export_main([str(student), "--format", "onnx", "-o", str(out), *RANDOM]) == 0
    session = Session(out)
    images = np.full((2, *session.info.input_shape), np.nan, np.float32)
    with pytest.raises(InputError, match="NaN or inf"):
        session.run(images)
    assert Session(out, allow_nonfinite=True).run(images).shape == (2, 10)


def test_quantize_refuses_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(QuantizeError, match="track_running_stats"):
        quantize(model, weight_bits=2)


def test_quiet_prints_only_the_result_and_no_bar_off_a_terminal(tmp_path, student, capsys):
    out = tmp_path / "t.pt"
    assert main(["train", *TINY, "--epochs", "2", "--limit", "256", "-o", str(out)]) == 0
    loud = capsys.readouterr()
    assert "epoch=1" in loud.out + loud.err and "%|" not in loud.err  # lines, but no bar
    assert main(["train", *TINY, "--epochs", "2", "--limit", "256", "-o", str(out),
                 "--overwrite", "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and len(quiet.out.splitlines()) == 1 and "test accuracy" in quiet.out
    assert export_main([str(student), "--format", "onnx", "-o", str(tmp_path / "m.onnx"),
                        "-q", *RANDOM]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out.splitlines() == [
        line for line in quiet.out.splitlines() if line.startswith("onnx: ")] and quiet.out


# ------------------------------------------------------------------ one line, not a traceback


def _crafted(tmp_path: Path, teacher: Path, name: str, edit) -> Path:
    ckpt = _checkpoint.load(teacher)
    edit(ckpt)
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name,edit,words", [
    ("kwargs.pt", lambda c: c["arch"]["kwargs"].update(bogus=1), "cannot build"),
    ("arch_str.pt", lambda c: c.update(arch="digits_cnn"), "'arch' must be"),
    ("no_shape.pt", lambda c: c["data"].pop("input_shape"), "input_shape"),
    ("huge.pt", lambda c: c["arch"]["kwargs"].update(width=10**6), "does not fit"),
    ("unknown.pt", lambda c: c["arch"].update(name="nope"), "cannot build"),
    ("resume.pt", lambda c: c.update(resume={"step": "3"}), "'resume' must be"),
])
def test_crafted_checkpoints_give_one_line(tmp_path, teacher, capsys, name, edit, words):
    path = _crafted(tmp_path, teacher, name, edit)
    assert main(["eval", str(path)]) == 2
    assert words in _one_line_error(capsys)
    assert export_main([str(path), *RANDOM]) == 2
    assert words in _one_line_error(capsys, "lowbit-export")


def test_wrong_files_give_one_line(tmp_path, student, capsys):
    empty = tmp_path / "empty.pt"
    empty.touch()
    assert main(["eval", str(empty)]) == 2
    assert "empty file" in _one_line_error(capsys)
    onnx_file = tmp_path / "m.onnx"
    assert export_main([str(student), "--format", "onnx", "-o", str(onnx_file), *RANDOM]) == 0
    capsys.readouterr()
    assert main(["eval", str(onnx_file)]) == 2
    assert "lowbit run" in _one_line_error(capsys)
    assert export_main([str(onnx_file), *RANDOM]) == 2
    assert "not a lowbit checkpoint" in _one_line_error(capsys, "lowbit-export")
    assert main(["run", str(student), "--data", "digits"]) == 2
    assert "PyTorch checkpoint" in _one_line_error(capsys)


@pytest.mark.parametrize("argv", [
    ["train", "--width", "0", "-o", "x.pt"],
    ["train", "--limit", "-1", "-o", "x.pt"],
    ["train", "--warmup", "-1", "-o", "x.pt"],
    ["export", "s.pt", "--limit", "-5"],
    ["export", "s.pt", "--calib", "-1"],
    ["run", "m.onnx", "--data", "digits", "--limit", "-1"],
])
def test_negative_counts_are_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "expected an integer >= " in err or "expected a number >= 0" in err, err


def test_a_bug_is_shown_as_a_bug(capsys):
    parser = argparse.ArgumentParser(prog="lowbit")

    def buggy(_: argparse.Namespace) -> None:
        raise ValueError("an internal invariant broke")  # not a LowbitError: a bug

    parser.set_defaults(func=buggy)
    assert cli._base.run(parser, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "please" in err and "report" in err


# -------------------------------------------------- files that load where the README says


def test_floor_is_pyprojects_and_newer_files_say_how_to_export(tmp_path):
    from lowbit.runtime._session import MIN_ORT_DEFAULT_EXPORT

    assert f'"onnxruntime>={MIN_ORT_DEFAULT_EXPORT}"' in (ROOT / "pyproject.toml").read_text()
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 2, 2])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 1, 2, 2])
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["input"], ["logits"])], "g", [x], [y]))
    model.ir_version = 99  # a file from a runtime newer than this one
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(ModelError, match=r"needs onnxruntime >= .*--opset 21"):
        Session(tmp_path / "future.onnx")


def test_qonnx_file_runs_in_qonnx_without_patching(tmp_path, student):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.inference_cost import inference_cost

    ir, filters = onnx.IR_VERSION, list(warnings.filters)
    out = tmp_path / "m.onnx"
    assert export_main([str(student), "-o", str(out), *RANDOM]) == 0
    assert onnx.IR_VERSION == ir and warnings.filters == filters  # no global state changed
    qmodel = ModelWrapper(str(tmp_path / "m.qonnx.onnx"))
    iname = qmodel.graph.input[0].name
    x = np.random.default_rng(0).standard_normal(qmodel.get_tensor_shape(iname), np.float32)
    got = execute_onnx(qmodel, {iname: x})[qmodel.graph.output[0].name]
    model, _ = _checkpoint.load_model(student)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    cost = inference_cost(str(tmp_path / "m.qonnx.onnx"), output_json=None, output_onnx=None)
    assert cost["total_cost"]["total_macs"] > 0


def test_export_says_nothing_that_is_not_the_users_business(tmp_path, student):
    res = _cli("export", str(student), "-o", str(tmp_path / "m.onnx"), *RANDOM)
    assert res.returncode == 0, res.stderr
    for chatter in ("onnx optimizer", "fast_hadamard_transform", "Warning", "warn"):
        assert chatter not in res.stderr, res.stderr


def test_models_registry_is_untouched_by_crafted_checkpoints(tmp_path, teacher):
    before = models.list()
    path = _crafted(tmp_path, teacher, "x.pt", lambda c: c["arch"].update(name="os.system"))
    with pytest.raises(ValueError, match="cannot build"):
        _checkpoint.load_model(path)
    assert models.list() == before


def test_gate_caps_the_near_tie_allowance():
    """Flipping the top two classes on a quarter of the inputs, every flip within the logit
    bound, is no near-tie rounding: the allowance excuses at most 1% of the inputs."""
    student = nn.Linear(3, 4)
    x = torch.randn(400, 3)
    ref = student(x).detach().numpy()
    top2 = np.argsort(ref, 1)[:, -2:]
    step = np.full(4, float(np.abs(ref).max()))  # every margin is within one output step

    def swap(rows: int):
        def run(a: np.ndarray) -> np.ndarray:
            out = student(torch.from_numpy(a)).detach().numpy()
            r = np.arange(rows)[:, None]
            out[r, top2[:rows]] = out[r, top2[:rows, ::-1]]
            return out
        return run

    flat = compare("onnx-int", "given", student, swap(100), x, step, Thresholds(),
                   batch_size=400, progress=False)
    assert flat.agreement == 0.75 and flat.near_ties == 100 and flat.ties_counted == 4
    assert not flat.passed and "4 counted as agreeing (the cap)" in str(flat)
    few = compare("onnx-int", "given", student, swap(3), x, step, Thresholds(), batch_size=400,
                  progress=False)
    assert few.passed and few.near_ties == few.ties_counted == 3
    assert compare("onnx-int", "given", student, swap(100), x, step,
                   Thresholds(max_near_ties=0.25), batch_size=400, progress=False).passed
    with pytest.raises(UsageError, match="max_near_ties"):
        Thresholds(max_near_ties=1.5)


# ------------------------------------------- outputs: checked first, OS refusals, pairs, locks

RELAXED = ["--max-steps", "1000"]  # the gate is not what these tests are about


def _immutable(path: Path) -> None:
    """``chattr +i``: not even root may replace or create files there; skip where unsupported."""
    res = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True) \
        if shutil.which("chattr") else None
    if res is None or res.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({res.stderr.strip() if res else ''})")


def _mutable(path: Path) -> None:
    subprocess.run(["chattr", "-i", str(path)], check=False)


def _no_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old", ".lock"))]


def test_pair_commit_puts_the_first_file_back_when_the_second_cannot_be_replaced(tmp_path):
    a, b = tmp_path / "m.onnx", tmp_path / "m.qonnx.onnx"
    a.write_text("old a")
    b.write_text("old b")

    def second(tmp: Path) -> None:  # meanwhile the second target becomes unreplaceable
        tmp.write_text("new b")
        b.unlink()
        b.mkdir()
        (b / "keep").touch()

    with pytest.raises(OutputError, match=r"m\.qonnx\.onnx: cannot write it: .*\[EISDIR\]"):
        atomic_write_all({a: lambda tmp: tmp.write_text("new a"), b: second})
    assert a.read_text() == "old a" and b.is_dir()
    assert _no_temps(tmp_path) == []
    c = tmp_path / "new.onnx"  # a first file that did not exist before is removed again
    with pytest.raises(OutputError):
        atomic_write_all({c: lambda tmp: tmp.write_text("c"), b.with_name("x"): second})
    assert not c.exists() and _no_temps(tmp_path) == []


def test_export_pair_is_all_or_nothing_with_an_immutable_qonnx_target(tmp_path, student, capsys):
    out, qout = tmp_path / "m.onnx", tmp_path / "m.qonnx.onnx"
    out.write_bytes(b"old onnx")
    qout.write_bytes(b"old qonnx")
    _immutable(qout)
    try:
        assert export_main([str(student), "-o", str(out), *RELAXED, *RANDOM]) == 2
    finally:
        _mutable(qout)
    line = _one_line_error(capsys, "lowbit-export")
    assert "m.qonnx.onnx: cannot write it" in line and "[EPERM]" in line
    assert (out.read_bytes(), qout.read_bytes()) == (b"old onnx", b"old qonnx")
    assert _no_temps(tmp_path) == []


@pytest.mark.parametrize("where,words", [
    ("missing/x.pt", "does not exist; expected an existing directory"),
    ("file/x.pt", "is not a directory"),
    ("dir", "is a directory"),
])
def test_outputs_are_checked_before_any_work(tmp_path, teacher, capsys, where, words):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dir").mkdir()
    out = str(tmp_path / where)
    start = time.monotonic()
    assert main(["train", *TINY, "--epochs", "1", "-o", out]) == 2
    assert words in _one_line_error(capsys)
    assert main(["distill", "--teacher", str(teacher), "--data", "digits", "-o", out]) == 2
    assert words in _one_line_error(capsys)
    assert export_main([str(teacher), "--bits", "2", "-o", out, "--data", "digits"]) == 2
    assert words in _one_line_error(capsys, "lowbit-export")
    assert main(["footprint", str(teacher), "--json", out]) == 2
    assert words in _one_line_error(capsys)
    assert time.monotonic() - start < 20  # refused up front, not after an epoch
    assert not (tmp_path / "missing").exists()


def test_read_only_directory_is_refused_before_the_first_epoch(tmp_path, teacher, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    _immutable(ro)
    try:
        for argv in (["train", *TINY, "--epochs", "1", "-o", str(ro / "t.pt")],
                     ["distill", "--teacher", str(teacher), "--data", "digits",
                      "-o", str(ro / "s.pt")],
                     ["footprint", str(teacher), "--json", str(ro / "f.json")],
                     ["convert-ort", str(ROOT / "pyproject.toml"), "-o", str(ro / "m.ort")]):
            assert main(argv) == 2
            assert "cannot write into" in _one_line_error(capsys)
        assert export_main([str(teacher), "--bits", "2", "-o", str(ro / "m.onnx"),
                            "--data", "digits"]) == 2
        assert "cannot write into" in _one_line_error(capsys, "lowbit-export")
    finally:
        _mutable(ro)
    assert list(ro.iterdir()) == []


def _plain_cli(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it; ``fsize``: under that file-size limit (RLIMIT_FSIZE), where
    a write past it fails with EFBIG as on a full disk."""
    import resource

    def limit_files() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT, preexec_fn=limit_files)


def test_a_full_disk_under_export_is_one_line_and_leaves_nothing(tmp_path, student):
    disk = tmp_path / "small"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)],
                         capture_output=True, text=True) if shutil.which("mount") else None
    if res is None or res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() if res else ''})")
    try:
        res = _plain_cli("export", str(student), "-o", str(disk / "m.onnx"), *RELAXED, *RANDOM)
        lines = without_stages(res.stderr).strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "No space left on device [ENOSPC]; free some space" in lines[0]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no RLIMIT_FSIZE on this platform")
def test_a_file_size_limit_under_training_is_one_line_and_leaves_nothing(tmp_path):
    res = _plain_cli("train", *TINY, "--epochs", "1", "--limit", "128", "-o",
                     str(tmp_path / "t.pt"), fsize=4096)
    lines = without_stages(res.stderr).strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "t.pt: cannot write it: File too large [EFBIG]" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("after", [0.3, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_130(tmp_path, student, after):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "export", str(student), "-o",
                             str(tmp_path / "m.onnx"), *RELAXED, *RANDOM], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the export finished before the signal")
    assert proc.returncode == 130, err
    assert without_stages(err).strip().splitlines() == ["lowbit: interrupted"], err
    assert _no_temps(tmp_path) == []


def test_a_second_writer_of_the_same_output_is_refused(tmp_path, teacher, capsys):
    out = tmp_path / "s.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "distill", "--teacher",
                              str(teacher), "--data", "digits", "--epochs", "3000", "--limit",
                              "128", "--batch-size", "64", "-o", str(out)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".s.pt.lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert main(["distill", "--teacher", str(teacher), "--data", "digits", "--epochs", "1",
                     "-o", str(out), "--overwrite"]) == 2
        line = _one_line_error(capsys)
        assert f"another lowbit process (pid {first.pid}) is writing it" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert first.returncode == 130 and _no_temps(tmp_path) == []


# ----------------------------------------------------------- file integrity, versions, inputs


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student) -> Path:
    out = tmp_path_factory.mktemp("exported") / "m.onnx"
    assert export_main([str(student), "--format", "onnx", "-o", str(out), *RELAXED, "-q",
                        *RANDOM]) == 0
    return out


def _edited(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, dst)
    return dst


def _flip_one_trit(proto: onnx.ModelProto) -> None:
    """Add 1 to the lowest trit of the first packed byte where that does not carry."""
    packed = next(t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8
                  and t.name != "trits_table")
    raw = bytearray(packed.raw_data)
    i = next(i for i, b in enumerate(raw) if b % 3 < 2 and b + 1 < 243)
    raw[i] += 1
    packed.raw_data = bytes(raw)


def test_one_flipped_trit_is_refused_everywhere_unless_allowed(tmp_path, exported, capsys):
    bad = _edited(exported, tmp_path / "bad.onnx", _flip_one_trit)
    with pytest.raises(ModelError, match=r"bad\.onnx: its weights differ from what lowbit "
                                         r"\S+ exported \(SHA-256 digest mismatch\)"):
        Session(bad)
    x = np.random.default_rng(0).integers(0, 256, (64, 1, 8, 8), dtype=np.uint8)
    changed = np.abs(Session(bad, allow_modified=True).run(x) - Session(exported).run(x)).max()
    assert changed > 0  # the edit is real, and only the digest notices it
    for argv in (["run", str(bad), "--data", "digits"], ["bench", str(bad), "--batch-size", "1"],
                 ["footprint", str(bad)], ["convert-ort", str(bad)]):
        assert main(argv) == 2
        assert "digest mismatch" in _one_line_error(capsys)
    assert not (tmp_path / "bad.ort").exists()
    assert main(["run", str(bad), "--data", "digits", "--allow-modified", "--limit", "8"]) == 0
    assert main(["convert-ort", str(bad), "--allow-modified"]) == 0
    capsys.readouterr()
    renamed = _edited(exported, tmp_path / "graph.onnx",
                      lambda p: setattr(p.graph.node[0], "name", "edited"))
    with pytest.raises(ModelError, match="its graph differ"):
        Session(renamed)


def test_digests_cover_what_the_exporter_wrote(exported):
    from lowbit import _integrity
    from lowbit import _onnx_meta as meta

    props = Session(exported).info.metadata
    assert json.loads(props[meta.DIGEST]) == _integrity.digests(exported.read_bytes())
    assert json.loads(props[meta.FORMAT]) == meta.FORMAT_VERSION
    # the same bytes through onnx's own parser and serializer: still the same digests
    again = onnx.load(str(exported)).SerializeToString()
    assert _integrity.digests(again) == _integrity.digests(exported.read_bytes())


def test_gate_fails_a_file_whose_integer_kernels_are_perturbed(student):
    model = _checkpoint.load_model(student)[0]
    baked = bake_integer_bias(model)
    x = next(iter(data.load("digits", train=False).loader(359)))[0]
    built = build_onnx(baked, x[:1])
    packed = next(t for t in built.proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8
                  and t.name != "trits_table")
    packed.raw_data = bytes(242 - b if b < 243 else b for b in packed.raw_data)  # -w
    from lowbit.export._prepare import onnx_runner

    check = compare("onnx-int", "digits", model, onnx_runner(built.proto, "all"), x,
                    built.step, Thresholds(), progress=False)
    assert not check.passed and check.agreement < 0.9


def _with_meta(src: Path, dst: Path, **props: str) -> Path:
    def edit(proto: onnx.ModelProto) -> None:
        kept = {p.key: p.value for p in proto.metadata_props}
        kept.update({f"lowbit.{k}": v for k, v in props.items()})
        onnx.helper.set_model_props(proto, {k: v for k, v in kept.items() if v != "DROP"})
    return _edited(src, dst, edit)


def test_newer_file_or_checkpoint_is_refused_naming_both_versions(tmp_path, exported, teacher,
                                                                  capsys):
    newer = _with_meta(exported, tmp_path / "new.onnx", format="2", version="9.0.0")
    assert main(["run", str(newer), "--data", "digits"]) == 2
    line = _one_line_error(capsys)
    assert "written by lowbit 9.0.0 in file format 2; this lowbit 0.1.0 reads format 1" in line
    older = _with_meta(exported, tmp_path / "old.onnx", format="DROP", digest="DROP")
    assert Session(older).info.weight_bits == 2  # files from before formats and digests load
    ckpt = _checkpoint.load(teacher)
    torch.save(dict(ckpt, version=2, lowbit="9.0.0"), tmp_path / "new.pt")
    assert main(["eval", str(tmp_path / "new.pt")]) == 2
    assert ("checkpoint version 2, written by lowbit 9.0.0; this lowbit 0.1.0 reads version 1"
            in _one_line_error(capsys))
    old = {k: v for k, v in ckpt.items() if k != "lowbit"}
    torch.save(old, tmp_path / "old.pt")
    assert main(["eval", str(tmp_path / "old.pt"), "--data", "digits", "-q"]) == 0


@pytest.mark.parametrize("props,words", [
    ({"std": "[0]"}, "std > 0"),
    ({"mean": "[NaN]"}, "finite per-channel values"),
    ({"input_shape": '{"c": 1}'}, "lowbit.input_shape must be a list of 1 to 4 positive"),
    ({"weight_bits": '"two"'}, "lowbit.weight_bits must be an integer bit width"),
    ({"classes": "[]"}, "non-empty list of class names"),
])
def test_crafted_metadata_is_refused_in_one_line(tmp_path, exported, capsys, props, words):
    crafted = _with_meta(exported, tmp_path / "c.onnx", **props)
    assert main(["run", str(crafted), "--data", "digits"]) == 2
    assert words in _one_line_error(capsys)


def test_a_non_image_model_runs_and_benches(tmp_path, capsys):
    from lowbit.export import export

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, 0] > 0).long()
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    student = quantize(net, weight_bits=4).eval()
    export(student, tmp_path / "mlp.onnx", example_input=x[:1], formats=("onnx",),
           verify=x, progress=False)
    np.savez(tmp_path / "mlp.npz", images=x.numpy(), labels=y.numpy())
    assert main(["run", str(tmp_path / "mlp.onnx"), "--data", str(tmp_path / "mlp.npz")]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
    assert main(["bench", str(tmp_path / "mlp.onnx"), "--batch-size", "1", "4", "--repeat", "2",
                 "--min-time", "0"]) == 0
    session = Session(tmp_path / "mlp.onnx")
    assert session.run(x[0].numpy()).shape == (1, 2) and "[N, 20]" in repr(session)
    with pytest.raises(InputError, match=r"expected inputs \[N, 20\]"):
        session.run(np.zeros((2, 21), np.float32))


def test_evaluate_refuses_float_or_one_hot_labels(exported):
    session = Session(exported)
    images = np.zeros((4, 1, 8, 8), np.uint8)
    for labels in (np.zeros(4, np.float32), np.eye(4, 10, dtype=np.int64)):
        with pytest.raises(InputError, match="expected labels as integer class indices"):
            session.evaluate((images, labels))
    assert 0.0 <= session.evaluate((images, np.zeros(4, np.int64))) <= 1.0


def test_a_model_that_flattens_with_view_trains_distills_and_evaluates(tmp_path, capsys):
    arch = ["--arch", "tests.user_models:view_net"]
    teacher = tmp_path / "t.pt"
    assert main(["train", *arch, "--data", "digits", "--epochs", "1", "--batch-size", "64",
                 "--limit", "256", "-o", str(teacher), "-q"]) == 0
    assert main(["distill", "--teacher", str(teacher), *arch, "--data", "digits", "--epochs",
                 "1", "--batch-size", "64", "--limit", "256", "-o", str(tmp_path / "s.pt"),
                 "-q"]) == 0
    assert main(["eval", str(tmp_path / "s.pt"), *arch, "--data", "digits", "-q"]) == 0
    assert "top-1 accuracy" in capsys.readouterr().out
