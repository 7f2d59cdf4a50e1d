"""Every shipped student exported and checked on its whole test set, on this CPU.

For each shipped student (``lowbit.models.list_pretrained``), ``lowbit.export`` with the gate
run on all 10,000 test images of its dataset: top-1 agreement with the PyTorch student in
onnxruntime's float kernels and in the integer kernels it fuses (what this CPU's family
computes), the arithmetic contract per integer layer (``lowbit.export``'s ``check_kernels``: exact
on every CPU family), the file's size and its test accuracy in the torch-free runtime next to
the student's. Writes ``benchmarks/results/shipped_exports.{json,md}`` with the CPU flags.
Reproduce: ``python benchmarks/shipped_exports.py --cifar10 ../shared/data/cifar-10-batches-py
--cifar100 data/cifar-100-python``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save_results

from lowbit import _checkpoint, data, models
from lowbit._backend import cpu_features
from lowbit.distill import evaluate
from lowbit.export import export
from lowbit.runtime import Session

RESULTS = Path(__file__).resolve().parent / "results"


def row(name: str, dirs: dict[str, str], limit: int) -> dict:
    """Export shipped student ``name`` verified on its test set; what the gate and runtime saw."""
    model, ckpt = _checkpoint.load_model(name)
    kind = ckpt["data"]["name"]
    test = data.load(f"{kind}:{dirs[kind]}", train=False)
    test = test.subset(limit) if limit else test
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        result = export(model, path, verify=test, data=ckpt["data"], formats=("onnx",),
                        progress=False)
        seconds = time.perf_counter() - t
        file_acc = Session(path).evaluate(test)
        size = path.stat().st_size
    v = result.verification
    return {"student": name, "dataset": kind, "images": len(test), "file_bytes": size,
            "storage": sorted(set(result.storage.values())),
            "uint8_layers": [n for n, s in result.storage.items() if s == "uint8"],
            "agreement_float_kernels": v["onnx"].agreement, "agreement_integer_kernels":
            v["onnx-int"].agreement, "near_ties": [v["onnx"].near_ties, v["onnx-int"].near_ties],
            "median_steps": [v["onnx"].median_steps, v["onnx-int"].median_steps],
            "contract_exact": all(c.passed for c in result.contract),
            "integer_layers": len(result.contract),
            "worst_pair": max((c.bound.pair for c in result.contract if c.bound.pair), default=0),
            "student_acc": evaluate(model, test), "file_acc": file_acc,
            "export_seconds": round(seconds, 1)}


def markdown(rows: list[dict], cpu: dict) -> str:
    lines = [f"Shipped students exported on {cpu['cpu']} ({', '.join(cpu['flags'])}; uint8 x "
             f"int8 kernels: {cpu['u8s8']}), gate on the whole test set.", "",
             "| student | file bytes | uint8-stored layers | top-1 agreement float / integer "
             "kernels | student acc | file acc (integer kernels) | integer layers exact on "
             "every CPU |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['file_bytes']:,} | {', '.join(r['uint8_layers'])} "
                     f"| {r['agreement_float_kernels']:.2%} / {r['agreement_integer_kernels']:.2%}"
                     f" | {r['student_acc']:.2%} | {r['file_acc']:.2%} | "
                     f"{r['integer_layers']} {'yes' if r['contract_exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar10", required=True, help="cifar-10-batches-py directory")
    p.add_argument("--cifar100", required=True, help="cifar-100-python directory")
    p.add_argument("--limit", type=int, default=0, help="test images per student (0: all)")
    p.add_argument("--only", nargs="*", default=None, help="these students only")
    args = p.parse_args()
    names = args.only or [n for n in models.list_pretrained()
                          if models.pretrained_info(n)["weight_bits"] is not None]
    rows = []
    for name in names:
        rows.append(row(name, {"cifar10": args.cifar10, "cifar100": args.cifar100}, args.limit))
        print(rows[-1], flush=True)
    cpu = cpu_features()
    md = markdown(rows, cpu)
    save_results(RESULTS / "shipped_exports", {"rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
