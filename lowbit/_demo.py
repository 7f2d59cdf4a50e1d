"""``lowbit demo``: the whole pipeline on the offline default (digits), as a user sees it.

Float teacher -> two ternary students at the same budget (labels only; KD + GSLR) -> packed
ONNX + QONNX verified against PyTorch -> accuracy and latency in the torch-free runtime ->
memory footprint at batch 1 and 8. Prints one summary table and writes a report folder:
summary.json, the checkpoints, the exported files, curves.png and footprint.png.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import _checkpoint, data, models
from ._backend import cpu_features
from ._io import atomic_write, os_refusal, write_json
from ._progress import bar as progress_bar
from .distill import GSLR, distill, evaluate, train
from .errors import UsageError
from .export import export
from .footprint import footprint, plot
from .quant import quantize
from .runtime import Session

BATCHES = (1, 8)  # footprint and latency batch sizes


@dataclass(frozen=True)
class Budget:
    """How much training a demo run gets (per student: same epochs, data and schedule)."""

    epochs: int  # student epochs
    limit: int = 0  # training images (0: all)
    test_limit: int = 0  # test images (0: all)
    batch_size: int = 64
    lr: float = 0.05  # students' peak learning rate
    precision: str = "fp32"
    teacher_epochs: int = 0  # digits: the teacher is trained here; CIFAR-10: shipped
    temperature: float = 4.0
    lam: float = 0.7  # KD soft weight at the start; GSLR lowers it to 0 by the last epoch


BUDGETS = {
    "digits": Budget(epochs=8, teacher_epochs=20),
    # A CPU-sized slice of CIFAR-10 (~4 min on 2 cores); examples/shin_recipe.py has the
    # paper-length schedule.
    "cifar10": Budget(epochs=2, limit=5000, batch_size=128, lr=0.02, precision="bf16"),
}


def run_demo(out_dir: str | Path = "reports/demo", data_spec: str = "digits", *,
             epochs: int | None = None, limit: int | None = None,
             test_limit: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the pipeline on ``data_spec`` (``digits`` or ``cifar10:DIR``); returns the summary.

    ``epochs``/``limit``/``test_limit`` override the budget (:data:`BUDGETS`); ``threads``
    sets onnxruntime's intra-op threads (default: one per physical core). Raises
    ``ExportError`` (``lowbit.export``) if the exported file fails the onnxruntime agreement gate;
    the summary written so far stays in ``out_dir``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    kind = data_spec.partition(":")[0]
    if kind not in BUDGETS:
        raise UsageError(f"lowbit demo runs on digits or cifar10:DIR (the shipped teacher is "
                         f"a CIFAR-10 ResNet20), got --data {data_spec!r}")
    try:  # the report folder is the demo's own: made here, its files checked as they are
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_refusal(out, exc) from None
    budget = BUDGETS[kind]
    budget = replace(budget, **{k: v for k, v in {"epochs": epochs, "limit": limit,
                                                  "test_limit": test_limit}.items()
                                if v is not None})
    train_set, test_set = data.load(data_spec, train=True), data.load(data_spec, train=False)
    if budget.limit:
        train_set = train_set.subset(budget.limit)
    if budget.test_limit:
        test_set = test_set.subset(budget.test_limit)
    train_set, val_set = data.validation_split(train_set)  # per epoch; the test split: once
    summary: dict[str, Any] = {"data": train_set.name, "train_images": len(train_set),
                               "validation_images": len(val_set), "validation": val_set.split,
                               "test_images": len(test_set), "budget": asdict(budget),
                               "machine": cpu_features()}

    def save() -> None:
        summary["seconds"] = time.perf_counter() - t0
        write_json(out / "summary.json", summary)

    _stage(1, f"float teacher ({len(train_set):,} {train_set.name} training images, "
              f"{len(val_set):,} held out for validation, {len(test_set):,} test images)")
    teacher, summary["teacher"] = _teacher(train_set, val_set, test_set, budget, out)
    save()

    _stage(2, f"ternary students (2-bit weights, 4-bit activations, scheme C), "
              f"{budget.epochs} epochs each")
    students, summary["students"] = {}, {}
    gslr = GSLR(0, max(budget.epochs - 1, 1))
    for name, label, kd in [("no_kd", "labels only", {"lam": 0.0}),
                            ("kd_gslr", f"KD + GSLR (T={budget.temperature}, lam "
                             f"{budget.lam} -> 0)",
                             {"temperature": budget.temperature, "lam": budget.lam,
                              "gslr": gslr})]:
        print(f"  {label}")
        student = quantize(teacher, weight_bits=2, act_bits=4)
        students[name], record = distill(
            student, teacher, train_set, val_set, scheme="C", epochs=budget.epochs,
            batch_size=budget.batch_size, lr=budget.lr, precision=budget.precision,
            out=out / f"student_{name}.pt", **kd)
        summary["students"][name] = {"label": label, "val_acc": record["val_acc"],
                                     "test_acc": evaluate(students[name], test_set),
                                     "checkpoint": str(out / f"student_{name}.pt"),
                                     "kd": record["kd"], "history": record["history"]}
    summary["plots"] = {"curves": str(_plot_curves(summary, out / "curves.png"))}
    save()

    _stage(3, "export the KD student: packed ONNX + QONNX, verified against PyTorch")
    result = export(students["kd_gslr"], out / "student.onnx", formats=("onnx", "qonnx"),
                    verify=test_set, data=train_set)
    for check in result.verification.values():
        print(f"  {check}")
    print(f"  {result.arithmetic}")
    fp = footprint(result.paths["onnx"], BATCHES)
    n_weights = sum(layer.weight_elements for layer in fp.layers)
    summary["export"] = {
        "quantized_weights": n_weights, "storage": result.storage,
        "arithmetic": {"exact_on_every_cpu": all(c.passed for c in result.contract),
                       "integer_layers": [str(c) for c in result.contract]},
        **{fmt: {"path": str(path), "bytes": path.stat().st_size,
                 "bits_per_weight": path.stat().st_size * 8 / n_weights,
                 "verification": result.verification[fmt].to_dict()}
           for fmt, path in result.paths.items()}}
    save()

    _stage(4, f"torch-free runtime (onnxruntime): accuracy on {len(test_set):,} test images, "
              f"latency at batch {' and '.join(map(str, BATCHES))}")
    session = Session(result.paths["onnx"], threads=threads)
    with progress_bar(total=len(test_set), desc="onnxruntime", unit="img") as bar:
        ort_acc = session.evaluate((test_set.images.numpy(), test_set.labels.numpy()),
                                   progress=bar.update)
    timings = session.benchmark(BATCHES, min_time=0.3)
    summary["export"]["onnx"].update(ort_acc=ort_acc, threads=threads,
                                     latency=[t.to_dict() for t in timings])

    _stage(5, "memory footprint: weights vs activations")
    reports = {"fp32": fp.with_bits(32, 32), "8-bit": fp.with_bits(8, 8),
               "ternary (exported)": fp}
    summary["footprint"] = {label: _memory(r) for label, r in reports.items()}
    summary["plots"]["footprint"] = str(plot(reports, out / "footprint.png"))
    save()

    print()
    print(_table(summary))
    print(f"\nreport: {out}/ (summary.json, curves.png, footprint.png, checkpoints, "
          f"student.onnx, student.qonnx.onnx); {summary['seconds']:.0f} s")
    if kind != "digits":
        print(f"budget: {budget.epochs} epochs on {len(train_set):,} training images per "
              f"student (--epochs/--limit). Full-length training: python "
              f"examples/shin_recipe.py --data {data_spec} --budget paper")
    return summary


def _stage(i: int, text: str) -> None:
    print(f"[{i}/5] {text}", flush=True)


def _teacher(train_set: data.Dataset, val_set: data.Dataset, test_set: data.Dataset,
             budget: Budget, out: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Digits: a digits CNN trained here; CIFAR-10: the shipped ResNet20."""
    if train_set.name == "digits":
        model = models.create("digits_cnn", num_classes=train_set.num_classes, seed=0)
        model, record = train(model, train_set, val_set, epochs=budget.teacher_epochs,
                              batch_size=64, lr=0.05, out=out / "teacher.pt")
        info = {"arch": "digits_cnn", "source": f"trained here ({budget.teacher_epochs} epochs)",
                "checkpoint": str(out / "teacher.pt"), "history": record["history"]}
    else:
        path = models.pretrained("resnet20_cifar10")
        model, ckpt = _checkpoint.load_model(path)
        _checkpoint.check_data(ckpt, test_set, str(path), train_set.name)
        info = {"arch": ckpt["arch"]["name"], "source": "shipped (lowbit.models.pretrained)",
                "checkpoint": str(path)}
    info["test_acc"] = evaluate(model, test_set)
    print(f"  {info['arch']}, {info['source']}: test accuracy {info['test_acc']:.2%}")
    return model, info


def _memory(fp) -> dict[str, Any]:
    """Weight bytes and summed / peak-live activation bytes per batch size."""
    return {"weight_bytes": fp.weight_bytes,
            "activation_bytes": {str(b): fp.activation_bytes(b) for b in fp.batch_sizes},
            "peak_activation_bytes": {str(b): fp.peak_activation_bytes(b)
                                      for b in fp.batch_sizes}}


def _plot_curves(summary: dict[str, Any], path: Path) -> Path:
    """Test accuracy, training loss and the KD soft weight per epoch of every trained model."""
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no global state
    from matplotlib.ticker import MaxNLocator

    runs = {f"student, {s['label']}": s["history"] for s in summary["students"].values()}
    if "history" in summary["teacher"]:
        runs = {"float teacher": summary["teacher"]["history"], **runs}
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for i, (label, history) in enumerate(runs.items()):
        epochs = [h["epoch"] for h in history]
        style = {"marker": ".", "color": f"C{i}", "label": label}
        axes[0].plot(epochs, [100 * h["val_acc"] for h in history], **style)
        axes[1].plot(epochs, [h["train_loss"] for h in history], **style)
        if "soft_weight" in history[0]:
            axes[2].plot(epochs, [h["soft_weight"] for h in history], **style)
    for ax, title in zip(axes, ["validation accuracy (%)", "training loss (KD: CE and soft term)",
                                "KD soft-loss weight lam (GSLR)"], strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"lowbit demo on {summary['data']}", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))


def _table(summary: dict[str, Any]) -> str:
    """The one summary table: accuracy, file size, bits/weight, latency, memory per model."""
    fp32, ternary = summary["footprint"]["fp32"], summary["footprint"]["ternary (exported)"]
    onnx, qonnx = summary["export"]["onnx"], summary["export"]["qonnx"]
    n = summary["export"]["quantized_weights"]
    latency = {str(t["batch"]): f"{t['latency_ms']:.3f}" for t in onnx["latency"]}

    def memory(fp: dict[str, Any]) -> list[str]:
        return [_kib(fp["weight_bytes"])] + [_kib(fp["peak_activation_bytes"][str(b)])
                                             for b in BATCHES]

    teacher = summary["teacher"]
    no_kd, kd = summary["students"]["no_kd"], summary["students"]["kd_gslr"]
    agree = onnx["verification"]["agreement"]
    rows = [["model", "test acc", "file", "bytes", "bits/w",
             *[f"ORT ms b={b}" for b in BATCHES], "weights KiB",
             *[f"act KiB b={b}" for b in BATCHES]],
            [f"float teacher ({teacher['arch']})", f"{teacher['test_acc']:.2%}",
             "(fp32 weights)", f"{fp32['weight_bytes']:,}",
             f"{fp32['weight_bytes'] * 8 / n:.1f}", "-", "-", *memory(fp32)],
            ["ternary, labels only", f"{no_kd['test_acc']:.2%}", *["-"] * 8],
            ["ternary, KD + GSLR", f"{kd['test_acc']:.2%}", *["-"] * 8],
            ["  in onnxruntime", f"{onnx['ort_acc']:.2%}", Path(onnx["path"]).name,
             f"{onnx['bytes']:,}", f"{onnx['bits_per_weight']:.2f}",
             *[latency[str(b)] for b in BATCHES], *memory(ternary)],
            ["  as QONNX", "-", Path(qonnx["path"]).name, f"{qonnx['bytes']:,}",
             f"{qonnx['bits_per_weight']:.2f}", *["-"] * 5]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + (
        f"\n\n{summary['test_images']:,} {summary['data']} test images; onnxruntime agrees "
        f"with the PyTorch student on {agree:.2%} of them. bits/weight: whole file (or fp32 "
        f"weights + biases) x 8 / {n:,} conv+linear weights. act: peak live activation "
        f"memory at the exported bit widths (fp32 for the teacher).")


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f}"


__all__ = ["BUDGETS", "Budget", "run_demo"]
