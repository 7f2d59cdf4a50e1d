"""A shipped student as a raw-uint8-input file vs the float-input file, on the CIFAR-10 test set.

Exports the student twice (``input="float"``, the default, and ``input="uint8"``), each gated
on the test images, then runs both with plain ``onnxruntime.InferenceSession`` (one thread):
top-1 agreement with the PyTorch student and accuracy on all test images (the uint8 file fed
the official pickle's bytes as they are), file sizes, and batch-1 latency in one interleaved
run: the uint8 file on pixels, the float file on pre-normalised floats and with numpy's
normalisation (``lowbit._pixels``) counted, as an app without lowbit would run it. Also the
student's accuracy with the loader's former ``(x - m) / s`` in torch (the shared table must
give the same) and the float file's with the runtime's former ``(x - m) * (1 / s)``.
Writes ``benchmarks/results/raw_pixels.{json,md}``. Reproduce: ``python
benchmarks/raw_pixels.py --cifar10 ../shared/data/cifar-10-batches-py``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import save_results

from lowbit import _checkpoint, _pixels, data
from lowbit._backend import cpu_features
from lowbit.export import export
from lowbit.runtime._bench import time_calls

RESULTS = Path(__file__).resolve().parent / "results"


def classes(session: ort.InferenceSession, x: np.ndarray, batch: int = 500) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def measure(name: str, cifar10: str, limit: int, rounds: int) -> dict:
    model, ckpt = _checkpoint.load_model(name)
    test = data.load(f"cifar10:{cifar10}", train=False)
    test = test.subset(limit) if limit else test
    pixels, labels = test.images.numpy(), test.labels.numpy()
    mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]
    with torch.no_grad():
        student = torch.cat([model(x).argmax(1) for x, _ in test.loader(500)]).numpy()
        m, s = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        former = torch.cat([model((x.float() - m) / s).argmax(1)
                            for x in test.images.split(500)]).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    out: dict = {"student": name, "images": len(labels),
                 "student_acc": float(np.mean(student == labels)),
                 "student_acc_former_loader": float(np.mean(former == labels))}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for form in ("float", "uint8"):
            path = Path(tmp) / f"{form}.onnx"
            result = export(model, path, verify=test, data=ckpt["data"], formats=("onnx",),
                            input=form, progress=False)
            out[f"{form}_gate_agreement"] = result.verification["onnx-int"].agreement
            out[f"{form}_bytes"] = path.stat().st_size
            sessions[form] = ort.InferenceSession(str(path), so,
                                                  providers=["CPUExecutionProvider"])
    normalised = _pixels.normalize(pixels, mean, std)
    got = {"uint8": classes(sessions["uint8"], pixels),
           "float": classes(sessions["float"], normalised)}
    inv = (np.asarray(pixels, np.float32) - np.float32(mean).reshape(1, -1, 1, 1)) \
        * (1 / np.float32(std).reshape(1, -1, 1, 1))
    former_runtime = classes(sessions["float"], inv)
    for form, c in got.items():
        out[f"{form}_agreement"] = float(np.mean(c == student))
        out[f"{form}_acc"] = float(np.mean(c == labels))
    out["float_acc_former_runtime"] = float(np.mean(former_runtime == labels))
    out["inputs_differing_former_runtime"] = int((inv != normalised).sum())
    one_px, one_x = pixels[:1], normalised[:1]
    run = {"uint8": lambda: sessions["uint8"].run(None, {"input": one_px}),
           "float": lambda: sessions["float"].run(None, {"input": one_x}),
           "float+normalise": lambda: sessions["float"].run(
               None, {"input": _pixels.normalize(one_px, mean, std)})}
    times: dict[str, list[float]] = {k: [] for k in run}
    for _ in range(rounds):  # interleaved: the machine's load hits all three alike
        for k, f in run.items():
            times[k] += time_calls(f, warmup=20, repeat=200, min_time=0.2)
    out["latency_ms_batch1"] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return out


def markdown(r: dict, cpu: dict) -> str:
    lat = r["latency_ms_batch1"]
    return "\n".join([
        f"{r['student']} on {r['images']:,} CIFAR-10 test images, {cpu['cpu']} "
        f"({', '.join(cpu['flags'])}), plain onnxruntime, 1 thread.", "",
        "| input | file bytes | top-1 agreement with the student | accuracy | batch-1 latency "
        "(median) |", "|---|---|---|---|---|",
        f"| uint8 raw pixels | {r['uint8_bytes']:,} | {r['uint8_agreement']:.2%} | "
        f"{r['uint8_acc']:.2%} | {lat['uint8']:.3f} ms |",
        f"| float (normalised) | {r['float_bytes']:,} | {r['float_agreement']:.2%} | "
        f"{r['float_acc']:.2%} | {lat['float']:.3f} ms (+ numpy normalisation: "
        f"{lat['float+normalise']:.3f} ms) |", "",
        f"Student (PyTorch): {r['student_acc']:.2%}; with the loader's former torch formula: "
        f"{r['student_acc_former_loader']:.2%}. Float file with the runtime's former "
        f"multiply-by-1/std: {r['float_acc_former_runtime']:.2%} "
        f"({r['inputs_differing_former_runtime']:,} input values differ)."]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar10", required=True, help="directory holding cifar-10-batches-py")
    p.add_argument("--student", default="resnet20_cifar10_ternary")
    p.add_argument("--limit", type=int, default=0, help="test images (0: all)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    args = p.parse_args()
    r = measure(args.student, args.cifar10, args.limit, args.rounds)
    md = markdown(r, cpu_features())
    save_results(RESULTS / "raw_pixels", r, md)
    print(md)


if __name__ == "__main__":
    main()
