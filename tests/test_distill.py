"""Knowledge distillation: losses, GSLR, schemes, exact resume, failures, DDP and the CLI.

Everything runs on scikit-learn's bundled 8x8 digits with a tiny CNN (width 4-8) and a
handful of SGD steps; students are real Brevitas ternary students from ``lowbit.quant``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lowbit import _checkpoint, cli, data, models
from lowbit.distill import (
    GSLR,
    KDConfig,
    TrainingError,
    apprentice_loss,
    distill,
    evaluate,
    hinton_loss,
    student_for,
    train,
)
from lowbit.distill._kd import _objective, fingerprint
from lowbit.quant import describe
from lowbit.quant._brevitas import IntegerBias

# --------------------------------------------------------------- hand-computed reference math

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # student logits, 2 examples x 3 classes
T_ = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]  # teacher logits
Y = [1, 2]


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _ce(rows, labels) -> float:  # mean -log p[y]
    return sum(-math.log(_softmax(r)[y]) for r, y in zip(rows, labels, strict=True)) / len(rows)


def _kl(t_rows, s_rows, temp) -> float:  # mean KL(softmax(t/T) || softmax(s/T))
    total = 0.0
    for t, s in zip(t_rows, s_rows, strict=True):
        pt, ps = _softmax(t, temp), _softmax(s, temp)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))
    return total / len(t_rows)


def _cross(t_rows, s_rows, temp) -> float:  # mean H(softmax(t/T), softmax(s/T))
    total = 0.0
    for t, s in zip(t_rows, s_rows, strict=True):
        pt, ps = _softmax(t, temp), _softmax(s, temp)
        total -= sum(a * math.log(b) for a, b in zip(pt, ps, strict=True))
    return total / len(t_rows)


def _tensors(requires_grad: bool = False):
    return (torch.tensor(S, dtype=torch.float64, requires_grad=requires_grad),
            torch.tensor(T_, dtype=torch.float64, requires_grad=requires_grad), torch.tensor(Y))


@pytest.mark.parametrize("lam,temp", [(0.0, 1.0), (0.3, 1.0), (0.7, 4.0), (1.0, 2.0)])
def test_hinton_loss_matches_hand_computation(lam, temp):
    s, t, y = _tensors()
    expected = (1 - lam) * _ce(S, Y) + lam * temp ** 2 * _kl(T_, S, temp)
    assert hinton_loss(s, t, y, lam=lam, temperature=temp).item() == pytest.approx(expected)
    if lam == 0.0:  # lam = 0 is plain cross-entropy
        assert hinton_loss(s, t, y, lam=0.0).item() == pytest.approx(F.cross_entropy(s, y).item())


def test_hinton_t_squared_keeps_soft_gradient_scale():
    # d/ds [T^2 KL(p_t^T || p_s^T)] = T (softmax(s/T) - softmax(t/T)) / batch: the T^2 factor
    # (Hinton et al. 2015) makes it ~(s - t) / batch for large T instead of shrinking as 1/T^2.
    for temp in (1.0, 4.0, 16.0):
        s, t, y = _tensors(requires_grad=True)
        hinton_loss(s, t, y, lam=1.0, temperature=temp).backward()
        expected = [[temp * (a - b) / 2
                     for a, b in zip(_softmax(sr, temp), _softmax(tr, temp), strict=True)]
                    for sr, tr in zip(S, T_, strict=True)]
        assert torch.allclose(s.grad, torch.tensor(expected, dtype=torch.float64))
    assert s.grad.abs().max() > 0.05  # at T = 16 the soft gradient has not vanished


def test_apprentice_loss_matches_hand_computation():
    s, t, y = _tensors()
    full = apprentice_loss(s, t, y, alpha=1.0, beta=0.5, gamma=0.5, temperature=2.0).item()
    assert full == pytest.approx(_ce(T_, Y) + 0.5 * _ce(S, Y) + 0.5 * 4 * _cross(T_, S, 2.0))
    # alpha = 0 drops the teacher's own cross-entropy: beta H(y, p_S) + gamma H(p_T, p_S) ...
    no_t = apprentice_loss(s, t, y, alpha=0.0, beta=0.5, gamma=0.5).item()
    assert no_t == pytest.approx(0.5 * _ce(S, Y) + 0.5 * _cross(T_, S, 1.0))
    # ... which is Hinton's loss with lam = 1/2 plus the (constant) teacher entropy / 2.
    entropy = sum(-sum(p * math.log(p) for p in _softmax(r)) for r in T_) / 2
    assert no_t == pytest.approx(hinton_loss(s, t, y, lam=0.5).item() + 0.5 * entropy)
    # and with gamma = 0 it is beta * CE(y, s).
    assert apprentice_loss(s, t, y, alpha=0.0, beta=1.0, gamma=0.0).item() == \
        pytest.approx(_ce(S, Y))


def test_teacher_grad_flag_detaches_only_the_soft_term():
    s, t, y = _tensors(requires_grad=True)
    apprentice_loss(s, t, y, alpha=0.7, gamma=0.5, teacher_grad=False).backward()
    onehot = F.one_hot(y, 3).double()
    assert torch.allclose(t.grad, 0.7 * (F.softmax(t.detach(), 1) - onehot) / 2)  # alpha term
    s, t, y = _tensors(requires_grad=True)
    hinton_loss(s, t, y, lam=0.5, teacher_grad=False).backward()
    assert t.grad is None
    hinton_loss(s, t, y, lam=0.5, teacher_grad=True).backward()
    assert t.grad.abs().sum() > 0


# ----------------------------------------------------------------------- GSLR and KDConfig


def test_gslr_linear_and_cosine_values():
    lin = GSLR(start_epoch=2, end_epoch=6, start_value=0.8, end_value=0.2)
    assert [lin.value(e, 0.5) for e in range(8)] == \
        pytest.approx([0.8, 0.8, 0.8, 0.65, 0.5, 0.35, 0.2, 0.2])
    cos = GSLR(2, 6, start_value=0.8, end_value=0.2, shape="cosine")
    p = (1 - math.cos(math.pi / 4)) / 2  # epoch 3 is a quarter of the way
    assert cos.value(3, 0.5) == pytest.approx(0.8 - 0.6 * p)
    assert [cos.value(e, 0.5) for e in (0, 2, 4, 6, 9)] == pytest.approx([0.8, 0.8, 0.5, 0.2, 0.2])
    # start_value=None starts from the config's soft weight; end_value defaults to 0.
    kd = KDConfig(lam=0.9, gslr=GSLR(0, 3))
    assert [kd.soft_weight(e) for e in range(4)] == pytest.approx([0.9, 0.6, 0.3, 0.0])
    app = KDConfig(loss="apprentice", gamma=2.0, gslr=GSLR(0, 2, end_value=1.0))
    assert [app.soft_weight(e) for e in range(3)] == pytest.approx([2.0, 1.5, 1.0])
    assert KDConfig(lam=0.25).soft_weight(7) == 0.25  # no GSLR: constant


@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "D"}, "scheme"), ({"loss": "fitnet"}, "loss"), ({"temperature": 0}, "temperature"),
    ({"lam": 1.5}, "lam"), ({"gamma": -1}, "gamma"), ({"teacher_grad": True}, "scheme 'A'"),
    ({"gslr": GSLR(0, 2, start_value=2.0)}, r"\[0, 1\]"),
    ({"teacher_precision": "fp16"}, "teacher_precision"),
    ({"scheme": "A", "teacher_precision": "bf16"}, "frozen teacher"),
])
def test_kdconfig_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDConfig(**kwargs)


def test_gslr_validates():
    with pytest.raises(ValueError, match="start_epoch < end_epoch"):
        GSLR(3, 3)
    with pytest.raises(ValueError, match="shape"):
        GSLR(0, 3, shape="step")
    with pytest.raises(ValueError, match="end_value"):
        GSLR(0, 3, end_value=float("nan"))
    assert KDConfig(gslr={"start_epoch": 0, "end_epoch": 2}).gslr == GSLR(0, 2)  # from a record


# ------------------------------------------------------------------------ training fixtures


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, digits_split):
    """A float digits teacher (~95% test accuracy after 4 quick epochs), as a checkpoint."""
    train_set = digits_split[0]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    train(models.create("digits_cnn", width=8), train_set, None, epochs=4, batch_size=64,
          lr=0.05, out=path, progress=False)
    return path


@pytest.fixture()
def teacher(teacher_ckpt):
    return _checkpoint.load_model(teacher_ckpt)[0]


@pytest.fixture(scope="module")
def small(digits_split):
    return digits_split[0].subset(128)  # batch 32: 4 steps per epoch


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------- schemes


def test_distill_records_and_learns(tmp_path, teacher_ckpt, teacher, digits_split):
    train_set, test_set = digits_split
    student = student_for("C", teacher, weight_bits=2, act_bits=4)
    out = tmp_path / "s.pt"
    _, record = distill(student, teacher_ckpt, train_set.subset(384), test_set, scheme="C",
                        temperature=4.0, lam=0.9, gslr=GSLR(0, 2), epochs=2, batch_size=64,
                        lr=0.02, out=out, progress=False)
    assert [h["soft_weight"] for h in record["history"]] == pytest.approx([0.9, 0.45])
    assert record["val_acc"] > 0.85  # a ternary digits student fine-tuned from the teacher
    assert record["teacher"]["path"] == str(teacher_ckpt)
    assert record["teacher"]["sha256"] == fingerprint(teacher)  # the teacher's identity
    loaded, ckpt = _checkpoint.load_model(out)
    assert ckpt["quant"]["weight_bits"] == 2 and ckpt["record"]["kd"]["temperature"] == 4.0
    assert ckpt["record"]["kd"]["gslr"] == {"start_epoch": 0, "end_epoch": 2, "start_value": None,
                                            "end_value": 0.0, "shape": "linear"}
    assert json.loads(out.with_suffix(".json").read_text())["history"] == \
        json.loads(json.dumps(record["history"]))
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), student.eval()(x))


@pytest.mark.parametrize("scheme", ["B", "C"])
def test_frozen_teacher_is_unchanged(scheme, teacher, small):
    before = _state(teacher)
    student = student_for(scheme, teacher, weight_bits=2, act_bits=4)
    start = _state(student)
    distill(student, teacher, small, None, scheme=scheme, epochs=1, batch_size=32,
            teacher_precision="bf16" if scheme == "B" else None, progress=False)
    assert _same(before, _state(teacher)) and not teacher.training  # BN statistics included
    assert not _same(start, _state(student))


def test_scheme_a_trains_the_teacher(tmp_path, small):
    torch.manual_seed(0)
    teacher = models.create("digits_cnn", width=4)
    student = student_for("A", teacher, weight_bits=2, act_bits=4)
    before = _state(teacher)
    distill(student, teacher, small, None, scheme="A", epochs=1, batch_size=32,
            teacher_out=tmp_path / "t.pt", progress=False)
    after = _state(teacher)
    assert any(not torch.equal(before[k], after[k]) for k in before if "weight" in k)
    assert _same(after, _checkpoint.load_model(tmp_path / "t.pt")[0].state_dict())
    with pytest.raises(ValueError, match="scheme A"):
        distill(student, teacher, small, scheme="C", epochs=1, teacher_out=tmp_path / "u.pt")


@pytest.mark.parametrize("loss", ["hinton", "apprentice"])
def test_teacher_gets_no_kd_gradient_unless_asked(loss, small):
    torch.manual_seed(0)
    teacher = models.create("digits_cnn", width=4)
    student = student_for("A", teacher, weight_bits=2, act_bits=4)
    x, y = small.images[:16].float() / 255, small.labels[:16]

    def teacher_grads(kd: KDConfig) -> dict[str, torch.Tensor]:
        teacher.zero_grad()
        student.zero_grad()
        loss_value, _, _ = _objective(kd, teacher)(student, x, y, 0)
        loss_value.backward()
        return {k: p.grad.clone() for k, p in teacher.named_parameters()}

    kd = dict(scheme="A", loss=loss, lam=0.9, temperature=2.0)
    plain = teacher_grads(KDConfig(**kd))
    teacher.zero_grad()
    own = F.cross_entropy(teacher(x), y) * (1.0 if loss == "hinton" else KDConfig().alpha)
    own.backward()  # the teacher's own cross-entropy alone
    for k, p in teacher.named_parameters():
        assert torch.allclose(plain[k], p.grad, atol=1e-6), k
    asked = teacher_grads(KDConfig(**kd, teacher_grad=True))
    assert any(not torch.allclose(plain[k], asked[k], atol=1e-6) for k in plain)


# ------------------------------------------------------------------- resume and failures


class _Interrupt:
    """Forward hook that raises KeyboardInterrupt on a module's ``at``-th call (a Ctrl-C)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_zero_soft_weight_is_label_training_without_the_teacher(teacher, small):
    # lam = 0 is plain QAT on the labels: the same weights as lowbit.train, bit for bit, and
    # the frozen teacher is never run (a teacher whose logits are NaN cannot spoil the loss)
    class NaNLogits(torch.nn.Module):
        def forward(self, x):
            return x * float("nan")

    broken = torch.nn.Sequential(copy.deepcopy(teacher), NaNLogits())
    cfg = dict(epochs=2, batch_size=32, lr=0.02, progress=False, seed=3)
    by_distill = student_for("C", teacher, weight_bits=2, act_bits=4)
    distill(by_distill, broken, small, None, scheme="C", lam=0.0, **cfg)
    by_train = student_for("C", teacher, weight_bits=2, act_bits=4)
    train(by_train, small, None, **cfg)
    assert _same(_state(by_distill), _state(by_train))


@pytest.mark.parametrize("scheme,stop_step", [("C", 8), ("C", 5), ("A", 8)])
def test_resume_is_exact(tmp_path, teacher_ckpt, small, scheme, stop_step):
    # 4 steps per epoch, checkpoints after steps 3, 4 (epoch end), 6, and at the end (8).
    # Stopping during step 8 resumes mid-epoch from step 6; during step 5, from epoch 1's end.

    def run(out, interrupt: _Interrupt | None = None, resume: bool = False, lam: float = 0.7):
        torch.manual_seed(0)
        teacher = _checkpoint.load_model(teacher_ckpt)[0]
        if scheme == "A":
            teacher = models.create("digits_cnn", width=8)
        student = student_for(scheme, teacher, weight_bits=2, act_bits=4)
        if interrupt:
            student.register_forward_hook(interrupt)
        distill(student, teacher, small, None, scheme=scheme, lam=lam, temperature=2.0,
                gslr=GSLR(0, 2), epochs=2, batch_size=32, checkpoint_every=3, out=out,
                resume=resume, progress=False)
        return student, teacher

    full_s, full_t = run(tmp_path / "full.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", _Interrupt(stop_step + 1))  # +1: the output-size check call
    assert "resume" in _checkpoint.load(tmp_path / "cut.pt")
    with pytest.raises(TrainingError, match="other settings"):
        run(tmp_path / "cut.pt", resume=True, lam=0.5)
    cut_s, cut_t = run(tmp_path / "cut.pt", resume=True)
    assert _same(_state(full_s), _state(cut_s))
    assert _same(_state(full_t), _state(cut_t))
    assert _same(_checkpoint.load(tmp_path / "full.pt")["state_dict"],
                 _checkpoint.load(tmp_path / "cut.pt")["state_dict"])


def test_bn_statistics_reestimated_after_the_last_epoch(tmp_path, teacher, small, digits_split):
    """A finished QAT run's BatchNorm statistics are the average over ``bn_batches`` training
    batches, drawn as for one more epoch; everything else is what a run without it ends with."""

    def run(bn_batches: int, out):
        torch.manual_seed(0)
        student = student_for("C", teacher, weight_bits=2, act_bits=4)
        _, record = distill(student, teacher, small, digits_split[1], scheme="C", lam=0.7,
                            epochs=2, batch_size=32, bn_batches=bn_batches, out=out,
                            progress=False)
        return student, record

    plain, plain_record = run(0, tmp_path / "plain.pt")
    fixed, record = run(3, tmp_path / "fixed.pt")
    assert "bn_reestimated" not in plain_record
    assert record["bn_reestimated"] == {"batches": 3, "val_acc_before": plain_record["val_acc"],
                                        "val_acc": record["val_acc"]}
    assert record["val_acc"] == evaluate(fixed, digits_split[1])
    p, f = _state(plain), _state(fixed)
    stats = {k for k in p if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert len(stats) == 9 and all(torch.equal(p[k], f[k]) for k in p.keys() - stats)
    assert _same(_checkpoint.load(tmp_path / "fixed.pt")["state_dict"], f)

    # by hand: each BatchNorm's input, batch statistics in every BatchNorm, the rest in eval
    probe = copy.deepcopy(plain).eval()
    bns = [m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, list] = {i: [] for i in range(len(bns))}
    for m in probe.modules():
        if isinstance(m, IntegerBias):
            m.train()  # its eval-mode rounding reads the statistics being estimated
    for i, m in enumerate(bns):
        m.train()
        m.register_forward_hook(lambda mod, inp, out, i=i: seen[i].append(inp[0].detach()))
    loader = data.as_data(small).loader(32, train=True, seed=0)
    loader.set_epoch(2)  # the batches of the epoch after the last
    with torch.no_grad():
        for x, _ in list(loader)[:3]:
            probe(x.contiguous(memory_format=torch.channels_last))  # as training feeds it
    for i, m in enumerate(m for m in fixed.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        means = torch.stack([t.mean((0, 2, 3)) for t in seen[i]]).mean(0)
        variances = torch.stack([t.var((0, 2, 3)) for t in seen[i]]).mean(0)
        torch.testing.assert_close(m.running_mean, means)
        torch.testing.assert_close(m.running_var, variances)
        assert m.momentum == 0.1 and not m.training


def test_float_training_keeps_running_statistics(digits_split):
    """``bn_batches`` is for quantized models: a float model ends with its running averages."""
    torch.manual_seed(0)
    _, record = train(models.create("digits_cnn", width=4), digits_split[0].subset(64), None,
                      epochs=1, batch_size=32, bn_batches=2, progress=False)
    assert record["config"]["bn_batches"] == 2 and "bn_reestimated" not in record


def test_non_finite_loss_names_epoch_and_step_and_keeps_checkpoint(tmp_path, teacher, small):
    student = student_for("C", teacher, weight_bits=2, act_bits=4)
    calls = []

    def poison(module, inputs, output):  # the 6th training step (epoch 2, step 2) blows up
        if module.training:
            calls.append(1)
            if len(calls) == 6:
                return output * float("nan")

    student.register_forward_hook(poison)
    out = tmp_path / "s.pt"
    with pytest.raises(TrainingError, match=r"epoch 2, step 2.*last good checkpoint kept"):
        distill(student, teacher, small, None, epochs=3, batch_size=32, out=out,
                progress=False)
    model, ckpt = _checkpoint.load_model(out)
    assert len(ckpt["record"]["history"]) == 1 and ckpt["resume"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in model.state_dict().values()
               if v.is_floating_point())


def test_bad_teachers_are_refused_before_training(tmp_path, teacher, small):
    student = student_for("C", teacher, weight_bits=2, act_bits=4)
    out = tmp_path / "s.pt"
    five = models.create("digits_cnn", num_classes=5, width=4)
    with pytest.raises(ValueError, match=r"teacher outputs \(5,\).*student outputs \(10,\)"):
        distill(student, five, small, None, epochs=1, out=out, progress=False)
    assert not out.exists()
    bare = tmp_path / "bare.pt"
    torch.save(teacher.state_dict(), bare)
    with pytest.raises(_checkpoint.CheckpointError, match="not a lowbit checkpoint"):
        distill(student, bare, small, None, epochs=1, out=out, progress=False)
    with pytest.raises(ValueError, match="unknown distill settings: lamda"):
        distill(student, teacher, small, lamda=0.5)
    rgb = models.create("digits_cnn", in_channels=3, width=4)
    with pytest.raises(ValueError, match="teacher cannot run"):
        distill(student, rgb, small, None, epochs=1, progress=False)


# ------------------------------------------------------------------------------ DDP and CLI

_DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from lowbit import data, models
from lowbit.distill import distill, student_for

out, dumps = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
teacher = models.create("digits_cnn", width=4)
student = student_for("A", teacher, weight_bits=2, act_bits=4)
train_set = data.digits(True).subset(256)
_, record = distill(student, teacher, train_set, data.digits(False).subset(100), scheme="A",
                    epochs=2, batch_size=32, lr=0.1, out=f"{out}/student.pt", progress=False)
params = {f"student.{k}": p.detach() for k, p in student.named_parameters()}
params.update({f"teacher.{k}": p.detach() for k, p in teacher.named_parameters()})
torch.save({"params": params, "record": record}, f"{dumps}/rank{dist.get_rank()}.pt")
"""


def test_ddp_two_processes(tmp_path):
    script, out, dumps = tmp_path / "ddp.py", tmp_path / "out", tmp_path / "dumps"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    out.mkdir()
    dumps.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(out), str(dumps)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(dumps / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:  # gradients were averaged: both replicas hold the same weights
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert sorted(p.name for p in out.iterdir()) == ["student.json", "student.pt"]  # rank 0 only
    ckpt = _checkpoint.load(out / "student.pt")
    for k, v in ckpt["state_dict"].items():
        if f"student.{k}" in r0["params"]:
            assert torch.equal(v, r0["params"][f"student.{k}"]), k
    # each rank saw half of every epoch: 128 images, 4 steps of 32; 8 steps lower the loss
    # (the accuracy on 100 images after 8 steps is noise around 10%)
    history = ckpt["record"]["history"]
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    # the recorded accuracy is the saved student's on the validation images
    model, _ = _checkpoint.load_model(out / "student.pt")
    assert ckpt["record"]["val_acc"] == evaluate(model, data.digits(False).subset(100))


def test_cli_distill_end_to_end(tmp_path, teacher_ckpt, capsys):
    out = tmp_path / "student.pt"
    args = ["distill", "--teacher", str(teacher_ckpt), "--data", "digits", "--scheme", "C",
            "--bits", "2/4", "--temperature", "4", "--lam", "0.8",
            "--gslr", "0:2", "--gslr-shape", "cosine", "--epochs", "2", "--batch-size", "64",
            "--limit", "384", "--bn-batches", "2", "--first-bits", "4", "--layer-bits",
            "features.3=4", "-o", str(out)]
    assert cli.main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    model, ckpt = _checkpoint.load_model(out)
    assert ckpt["record"]["bn_reestimated"]["batches"] == 2
    assert ckpt["quant"]["weight_bits"] == 2 and ckpt["quant"]["act_bits"] == 4
    # the user's precision policy reaches the student and describe()
    assert ckpt["quant"]["first_bits"] == 4 and ckpt["quant"]["last_bits"] == 8
    bits = {r.name: r.weight_bits for r in describe(model)}
    assert bits["features.0"] == 4 and bits["features.3"] == 4 and bits["fc"] == 8
    kd = ckpt["record"]["kd"]
    assert kd["scheme"] == "C" and kd["gslr"]["shape"] == "cosine" and kd["temperature"] == 4
    assert [h["soft_weight"] for h in ckpt["record"]["history"]] == pytest.approx([0.8, 0.4])
    assert ckpt["record"]["val_acc"] > 0.8
    assert cli.main([*args, "--resume"]) == 2  # a finished run cannot be resumed
    assert "finished run" in capsys.readouterr().err

    bare = tmp_path / "bare.pt"
    torch.save(copy.deepcopy(model.state_dict()), bare)
    for bad, message in [(["--teacher", str(bare)], "not a lowbit checkpoint"),
                         (["--gslr", "3"], "START:END"),
                         (["--arch", "resnet20"], "--init")]:
        assert cli.main([*args[:-2], *bad, "-o", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as exc:  # argparse's own check, one line, before any work
        cli.main([*args[:-2], "--bits", "3", "-o", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "expected W or W/A" in err and err.count("\n") == 1, err
