"""A ternary ViT end to end in onnxruntime: latency, memory and accuracy against fp32 and
onnxruntime's own int8 models of the same float network, in one run.

Models (interleaved timing rounds, so background load hits every model alike):

* ``fp32``              the float network as plain ONNX
* ``ort_dynamic``       onnxruntime's ``quantize_dynamic`` of it (int8 weights)
* ``ort_static``        onnxruntime's ``quantize_static`` (QDQ, per-channel int8, uint8
  activations, calibrated on training images; ``reduce_range`` on x86 without VNNI)
* ``lowbit_qdq``        lowbit's portable file of the ternary student (Linear layers over
  tokens as integer MatMul)
* ``lowbit_nbits``      Linear layers as MatMulNBits, 2-bit, ``accuracy_level`` 4
* ``lowbit_nbits_lut``  the same with the session entry ``mlas.use_lut_gemm=1``
* ``lowbit_nbits_fp32`` MatMulNBits at ``accuracy_level`` 1 (float input: the exact gate)

A lowbit file that fails its gate is not written: the benchmark reports the gate's message
instead of timing it.

Per model: file bytes, median ms per call at batch 1 and 8, the process memory one session
takes (resident memory of a fresh process after loading it and one batch-1 run, minus the
same process before: ``session_mb``), and on CIFAR-10 test images the accuracy and top-1
agreement (lowbit files with the student, the others with the float network).

With ``--teacher`` and ``--student`` (checkpoints of ``lowbit train``/``lowbit distill``):
the trained ViT; without, ``vit_tiny`` at ``--dim``/``--depth`` with random weights, its
student calibrated post-training: latency and memory only (a width whose weights leave the
cache). Writes ``benchmarks/results/transformer[_NAME].{json,md}``.

Reproduce: ``python benchmarks/transformer.py --teacher runs/vit_tiny_cifar10.pt --student
runs/vit_tiny_cifar10_ternary_hidden.pt --cifar10 DIR`` and ``python
benchmarks/transformer.py --dim 512 --depth 4 --name wide``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import batch_latency, comparison_footer, float_onnx, ort_int8, save_results

import lowbit
from lowbit.export import ExportError, NBits, export
from lowbit.runtime import Session

RESULTS = Path(__file__).resolve().parent / "results"
ORT_MODELS = ("fp32", "ort_dynamic", "ort_static")
_RSS = """
import sys, numpy as np
import lowbit.runtime

def rss():  # resident MB now
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

base = rss()
s = lowbit.runtime.Session(sys.argv[1], threads=int(sys.argv[2]))
s.run(np.zeros([1, 3, 32, 32], np.float32))
print(rss() - base)
"""

def _models(args: argparse.Namespace) -> tuple:
    """(float teacher, student, test images, test labels, calibration images)."""
    from lowbit import data, models, quant

    if args.teacher:
        teacher = lowbit.load_model(args.teacher)[0].eval()
        student = lowbit.load_model(args.student)[0].eval()
    else:
        torch.manual_seed(0)
        teacher = models.create("vit_tiny", dim=args.dim, depth=args.depth,
                                heads=args.dim // 32).eval()
        student = quant.quantize(teacher, weight_bits=2, act_bits=8)
    if args.cifar10:
        train = data.as_data(data.load(f"cifar10:{args.cifar10}", train=True))
        test = data.as_data(data.load(f"cifar10:{args.cifar10}", train=False),
                            stats=data.stats_of(train))
        x, y = (t[:args.test] for t in next(iter(test.loader(args.test))))
        calib = next(iter(train.loader(256)))[0]
    else:
        x, y = torch.randn(args.test, 3, 32, 32), None
        calib = torch.randn(256, 3, 32, 32)
    if not args.teacher:
        quant.calibrate(student, [calib])
        student.eval()
    return teacher, student, x, y, calib


def _files(teacher, student, x, calib, tmp: Path, real: bool) -> tuple[dict[str, Path], dict]:
    """Every model's file and the lowbit gates' one-line results (on test images when
    ``real``, else on the gate's random inputs, where only the logit bound is gated)."""
    files, gates = {}, {}
    for name, kw in {"lowbit_qdq": {},
                     "lowbit_nbits": {"linear_kernel": "nbits"},
                     "lowbit_nbits_lut": {"linear_kernel": "nbits",
                                          "nbits": NBits(lut_gemm=True)},
                     "lowbit_nbits_fp32": {"linear_kernel": "nbits",
                                           "nbits": NBits(accuracy_level=1)}}.items():
        try:
            result = export(student, tmp / f"{name}.onnx", example_input=x[:1],
                            formats=("onnx",), verify=x[:500] if real else None,
                            progress=False, **kw)
        except ExportError as exc:  # a failed gate writes nothing: reported, not timed
            gates[name] = [f"FAILED: {exc}"]
            continue
        files[name] = tmp / f"{name}.onnx"
        gates[name] = [str(v) for v in result.verification.values()]
    fp32 = float_onnx(teacher, x[:1])
    files["fp32"] = tmp / "fp32.onnx"
    files["fp32"].write_bytes(fp32)
    feeds = [{"input": calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)]
    for name, f in (("ort_dynamic", None), ("ort_static", feeds)):
        files[name] = tmp / f"{name}.onnx"
        files[name].write_bytes(ort_int8(fp32, tmp, f))
    return files, gates


def _session_mb(path: Path, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS, str(path), str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    teacher, student, x, y, calib = _models(args)
    with torch.no_grad():
        refs = {"teacher": teacher(x).argmax(1).numpy(), "student": student(x).argmax(1).numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        files, gates = _files(teacher, student, x, calib, Path(tmp), y is not None)
        sessions = {n: Session(p, threads=args.threads) for n, p in files.items()}
        latency = batch_latency(sessions, x.numpy(), args.rounds, args.min_time)
        out: dict = {"weights": sum(p.numel() for p in teacher.parameters()),
                     "arch": getattr(teacher, "lowbit_arch", None), "gates": gates,
                     "models": {n: {"bytes": p.stat().st_size, "latency_ms": latency[n],
                                    "session_mb": _session_mb(p, args.threads),
                                    "config": sessions[n].config} for n, p in files.items()}}
        for n, s in sessions.items():
            pred = s.predict(x.numpy())
            ref = refs["teacher"] if n in ORT_MODELS else refs["student"]
            out["models"][n]["agreement"] = float((pred == ref).mean())
            if y is not None:
                out["models"][n]["accuracy"] = float((pred == y.numpy()).mean())
    if y is not None:
        out["accuracy"] = {k: float((v == y.numpy()).mean()) for k, v in refs.items()}
    lat = {n: v["latency_ms"][1] for n, v in out["models"].items()}
    out["ratios"] = [(a, b, lat[a] / lat[b]) for a in lat if a.startswith("lowbit")
                     for b in ORT_MODELS]
    return out


def markdown(report: dict) -> str:
    m, r = report["machine"], report["result"]
    lines = [f"ViT ({r['weights']:,} weights: {r['arch']}) in onnxruntime "
             f"{report['onnxruntime']}, {report['threads']} threads, {m['cpu']} (flags: "
             f"{', '.join(m['flags'])}; uint8 x int8 kernels: {m['u8s8']}). Command: "
             f"`{report['command']}`.", ""]
    if "accuracy" in r:
        lines += [f"On the first {report['test']:,} CIFAR-10 test images: float teacher "
                  f"{r['accuracy']['teacher']:.2%}, ternary student "
                  f"{r['accuracy']['student']:.2%}.", ""]
    lines += ["| model | bytes | batch 1 ms | batch 8 ms | session MB | accuracy | agreement |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for n, v in r["models"].items():
        acc = f"{v['accuracy']:.2%}" if "accuracy" in v else "-"
        lines.append(f"| {n} | {v['bytes']:,} | {v['latency_ms']['1']:.3f} | "
                     f"{v['latency_ms']['8']:.3f} | {v['session_mb']:.1f} | {acc} | "
                     f"{v['agreement']:.2%} |")
    lines += comparison_footer(r)
    return "\n".join(lines) + "\n"


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="float ViT checkpoint (with --student)")
    p.add_argument("--student", help="its ternary student's checkpoint")
    p.add_argument("--cifar10", help="CIFAR-10 directory: accuracy on its test images")
    p.add_argument("--test", type=int, default=2000, help="test images (default: 2000)")
    p.add_argument("--dim", type=int, default=512, help="width without checkpoints")
    p.add_argument("--depth", type=int, default=4, help="blocks without checkpoints")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per model and round")
    p.add_argument("--name", default="", help="results/transformer_NAME.{json,md}")
    args = p.parse_args()
    if bool(args.teacher) != bool(args.student):
        p.error("--teacher and --student go together")
    torch.set_num_threads(args.threads)
    report = {"onnxruntime": ort.__version__, "threads": args.threads, "test": args.test,
              "command": "python benchmarks/transformer.py " + " ".join(sys.argv[1:]),
              "result": measure(args)}
    stem = RESULTS / ("transformer" + (f"_{args.name}" if args.name else ""))
    save_results(stem, report, "")
    report = json.loads(stem.with_suffix(".json").read_text())
    save_results(stem, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
