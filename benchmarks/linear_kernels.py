"""Linear layers in onnxruntime: fp32, onnxruntime's own int8 and MatMulNBits, then a wide MLP.

Part 1, one Linear layer [M, K] x [K, N] per K x N and batch M, all in one run with
interleaved timing rounds (background load hits every model alike):

* ``fp32``          MatMul on float weights
* ``ort_dynamic``   onnxruntime's ``quantize_dynamic`` (int8 weights; DynamicQuantizeMatMul)
* ``ort_static``    onnxruntime's ``quantize_static`` (QDQ, per-channel int8, uint8
  activations; ``reduce_range`` on x86 without VNNI, as onnxruntime advises there)
* ``qdq2``          lowbit's portable form of the ternary layer: codes -> DequantizeLinear ->
  Gemm (onnxruntime dequantizes the weights on every call and runs a float Gemm)
* ``nbits4``, ``nbits2``  MatMulNBits 4-bit / 2-bit (ternary) weights, ``accuracy_level`` 4,
  block 64, packed by ``lowbit.export._nbits.pack_nbits``
* ``nbits2_lut``    the 2-bit file with the session entry ``mlas.use_lut_gemm=1``
* ``nbits2_fp32``   the 2-bit file at ``accuracy_level`` 1 (float input: exact, slow fallback)

with each model's largest output error relative to the exact product of its own weights.

Part 2, acceptance: a ``--width``-wide MLP (64 -> W -> W -> W -> 10) trained here on sklearn's
digits, its ternary student (``lowbit.quantize`` + a few epochs of distillation), exported by
lowbit with Linear layers as QDQ (default) and as MatMulNBits, timed at batch 1 and 8 against
onnxruntime's own int8 models (dynamic and static) of the same float network, in one run,
with test accuracy and top-1 agreement (lowbit files with the student, onnxruntime's with
the float network). Writes ``benchmarks/results/linear_kernels.{json,md}``.

Reproduce: ``python benchmarks/linear_kernels.py --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    batch_latency,
    comparison_footer,
    float_onnx,
    interleaved,
    ort_int8,
    write_report,
)
from onnx import TensorProto, helper, numpy_helper

from lowbit._backend import (
    ACCURACY_FP32,
    ACCURACY_INT8,
    LUT_GEMM,
    NBITS_DOMAIN,
    NBITS_OP,
)
from lowbit._io import atomic_write
from lowbit.export import NBits, pack_nbits
from lowbit.runtime import Session, session_options

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = NBits().block_size


# -- part 1: one layer --------------------------------------------------------------------------
def _graph(nodes, inits, k: int, n: int) -> bytes:
    g = helper.make_graph(nodes, "linear",
                          [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid(NBITS_DOMAIN, 1)])
    m.ir_version = 8
    return m.SerializeToString()


def _nbits(codes: np.ndarray, scale: np.ndarray, bits: int, level: int) -> bytes:
    """One MatMulNBits layer of weight ``codes`` [N, K] x per-channel ``scale``."""
    n, k = codes.shape
    b = pack_nbits(codes, bits, BLOCK)
    s = np.repeat(scale[:, None], b.shape[1], axis=1).astype(np.float32)
    node = helper.make_node(NBITS_OP, ["A", "B", "S"], ["Y"], domain=NBITS_DOMAIN, K=k, N=n,
                            bits=bits, block_size=BLOCK, accuracy_level=level)
    return _graph([node], [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")],
                  k, n)


def _qdq(codes: np.ndarray, scale: np.ndarray) -> bytes:
    """lowbit's QDQ form of a Linear layer: int8 ``codes`` [N, K] -> per-channel
    DequantizeLinear -> Gemm (transB), as ``linear_kernel="qdq"`` writes it."""
    n, k = codes.shape
    nodes = [helper.make_node("DequantizeLinear", ["W", "S"], ["Wf"], axis=0),
             helper.make_node("Gemm", ["A", "Wf"], ["Y"], transB=1)]
    return _graph(nodes, [numpy_helper.from_array(codes.astype(np.int8), "W"),
                          numpy_helper.from_array(scale.astype(np.float32), "S")], k, n)


def layer_models(k: int, n: int, tmp: Path) -> dict[str, tuple[bytes, dict, np.ndarray]]:
    """{name: (model bytes, session config, the float weight [K, N] it stands for)}."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    fp32 = _graph([helper.make_node("MatMul", ["A", "W"], ["Y"])],
                  [numpy_helper.from_array(w, "W")], k, n)
    calib = [{"A": rng.standard_normal((16, k)).astype(np.float32)} for _ in range(4)]
    models = {"fp32": (fp32, {}, w), "ort_dynamic": (ort_int8(fp32, tmp, None), {}, w),
              "ort_static": (ort_int8(fp32, tmp, calib), {}, w)}
    for bits in (4, 2):  # per-channel codes: TWN (2-bit) or max-scaled (4-bit)
        if bits == 2:
            delta = 0.7 * np.abs(w).mean(0)
            q = np.where(np.abs(w) > delta, np.sign(w), 0).astype(np.int8)
            s = np.abs(w * q).sum(0) / np.maximum(np.abs(q).sum(0), 1)
        else:
            s = np.abs(w).max(0) / 7
            q = np.clip(np.round(w / s), -7, 7).astype(np.int8)
        deq = (q * s).astype(np.float32)
        models[f"nbits{bits}"] = (_nbits(q.T, s, bits, ACCURACY_INT8), {}, deq)
        if bits == 2:  # lowbit's portable form: DequantizeLinear(codes) -> Gemm, float
            models["qdq2"] = (_qdq(q.T, s), {}, deq)
        if bits == 2:
            models["nbits2_lut"] = (models["nbits2"][0], {LUT_GEMM: "1"}, deq)
            models["nbits2_fp32"] = (_nbits(q.T, s, bits, ACCURACY_FP32), {}, deq)
    return models


def kernels(sizes: list[int], batches: list[int], threads: int, rounds: int,
            min_time: float) -> list[dict]:
    """Part 1: rows of (K = N, batch, model, latency ms, relative error)."""
    import onnxruntime as ort

    rows = []
    for k in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            models = layer_models(k, k, Path(tmp))
        sessions = {name: ort.InferenceSession(b, session_options(threads, "all", config),
                                               providers=["CPUExecutionProvider"])
                    for name, (b, config, _) in models.items()}
        for m in batches:
            a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            calls = {name: (lambda s=s, a=a: s.run(None, {"A": a}))
                     for name, s in sessions.items()}
            ms = interleaved(calls, rounds, min_time)
            for name, s in sessions.items():
                exact = a.astype(np.float64) @ models[name][2].astype(np.float64)
                err = np.abs(s.run(None, {"A": a})[0] - exact).max() / np.abs(exact).max()
                rows.append({"k": k, "n": k, "batch": m, "model": name, "ms": ms[name],
                             "rel_error": float(err)})
            print(f"K=N={k} batch {m}: " + ", ".join(f"{n} {ms[n]:.3f}" for n in ms),
                  file=sys.stderr)
    return rows


# -- part 2: a wide MLP end to end ------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    mean, std = x[:1437].mean(0), x[:1437].std(0) + 1.0
    x = (x - mean) / std
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def _fit(model, x, y, epochs: int, lr: float, teacher=None, seed: int = 0) -> float:
    """Adam on cross-entropy (plus KL to ``teacher``'s logits at T = 4); seconds taken."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x[idx]) / 4, 1)
                loss = loss + 16 * F.kl_div(F.log_softmax(out / 4, 1), soft,
                                            reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


def mlp(width: int, threads: int, epochs: int, rounds: int, min_time: float,
        tmp: Path) -> dict:
    """Part 2: build, export and time the MLP files; latency, accuracy and agreement each."""
    import torch
    import torch.nn as nn

    from lowbit import quant
    from lowbit.export import export

    (xtr, ytr), (xte, yte) = _digits()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    t_teacher = _fit(teacher, xtr, ytr, epochs, 1e-3)
    student = quant.quantize(teacher, weight_bits=2)
    quant.calibrate(student, [torch.from_numpy(xtr[i:i + 256]) for i in range(0, 1024, 256)])
    t_student = _fit(student, xtr, ytr, epochs, 2e-4, teacher=teacher)
    xt = torch.from_numpy(xte)
    with torch.no_grad():
        refs = {"teacher": teacher(xt).argmax(1).numpy(), "student": student(xt).argmax(1).numpy()}
    files, gates = {}, {}
    for name, kw in {"lowbit_qdq": {},
                     "lowbit_nbits": {"linear_kernel": "nbits"},
                     "lowbit_nbits_lut": {"linear_kernel": "nbits",
                                          "nbits": NBits(lut_gemm=True)}}.items():
        files[name] = tmp / f"{name}.onnx"
        result = export(student, files[name], example_input=xt[:1], formats=("onnx",),
                        verify=xt, progress=False, **kw)
        gates[name] = [str(v) for v in result.verification.values()]
    fp32 = float_onnx(teacher, xt[:1])
    files["fp32"] = tmp / "fp32.onnx"
    files["fp32"].write_bytes(fp32)
    calib = [{"input": xtr[i:i + 64]} for i in range(0, 512, 64)]
    for name, feeds in (("ort_dynamic", None), ("ort_static", calib)):
        files[name] = tmp / f"{name}.onnx"
        files[name].write_bytes(ort_int8(fp32, tmp, feeds))
    sessions = {name: Session(p, threads=threads) for name, p in files.items()}
    out: dict = {"width": width, "train_seconds": {"teacher": t_teacher, "student": t_student},
                 "gates": gates, "models": {
                     n: {"latency_ms": ms} for n, ms in batch_latency(
                         sessions, xte, rounds, min_time).items()}}
    for n, s in sessions.items():
        pred = s.predict(xte)
        ref = refs["teacher"] if n in ("fp32", "ort_dynamic", "ort_static") else refs["student"]
        out["models"][n].update({"bytes": files[n].stat().st_size,
                                 "accuracy": float((pred == yte).mean()),
                                 "agreement": float((pred == ref).mean()),
                                 "config": s.config})
    out["accuracy"] = {k: float((v == yte).mean()) for k, v in refs.items()}
    return out


KERNEL_MODELS = ("fp32", "ort_dynamic", "ort_static", "qdq2", "nbits4", "nbits2",
                 "nbits2_lut", "nbits2_fp32")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Linear kernels, onnxruntime {report['onnxruntime']}, {report['threads']} threads, "
             f"{m['cpu']} (flags: {', '.join(m['flags'])}; uint8 x int8 kernels: {m['u8s8']}), "
             f"{m['logical_cpus']} logical CPUs. Command: `{report['command']}`.", "",
             "## One Linear layer: median ms per call (x fp32), interleaved rounds", "",
             "| K = N | batch | " + " | ".join(KERNEL_MODELS) + " |",
             "|---" * (2 + len(KERNEL_MODELS)) + "|"]
    rows = report["kernels"]
    for k in sorted({r["k"] for r in rows}):
        for b in sorted({r["batch"] for r in rows}):
            cell = {r["model"]: r for r in rows if r["k"] == k and r["batch"] == b}
            base = cell["fp32"]["ms"]
            lines.append(f"| {k} | {b} | " + " | ".join(
                f"{cell[n]['ms']:.3f} ({cell[n]['ms'] / base:.2f}x)" for n in KERNEL_MODELS)
                + " |")
    worst = {n: max(r["rel_error"] for r in rows if r["model"] == n) for n in KERNEL_MODELS}
    lines += ["", "Largest output error relative to the exact product of each model's own "
              "weights (any size and batch): "
              + ", ".join(f"{n} {e:.2%}" for n, e in worst.items())]
    if "mlp" in report:
        r = report["mlp"]
        w = r["width"]
        lines += ["", f"## MLP 64 -> {w} -> {w} -> {w} -> 10 on digits (ternary student, first "
                  f"and last layer 8-bit), median ms per call", "",
                  f"Float network: {r['accuracy']['teacher']:.2%} test accuracy; ternary "
                  f"student: {r['accuracy']['student']:.2%} ({r['train_seconds']['teacher']:.0f} s"
                  f" and {r['train_seconds']['student']:.0f} s of training).", "",
                  "| model | bytes | batch 1 ms | batch 8 ms | test accuracy | agreement | "
                  "session config |", "|---|---:|---:|---:|---:|---:|---|"]
        for n, v in r["models"].items():
            lines.append(f"| {n} | {v['bytes']:,} | {v['latency_ms']['1']:.3f} | "
                         f"{v['latency_ms']['8']:.3f} | {v['accuracy']:.2%} | "
                         f"{v['agreement']:.2%} | {v['config'] or ''} |")
        lines += comparison_footer(r)
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per model and round")
    p.add_argument("--width", type=int, default=4096, help="MLP width (0: skip part 2)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs, teacher and student")
    p.add_argument("--out", type=Path, default=RESULTS / "linear_kernels")
    args = p.parse_args()
    report: dict = {"onnxruntime": ort.__version__, "threads": args.threads,
                    "command": "python benchmarks/linear_kernels.py " + " ".join(sys.argv[1:]),
                    "kernels": kernels(args.sizes, args.batch, args.threads, args.rounds,
                                       args.min_time)}
    if args.width:
        with tempfile.TemporaryDirectory() as tmp:
            r = mlp(args.width, args.threads, args.epochs, args.rounds, args.min_time, Path(tmp))
        lat = {n: v["latency_ms"][1] for n, v in r["models"].items()}
        r["ratios"] = [(a, b, lat[a] / lat[b]) for a in ("lowbit_nbits", "lowbit_nbits_lut")
                       for b in ("ort_dynamic", "ort_static", "fp32")]
        report["mlp"] = r
    write_report(args.out.with_suffix(".json"), report)  # adds the machine
    report = json.loads(args.out.with_suffix(".json").read_text())
    atomic_write(args.out.with_suffix(".md"), lambda path: path.write_text(markdown(report)))
    print(markdown(report))


if __name__ == "__main__":
    main()
