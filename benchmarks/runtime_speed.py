"""Runtime speed: lowbit's ternary / 4-bit ResNet20 in onnxruntime vs the baselines, one run.

Builds (full install) the ONNX files of one ResNet20, or takes any ``--model NAME=PATH``:

* ``float``        torch.onnx.export of the float model (onnxruntime folds BatchNorm)
* ``ort_int8``     onnxruntime's own ``quantize_static`` (QDQ, per-channel int8, MinMax;
  ``reduce_range`` (7-bit weights) on x86 without VNNI, as onnxruntime advises there)
* ``brevitas_qcdq`` Brevitas' QCDQ export of the ternary student (``common.brevitas_qcdq``)
* ``lowbit_w2``    ``lowbit.export`` of the ternary student (trits, 1.6 bits per weight)
* ``lowbit_w2_floatadd`` the same with ``residual_add="float"`` (no QLinearAdd)
* ``lowbit_w4``    ``lowbit.export`` of the 4-bit student (INT4 weights)

then measures every file with the torch-free runtime (``lowbit.runtime.Session``): latency
per batch size (median over interleaved rounds, so background load hits every model alike),
resident memory after load (a fresh process per model), file size, and top-1 agreement of the
onnxruntime predictions with the PyTorch model each file came from. Writes
``benchmarks/results/runtime_speed.{json,md}``.

The students are the shipped distilled ones (``lowbit.models.pretrained``), else
post-training quantized from the teacher: speed does not depend on how well they were
trained. Reproduce: ``python benchmarks/runtime_speed.py --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REDUCE_RANGE, brevitas_qcdq, brevitas_student, ort_int8, save_results

from lowbit import _datafiles
from lowbit._backend import cpu_features
from lowbit.runtime import Session, resident_bytes
from lowbit.runtime._bench import time_calls

RESULTS = Path(__file__).resolve().parent / "results"


# -- building the files (full install: torch, brevitas, onnx) --------------------------------
def _teacher():
    import torch

    from lowbit import _checkpoint, models

    try:
        path = models.pretrained("resnet20_cifar10")
    except ValueError:
        path = None
    if path is not None and Path(path).is_file():
        return _checkpoint.load_model(path)[0].eval(), str(path)
    torch.manual_seed(0)
    return models.create("resnet20", num_classes=10).eval(), "random init (no shipped teacher)"


def _shipped_student(bits: int):
    """The shipped distilled CIFAR-10 ResNet20 student with ``bits``-bit weights, or None."""
    from lowbit import _checkpoint, models

    path = models.PRETRAINED.get({2: "resnet20_cifar10_ternary", 4: "resnet20_cifar10_w4"}[bits])
    return _checkpoint.load_model(path)[0] if path is not None and path.is_file() else None


def build(out: Path, images: np.ndarray, mean, std, calib: int = 256) -> tuple[dict, dict]:
    """Write the six ONNX files into ``out``; returns {name: path} and {name: reference top-1
    predictions of the PyTorch model each file came from, on ``images``}."""
    import torch

    from lowbit import _onnx_meta, quant
    from lowbit.export import export

    teacher, source = _teacher()
    x = (torch.from_numpy(images).float() - torch.tensor(mean).view(1, -1, 1, 1)) / \
        torch.tensor(std).view(1, -1, 1, 1)
    cal = [x[i:i + 64] for i in range(0, calib, 64)]
    paths, refs = {}, {}

    def predictions(model) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]
                             ).numpy()

    paths["float"] = out / "float.onnx"
    torch.onnx.export(teacher, (x[:1],), str(paths["float"]), dynamo=False, opset_version=17,
                      input_names=[_onnx_meta.INPUT_NAME], output_names=[_onnx_meta.OUTPUT_NAME],
                      dynamic_axes={_onnx_meta.INPUT_NAME: {0: "N"},
                                    _onnx_meta.OUTPUT_NAME: {0: "N"}})
    refs["float"] = predictions(teacher)

    paths["ort_int8"] = out / "ort_int8.onnx"
    with tempfile.TemporaryDirectory() as tmp:  # U8S8 per-channel QDQ (common.ort_int8)
        paths["ort_int8"].write_bytes(ort_int8(paths["float"].read_bytes(), Path(tmp), [
            {_onnx_meta.INPUT_NAME: b.numpy()} for b in cal]))
    refs["ort_int8"] = refs["float"]  # a different model: agreement with the float teacher

    for bits in (2, 4):
        student = _shipped_student(bits)
        if student is None:  # no shipped student: post-training quantize the teacher
            student = quant.quantize(teacher, weight_bits=bits, act_bits=4)
            quant.calibrate(student, cal)
        student.eval()
        info = {"name": "cifar10", "classes": [str(i) for i in range(10)],
                "mean": list(mean), "std": list(std), "input_shape": [3, 32, 32]}
        name = f"lowbit_w{bits}"
        paths[name] = out / f"{name}.onnx"
        export(student, paths[name], formats=("onnx",), verify=x[:256], data=info)
        refs[name] = predictions(student)
        if bits == 2:  # residual adds kept in float (the exact form "auto" falls back to)
            paths[name + "_floatadd"] = out / f"{name}_floatadd.onnx"
            export(student, paths[name + "_floatadd"], formats=("onnx",), verify=x[:256],
                   data=info, residual_add="float")
            refs[name + "_floatadd"] = refs[name]
            paths["brevitas_qcdq"] = out / "brevitas_qcdq.onnx"
            paths["brevitas_qcdq"].write_bytes(brevitas_qcdq(brevitas_student(student), x[:1]))
            refs["brevitas_qcdq"] = refs[name]
    print(f"built {len(paths)} files from {source}", file=sys.stderr)
    return paths, refs


# -- measuring (torch-free) --------------------------------------------------------------------
def _rss_worker(path: str, threads: int) -> None:
    """Child process: print resident bytes before and after loading ``path``."""
    before = resident_bytes()
    s = Session(path, threads=threads)
    s.run(np.zeros((1, *s.info.input_shape), np.float32))  # first run allocates the arena
    print(json.dumps({"before": before, "after": resident_bytes()}))


def resident_after_load(path: Path, threads: int) -> dict:
    """RSS of a fresh process (python + numpy + onnxruntime) after loading one model."""
    res = subprocess.run([sys.executable, __file__, "--rss-worker", str(path),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(paths: dict[str, Path], images: np.ndarray, batches: list[int], threads: int,
            rounds: int, min_time: float) -> dict:
    """Latency per model and batch (median over ``rounds`` interleaved rounds), predictions."""
    sessions = {name: Session(p, threads=threads) for name, p in paths.items()}
    rng = np.random.default_rng(0)
    result: dict = {name: {"latency_ms": {}, "runs": {}} for name in paths}
    for b in batches:
        x = rng.integers(0, 256, (b, *images.shape[1:]), dtype=np.uint8)
        feeds = {n: s.normalize(x) if s.info.mean else
                 ((x.astype(np.float32) - MEAN) / STD).astype(np.float32)
                 for n, s in sessions.items()}
        times: dict[str, list[float]] = {n: [] for n in sessions}
        for n, s in sessions.items():  # warm-up
            time_calls(lambda s=s, f=feeds[n]: s._call(f), warmup=3, repeat=1, min_time=0)
        for _ in range(rounds):
            for n, s in sessions.items():
                times[n] += time_calls(lambda s=s, f=feeds[n]: s._call(f), warmup=0,
                                       repeat=3, min_time=min_time)
        for n in sessions:
            result[n]["latency_ms"][b] = float(np.median(times[n]) * 1e3)
            result[n]["runs"][b] = len(times[n])
    for n, s in sessions.items():
        x = images if s.info.mean else ((images.astype(np.float32) - MEAN) / STD
                                        ).astype(np.float32)
        result[n]["predictions"] = s.predict(x)
    return result


MEAN = np.array(_datafiles.CIFAR["cifar10"]["mean"], np.float32).reshape(1, -1, 1, 1)
STD = np.array(_datafiles.CIFAR["cifar10"]["std"], np.float32).reshape(1, -1, 1, 1)


def markdown(report: dict) -> str:
    batches = report["batches"]
    head = ("| model | file bytes | RSS after load MiB | agreement | "
            + " | ".join(f"b{b} ms (x float)" for b in batches) + " |")
    lines = [f"Runtime speed, ResNet20 CIFAR-10, onnxruntime {report['onnxruntime']}, "
             f"{report['threads']} threads, {report['cpu']}; {report['source']}.", "",
             head, "|---" * (4 + len(batches)) + "|"]
    for name, r in report["models"].items():
        cells = [f"{r['latency_ms'][str(b)]:.3f} ({r['vs_float'][str(b)]:.2f}x)"
                 for b in batches]
        agree = f"{r['agreement']:.2%}" if r.get("agreement") is not None else "-"
        lines.append(f"| {name} | {r['file_bytes']:,} | {r['rss_after_load'] / 2**20:.1f} | "
                     f"{agree} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="measure these files instead of building the six (repeatable)")
    p.add_argument("--build-dir", default="benchmarks/results/runtime_models",
                   help="where the built ONNX files go")
    p.add_argument("--data", default=None,
                   help="cifar10:DIR for agreement images (default: $LOWBIT_DATA, else random)")
    p.add_argument("--images", type=int, default=10000, help="images for the agreement check")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per model per round")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_worker:
        _rss_worker(args.rss_worker, args.threads)
        return

    spec = args.data or (f"cifar10:{os.environ['LOWBIT_DATA']}" if os.environ.get("LOWBIT_DATA")
                         else None)
    if spec:
        test = _datafiles.load(spec, train=False)
        images = test.images[:args.images]
    else:
        images = np.random.default_rng(1).integers(0, 256, (args.images, 3, 32, 32), np.uint8)
    refs: dict = {}
    source = "given files"
    if args.model:
        paths = {n: Path(p) for n, _, p in (m.partition("=") for m in args.model)}
    else:
        out = Path(args.build_dir)
        out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        paths, refs = build(out, images, MEAN.ravel().tolist(), STD.ravel().tolist())
        source = f"built in {time.time() - t:.0f} s"
    res = measure(paths, images, args.batch, args.threads, args.rounds, args.min_time)
    import onnxruntime

    cpu = cpu_features()
    report = {"onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "cpu": f"{cpu['cpu']} ({', '.join(cpu['flags']) or 'no AVX2'}; uint8 x int8 "
                     f"kernels: {cpu['u8s8']}), {os.cpu_count()} logical CPUs",
              "ort_int8_reduce_range": REDUCE_RANGE if not args.model else None,
              "batches": args.batch,
              "images": len(images), "source": f"{source}; agreement on {len(images)} "
              f"{'CIFAR-10 test' if spec else 'random'} images", "models": {}}
    base = res.get("float", next(iter(res.values())))["latency_ms"]
    for name, r in res.items():
        preds = r.pop("predictions")
        rss = resident_after_load(paths[name], args.threads)
        report["models"][name] = {
            "path": str(paths[name]), "file_bytes": paths[name].stat().st_size,
            "rss_after_load": rss["after"], "rss_model": rss["after"] - rss["before"],
            "latency_ms": {str(b): v for b, v in r["latency_ms"].items()},
            "vs_float": {str(b): v / base[b] for b, v in r["latency_ms"].items()},
            "throughput": {str(b): b / v * 1e3 for b, v in r["latency_ms"].items()},
            "runs": {str(b): v for b, v in r["runs"].items()},
            "agreement": float((preds == refs[name]).mean()) if name in refs else None}
    md = markdown(report)
    save_results(Path(args.out) / "runtime_speed", report, md)
    print(md)


if __name__ == "__main__":
    main()
