"""Bring-your-own-model table: torchvision-style networks, ternary and 4-bit, in onnxruntime.

For each architecture of the acceptance tests' zoo (``tests/zoo_torchvision.py``: small-width
ResNet18, ResNet50, MobileNetV2, MobileNetV3-small, an EfficientNet-B0 MBConv stack, a
Conv1d DS-CNN) and each weight width: quantize, distill a few steps on synthetic data,
export, and measure the file's bits per quantized weight (whole file, metadata included),
the gate's top-1 agreement (integer kernels), the conv/linear layers onnxruntime runs as
integer kernels, and onnxruntime latency at batch 1 and 8 against the float ONNX of the same
network, measured in the same run (median over interleaved rounds).

    python benchmarks/your_models.py --threads 2            # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
from common import float_onnx, save_results

import lowbit
from lowbit.export import export
from lowbit.quant import quantize
from lowbit.runtime._bench import time_calls
from lowbit.runtime._session import session_options

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the zoo the acceptance tests run
import zoo_torchvision as zoo  # noqa: E402


def latency_ms(models: dict[str, bytes], shape: tuple[int, ...], batches: list[int],
               threads: int, rounds: int, min_time: float) -> dict[str, dict[int, float]]:
    """Median ms per call of each model at each batch, rounds interleaved across models."""
    sessions = {n: ort.InferenceSession(m, session_options(threads),
                                        providers=["CPUExecutionProvider"])
                for n, m in models.items()}
    out: dict[str, dict[int, float]] = {n: {} for n in models}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        times: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(rounds):
            for n, s in sessions.items():
                times[n] += time_calls(lambda s=s, x=x: s.run(None, {"input": x}), warmup=2,
                                       repeat=3, min_time=min_time)
        for n in models:
            out[n][b] = float(np.median(times[n]) * 1e3)
    return out


def measure(arch: str, bits: int, args: argparse.Namespace, tmp: Path) -> dict:
    _, shape, classes = zoo.ARCHS[arch]
    data = zoo.synthetic_data(shape, classes, n=args.images)
    teacher = zoo.teacher(arch, data)
    student = quantize(teacher, weight_bits=bits)
    student, _ = lowbit.distill(student, teacher, data, epochs=1, batch_size=32, lr=0.01,
                                progress=False)
    example = (data.images[:1].float() - 127.5) / 64
    path = tmp / f"{arch}_w{bits}.onnx"
    result = export(student.eval(), path, example_input=example, formats=("onnx",), data=data)
    n_weights = sum(m.weight.numel() for m in teacher.modules()
                    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)))
    lat = latency_ms({"lowbit": path.read_bytes(), "float": float_onnx(teacher, example)},
                     shape, args.batch, args.threads, args.rounds, args.min_time)
    check = result.verification["onnx-int"]
    return {"arch": arch, "weight_bits": bits, "quantized_weights": n_weights,
            "file_bytes": path.stat().st_size,
            "bits_per_weight": path.stat().st_size * 8 / n_weights,
            "agreement": check.agreement, "verified_on": check.n,
            "integer_kernels": result.kernels["integer"],
            "float_kernels": result.kernels["float"],
            "latency_ms": {str(b): lat["lowbit"][b] for b in args.batch},
            "float_latency_ms": {str(b): lat["float"][b] for b in args.batch},
            "vs_float": {str(b): lat["lowbit"][b] / lat["float"][b] for b in args.batch}}


def markdown(report: dict) -> str:
    batches = report["batches"]
    lines = [f"Your own model: small-width torchvision-style networks, {report['images']} "
             f"synthetic images, 1 distillation epoch; onnxruntime {report['onnxruntime']}, "
             f"{report['threads']} threads. Bits/weight: whole file (metadata included) per "
             f"conv/linear weight. Kernels: conv/linear layers onnxruntime runs as integer / "
             f"float kernels (Linear layers are float Gemm, see README).", "",
             "| model | weight bits | weights | file bytes | bits/weight | agreement | "
             "integer / float kernels | " +
             " | ".join(f"b{b} ms (x float)" for b in batches) + " |",
             "|---" * (7 + len(batches)) + "|"]
    for r in report["rows"]:
        cells = [f"{r['latency_ms'][str(b)]:.3f} ({r['vs_float'][str(b)]:.2f}x)"
                 for b in batches]
        lines.append(f"| {r['arch']} | {r['weight_bits']} | {r['quantized_weights']:,} | "
                     f"{r['file_bytes']:,} | {r['bits_per_weight']:.2f} | "
                     f"{r['agreement']:.2%} ({r['verified_on']}) | "
                     f"{r['integer_kernels']} / {r['float_kernels']} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(zoo.ARCHS), choices=list(zoo.ARCHS))
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    p.add_argument("--images", type=int, default=128, help="synthetic distillation images")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per model per round")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(arch, bits, args, Path(tmp)) for arch in args.arch for bits in args.bits]
    report = {"onnxruntime": ort.__version__, "threads": args.threads, "images": args.images,
              "batches": args.batch, "rows": rows}
    md = markdown(report)
    save_results(Path(args.out) / "your_models", report, md)
    print(md)


if __name__ == "__main__":
    main()
