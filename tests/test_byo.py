"""Bring your own data and models: a user CNN through train -> distill -> export -> run from
the command line (.npz) and from Python (TensorDataset), a float Conv1d model from a
DataLoader, checkpoints that never import code the user did not name, post-training
quantization that shows its cost, one set of defaults, reproducible runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lowbit
from lowbit import _checkpoint, cli, data, models
from lowbit.errors import CheckpointError
from tests.user_models import SignalNet, SmallCNN, WidthNet

ROOT = Path(__file__).resolve().parents[1]
ARCH = "tests.user_models:small_cnn"


def _cli(*args: str, cwd: Path, export: bool = False) -> subprocess.CompletedProcess:
    """``lowbit ARGS`` (or ``lowbit-export ARGS``) in a fresh process, with the tests importable."""
    entry = "export_main" if export else "main"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"import sys; from lowbit.cli import {entry}; sys.exit({entry}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("npz")
    paths = []
    for split, ds in (("train", data.digits()), ("test", data.digits(train=False))):
        paths.append(folder / f"{split}.npz")
        np.savez(paths[-1], images=ds.images.numpy(), labels=ds.labels.numpy())
    return paths[0], paths[1]


def _percent(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, text
    return float(match.group(1)) / 100


def test_user_cnn_command_line_on_npz(digits_npz, tmp_path):
    train_npz, test_npz = (str(p) for p in digits_npz)
    r = _cli("train", "--arch", ARCH, "--arch-kwargs", '{"width": 8}', "--data", train_npz,
             "--epochs", "10", "--batch-size", "64", "--lr", "0.1", "-o", "t.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # one file: validation is held out of it, and the report says so (not "test accuracy")
    assert "validation (143 held out of train file, seed 0) accuracy" in r.stdout
    assert "test accuracy" not in r.stdout
    assert torch.load(tmp_path / "t.pt", weights_only=True)["arch"] == {
        "name": ARCH, "kwargs": {"width": 8}}
    r = _cli("distill", "--teacher", "t.pt", "--arch", ARCH, "--data", train_npz, "--val-data",
             test_npz, "--epochs", "3", "--batch-size", "64", "--lam", "0.7", "-o", "s.pt",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    student_acc = _percent(r"accuracy (\d+\.\d+)%", r.stdout)
    assert student_acc > 0.8
    r = _cli("s.pt", "--arch", ARCH, "--verify-data", test_npz, "--format", "onnx", "-o",
             "s.onnx", cwd=tmp_path, export=True)
    assert r.returncode == 0, r.stderr
    r = _cli("run", "s.onnx", "--data", test_npz, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the file computes what the student computes: at most one of 359 digits differs
    assert abs(_percent(r"accuracy (\d+\.\d+)%", r.stdout) - student_acc) <= 1 / 359 + 1e-9
    # the student checkpoint names user code: without --arch nothing is imported or built
    r = _cli("eval", "s.pt", "--data", test_npz, cwd=tmp_path)
    assert r.returncode == 2 and f"names user code '{ARCH}'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_user_cnn_python_tensor_dataset(tmp_path):
    train, test = data.digits(), data.digits(train=False)
    train_ds, test_ds = (TensorDataset(d.images, d.labels) for d in (train, test))
    teacher = models.create(ARCH, seed=0)
    teacher, record = lowbit.train(teacher, train_ds, test_ds, epochs=10, batch_size=64,
                                   lr=0.1, progress=False)
    assert record["val_split"] == "TensorDataset validation" and record["val_acc"] > 0.8
    path = lowbit.save(teacher, tmp_path / "t.pt", data=train_ds)
    with pytest.raises(CheckpointError, match=f"names user code '{ARCH}'"):
        lowbit.load(path)
    x = torch.randn(4, 1, 8, 8)  # (the trained model is channels-last: same math, other order)
    assert torch.allclose(lowbit.load(path, allow=[ARCH])(x), teacher(x), atol=1e-5)
    assert torch.allclose(lowbit.load(path, model=SmallCNN())(x), teacher(x), atol=1e-5)
    student = lowbit.quantize(teacher, weight_bits=2, act_bits=4)
    student, record = lowbit.distill(student, teacher, train_ds, test_ds, epochs=3,
                                     batch_size=64, lam=0.7, progress=False)
    reloaded = lowbit.load(lowbit.save(student, tmp_path / "s.pt", data=train_ds), allow=[ARCH])
    assert torch.allclose(reloaded(x), student.eval()(x), atol=1e-5)
    lowbit.export(student, tmp_path / "s.onnx", formats=("onnx",), verify=test_ds,
                  data=train_ds)
    session = lowbit.Session(tmp_path / "s.onnx")  # uint8 pixels in, train statistics inside
    acc = session.evaluate((test.images.numpy(), test.labels.numpy()))
    assert abs(acc - record["val_acc"]) <= 1 / 359 + 1e-9
    assert session.evaluate(test_ds) == acc == session.evaluate(DataLoader(test_ds, 100))


def _signals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float sequences [n, 2, 32]: class k is a noisy sine of frequency k + 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    t = torch.linspace(0, 2 * torch.pi, 32)
    phase = torch.rand(n, 2, 1, generator=g) * 6.3
    x = torch.sin((y[:, None, None] + 1) * t + phase) + 0.3 * torch.randn(n, 2, 32, generator=g)
    return x, y


def test_float_conv1d_model_trains_from_a_dataloader(tmp_path):
    x, y = _signals(480, 0)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():  # a user's model, built the user's way, seeded here
        torch.manual_seed(0)
        model = SignalNet()
    _, record = lowbit.train(model, loader, _signals(150, 1), epochs=6, lr=0.1,
                             out=tmp_path / "sig.pt", progress=False)
    assert record["val_acc"] > 0.9 and len(record["history"]) == 6
    ckpt = torch.load(tmp_path / "sig.pt", weights_only=True)
    # float inputs are used as they are: no normalisation is recorded
    assert ckpt["data"]["input_shape"] == [2, 32] and ckpt["data"]["mean"] is None
    assert ckpt["arch"] == {"name": "tests.user_models:SignalNet", "kwargs": {}}  # defaults fit
    probe = torch.randn(3, 2, 32)
    assert torch.equal(lowbit.load(tmp_path / "sig.pt", model=SignalNet())(probe),
                       model.eval()(probe))
    assert lowbit.evaluate(model, _signals(150, 1)) == pytest.approx(record["val_acc"])


def test_checkpoint_naming_code_the_user_did_not_pass_is_refused(tmp_path):
    path = _checkpoint.save(tmp_path / "m.pt", models.create("digits_cnn", width=4),
                            data=data.digits(), record={})
    ckpt = torch.load(path, weights_only=True)
    ckpt["arch"] = {"name": "tests.never_imported:boom", "kwargs": {}}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="names user code 'tests.never_imported:boom'"):
        lowbit.load(path)
    assert "tests.never_imported" not in sys.modules
    r = _cli("eval", str(path), "--data", "digits", cwd=tmp_path)
    assert r.returncode == 2 and "pass --arch tests.never_imported:boom" in r.stderr
    r = _cli("eval", str(path), "--arch", ARCH, "--data", "digits", cwd=tmp_path)
    assert r.returncode == 2 and f"not {ARCH}" in r.stderr  # the name is checked, too
    r = _cli("distill", "--teacher", str(path), "--epochs", "1", "-o", "s.pt", cwd=tmp_path)
    assert r.returncode == 2 and "names user code 'tests.never_imported:boom'" in r.stderr


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> tuple[Path, float]:
    path = tmp_path_factory.mktemp("ptq") / "teacher.pt"
    _, record = lowbit.train(models.create("digits_cnn", seed=0), data.digits(),
                             data.digits(train=False), epochs=6, batch_size=64, lr=0.05,
                             out=path, progress=False)
    return path, record["val_acc"]


def test_ptq_prints_float_and_quantized_accuracy(digits_teacher, tmp_path):
    path, float_acc = digits_teacher
    r = _cli(str(path), "--bits", "2", "--calib-method", "mse", "--data", "digits",
             "--max-drop", "0", "--format", "onnx", "-o", "ptq.onnx", cwd=tmp_path, export=True)
    assert r.returncode == 0, r.stderr
    line = re.search(r"float (\d+\.\d+)%, quantized file (\d+\.\d+)%", r.stdout)
    assert line and float(line.group(1)) == pytest.approx(100 * float_acc, abs=0.006)
    quantized = lowbit.Session(tmp_path / "ptq.onnx").evaluate("digits")
    assert float(line.group(2)) == pytest.approx(100 * quantized, abs=0.006)
    assert "warning: post-training quantization costs" in r.stderr  # any drop exceeds 0
    assert "distil a student instead" in r.stderr
    r = _cli(str(path), "--bits", "2", "--calib", "0", "-o", "none.onnx", "--data", "digits",
             cwd=tmp_path, export=True)
    assert r.returncode == 2 and "--calib: expected an integer >= 1" in r.stderr
    assert not (tmp_path / "none.onnx").exists()


def test_calibration_methods_pick_ranges():
    from lowbit.quant._calibrate import choose_range

    values = torch.cat([torch.linspace(0, 1, 10_000), torch.tensor([50.0])])  # one outlier
    assert choose_range(values, 50.0, 15, "max") == 50.0
    assert choose_range(values, 50.0, 15, "percentile", 99.0) == pytest.approx(0.9896, abs=1e-3)
    # MSE: the range of least squared error, found over a grid, beats the other two picks
    def error(r: float) -> float:  # 4-bit unsigned fake-quantization, as the quantizer does
        s = r / 15
        return float(((values / s).round().clamp(0, 15) * s - values).pow(2).mean())

    mse = choose_range(values, 50.0, 15, "mse")
    assert mse < 50 and error(mse) < min(error(50.0), error(0.9896))


def test_calibrated_ranges_follow_the_method(digits_split):
    from lowbit.quant import calibrate
    from lowbit.quant._brevitas import act_ranges

    teacher = models.create("digits_cnn", width=4, seed=0)
    batches = [x for x, _ in digits_split[0].subset(256).loader(128)]
    ranges = {}
    for method in ("max", "percentile", "mse"):
        student = calibrate(lowbit.quantize(teacher, weight_bits=4), batches, method)
        ranges[method] = torch.stack([r.value.detach().reshape(()) for r in act_ranges(student)])
    assert (ranges["max"] > 0).all()
    assert (ranges["percentile"] <= ranges["max"]).all() and (ranges["mse"] <= ranges["max"]).all()
    assert not torch.equal(ranges["percentile"], ranges["max"])


def test_cli_defaults_are_the_config_dataclasses():
    """Unset options leave the library's configs as they are; --help shows their values."""
    from lowbit.cli import _export, _training
    from lowbit.distill import DISTILL_CONFIG, KDConfig, TrainConfig
    from lowbit.quant import PTQConfig

    p = cli.parser()
    train = p.parse_args(["train", "-o", "t.pt"])
    distill = p.parse_args(["distill", "--teacher", "t.pt", "-o", "s.pt"])
    assert _training._train_config(train, TrainConfig()) == TrainConfig()
    assert _training._train_config(distill, DISTILL_CONFIG) == DISTILL_CONFIG
    assert distill.bits is None and not any(getattr(distill, k) for k in _training._KD_OPTIONS)
    tuned = p.parse_args(["distill", "--teacher", "t.pt", "-o", "s.pt", "--lr", "0.5"])
    assert _training._train_config(tuned, DISTILL_CONFIG).lr == 0.5
    ptq = PTQConfig()
    helps = {name: sub.format_help() for name, sub in
             p._subparsers._group_actions[0].choices.items()}
    assert f"(default: {DISTILL_CONFIG.lr})" in helps["distill"]
    assert f"(default: {KDConfig().temperature})" in helps["distill"]
    assert f"(default: {ptq.max_drop})" in helps["export"]
    assert helps["export"] == _export.DESCRIPTION or "--calib-method" in helps["export"]


def test_seeded_create_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a, b = (models.create(ARCH, seed=3) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
    assert torch.equal(torch.get_rng_state(), before)


def test_shipped_checkpoints_by_name():
    model = models.create("resnet20", pretrained=True)
    assert model.lowbit_arch["name"] == "resnet20" and not model.training
    assert _checkpoint.load("resnet20_cifar10_ternary")["quant"]["weight_bits"] == 2
    assert "resnet20_cifar10_w4" in models.list_pretrained()


def test_quickstart_prints_the_same_numbers_twice(tmp_path):
    outputs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                           cwd=tmp_path / run, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
    assert "ternary student" in outputs[0] and outputs[0] == outputs[1]


def test_float_inputs_export_without_normalisation_metadata(tmp_path):
    import onnx

    train, test = data.digits(), data.digits(train=False)
    prepared = [((d.images.float() - 77.0) / 96.0, d.labels) for d in (train, test)]  # user-made
    model, _ = lowbit.train(models.create("digits_cnn", width=8, seed=0), prepared[0],
                            epochs=4, batch_size=64, lr=0.05, progress=False)
    result = lowbit.export(model, tmp_path / "f.onnx", bits=4, calib=prepared[0],
                           verify=prepared[1], data=prepared[0], formats=("onnx",),
                           ptq=lowbit.quant.PTQConfig(calib=128, max_drop=1.0))
    props = {p.key: p.value for p in onnx.load(tmp_path / "f.onnx").metadata_props}
    assert props["lowbit.mean"] == "null" and props["lowbit.std"] == "null"
    session = lowbit.Session(tmp_path / "f.onnx")  # takes the prepared floats as they are
    x, y = (t.numpy() for t in prepared[1])
    assert session.evaluate((x, y)) == pytest.approx(result.accuracy["onnx"])
    assert result.accuracy["float"] == pytest.approx(lowbit.evaluate(model, prepared[1]))
    with pytest.raises(lowbit.LowbitError, match="uint8 input needs normalisation"):
        session.run(test.images.numpy())


def _export_cli(capsys, *args: str) -> tuple[int, str]:
    """``lowbit-export ARGS`` in this process: (exit status, stderr)."""
    code = cli.export_main([*args, "--format", "onnx", "-q"])
    return code, capsys.readouterr().err


def test_python_journey_hands_over_to_the_command_line(tmp_path, capsys):
    train, test = data.digits(), data.digits(train=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher, _ = lowbit.train(SmallCNN(), train, epochs=2, batch_size=64, lr=0.1,
                                  progress=False)
    # a float model saved from Python: its class and defaults rebuild it
    t_path = lowbit.save(teacher, tmp_path / "t.pt", data=train)
    assert torch.load(t_path, weights_only=True)["arch"] == {
        "name": "tests.user_models:SmallCNN", "kwargs": {}}
    x = torch.randn(4, 1, 8, 8)  # (trained channels-last: same math, other order)
    assert torch.allclose(lowbit.load(t_path, allow=["tests.user_models:SmallCNN"])(x),
                          teacher.eval()(x), atol=1e-5)
    # the journey: load with model=, quantize, distill, save; then the command line
    teacher = lowbit.load(t_path, model=SmallCNN())
    student = lowbit.quantize(teacher, weight_bits=4, act_bits=4)
    student, _ = lowbit.distill(student, teacher, train, epochs=1, batch_size=64,
                                progress=False)
    s_path = lowbit.save(student, tmp_path / "s.pt", data=train)
    assert torch.load(s_path, weights_only=True)["arch"]["kwargs"] == {}
    code, err = _export_cli(capsys, str(s_path), "--arch", "tests.user_models:SmallCNN",
                            "--verify-data", "digits", "-o", str(tmp_path / "s.onnx"))
    assert code == 0, err
    assert lowbit.Session(tmp_path / "s.onnx").evaluate(test) > 0.5


def test_old_graph_module_checkpoint_takes_the_named_arch(tmp_path, capsys):
    student = lowbit.quantize(SmallCNN(), weight_bits=2, act_bits=4)
    del student.lowbit_arch  # as lowbit <= 0.1 saved a student of a plain module
    path = lowbit.save(student, tmp_path / "old.pt", data=data.digits())
    assert "GraphModuleImpl" in torch.load(path, weights_only=True)["arch"]["name"]
    code, err = _export_cli(capsys, str(path), "--verify-data", "random",
                            "-o", str(tmp_path / "old.onnx"))
    assert code == 2 and "cannot be imported by that name: pass --arch" in err
    code, err = _export_cli(capsys, str(path), "--arch", ARCH, "--verify-data", "random",
                            "-o", str(tmp_path / "old.onnx"))
    assert code == 0, err  # small_cnn's defaults fit the stored tensors: no --arch-kwargs


def test_arguments_lowbit_cannot_infer_are_asked_for_in_one_line(tmp_path, capsys):
    name = "tests.user_models:WidthNet"
    path = lowbit.save(WidthNet(4), tmp_path / "w.pt", data=data.digits())
    assert torch.load(path, weights_only=True)["arch"] == {"name": name, "kwargs": None}
    code = cli.main(["eval", str(path), "--arch", name, "--data", "digits"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pass --arch-kwargs" in err and "required: width" in err
    assert cli.main(["eval", str(path), "--arch", name, "--arch-kwargs", '{"width": 4}',
                     "--data", "digits"]) == 0
    # named once in Python, the checkpoint rebuilds with --arch alone
    named = lowbit.save(WidthNet(4), tmp_path / "n.pt", data=data.digits(), arch=name,
                        arch_kwargs={"width": 4})
    assert torch.load(named, weights_only=True)["arch"] == {"name": name,
                                                            "kwargs": {"width": 4}}
    assert lowbit.load(named, allow=[name]).conv.out_channels == 4
    with pytest.raises(lowbit.LowbitError, match=r"does not rebuild this model: it makes "
                       r"conv.weight \[8, 1, 3, 3\]"):
        lowbit.save(WidthNet(4), tmp_path / "x.pt", arch=name, arch_kwargs={"width": 8})
