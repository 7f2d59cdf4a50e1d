"""Bits per quantized weight on disk (whole file): lowbit vs float ONNX vs Brevitas' exports.

For ternary (2-bit) and 4-bit students of ResNet20 and the digits CNN, one run writes

* ``float``         ``torch.onnx.export`` of the float model (BatchNorm folded by torch)
* ``brevitas_qcdq`` Brevitas ``export_onnx_qcdq`` of the student (QuantizeLinear/Clip/
                    DequantizeLinear, weights as int8)
* ``brevitas_qonnx`` Brevitas ``export_qonnx`` of the student (Quant nodes, float weights)
* ``lowbit``        ``lowbit.export`` (INT2/INT4 packed weights, opset 25, verified)

and reports file bytes, bits per quantized weight (file bits / conv+linear weights) and the
lowbit file's verification (top-1 agreement with the PyTorch student, max logit difference).
Students are post-training quantized (``quantize`` + ``calibrate``) from ``--resnet20 CKPT``
(default: the shipped CIFAR-10 teacher when present, else random init with random
BatchNorm statistics) and from a digits CNN
trained here for a few epochs; ``--student2/--student4`` take distilled ResNet20 students
(with ``--data cifar10:DIR``, default: the shipped ones).
Verification uses the CIFAR-10 test set when ``--data cifar10:DIR`` is given, else 256
random inputs (digits: its test split). Writes ``benchmarks/results/export_size.{json,md}``.
Reproduce: ``python benchmarks/export_size.py --data cifar10:$LOWBIT_DATA``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from common import brevitas_qcdq, brevitas_student, float_onnx, write_report

from lowbit import _checkpoint, data, models
from lowbit._io import atomic_write
from lowbit.data import normalize
from lowbit.distill import train
from lowbit.export import Thresholds, export
from lowbit.quant import calibrate, quantize

RESULTS = Path(__file__).resolve().parent / "results"


def n_weights(model: nn.Module) -> int:
    """Weights of every conv/linear layer (what gets quantized)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def brevitas_sizes(student: nn.Module, example: torch.Tensor) -> dict[str, int]:
    from brevitas.export import export_qonnx

    ready = brevitas_student(student)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        export_qonnx(ready.eval(), args=example, export_path=buf, dynamo=False)
    return {"brevitas_qcdq": len(brevitas_qcdq(ready, example)),
            "brevitas_qonnx": len(buf.getvalue())}


def digits_model() -> nn.Module:
    model, _ = train(models.create("digits_cnn"), data.digits(train=True), epochs=10,
                     batch_size=64, lr=0.1, progress=False)
    return model.eval()


def measure(name: str, float_model: nn.Module, student: nn.Module, bits: int, verify,
            info, example: torch.Tensor, thresholds: Thresholds) -> dict:
    n = n_weights(float_model)
    sizes = {"float": len(float_onnx(float_model, example)), **brevitas_sizes(student, example)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.onnx"
        # an open gate so the size is measured either way; pass/fail judged below
        result = export(student, out, example_input=example, formats=("onnx",),
                        verify=verify, data=info, thresholds=Thresholds(0.0, float("inf")))
        sizes["lowbit"] = out.stat().st_size
        check = result.verification["onnx"].to_dict()
    check["passed"] = check["agreement"] >= thresholds.min_agreement and \
        check["median_steps"] <= thresholds.max_steps
    row = {"model": name, "bits": bits, "weights": n, "bytes": sizes,
           "bits_per_weight": {k: v * 8 / n for k, v in sizes.items()}, "verification": check}
    print(name, bits, {k: round(v, 2) for k, v in row["bits_per_weight"].items()}, check)
    return row


def markdown(rows: list[dict]) -> str:
    cols = ["float", "brevitas_qcdq", "brevitas_qonnx", "lowbit"]
    lines = ["| model | weight bits | quantized weights | " + " | ".join(cols) +
             " | lowbit top-1 agreement | max logit diff (steps) |",
             "|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for r in rows:
        bpw = r["bits_per_weight"]
        v = r["verification"]
        agree = f"{v['agreement']:.2%} ({v['n']} {v['source']})" + \
            ("" if v["passed"] else " FAILS the gate")
        steps = f"{v['max_diff']:.3g} ({v['max_steps']:.2f})"
        cells = [f"{r['bytes'][c]:,} B = {bpw[c]:.2f}" for c in cols]
        lines.append(f"| {r['model']} | {r['bits']} | {r['weights']:,} | " + " | ".join(cells)
                     + f" | {agree} | {steps} |")
    return "\n".join(lines) + "\n\nCells: whole-file bytes = bits per quantized weight.\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="cifar10:DIR for CIFAR verification/calibration")
    p.add_argument("--resnet20", default=None, help="float ResNet20 checkpoint")
    p.add_argument("--student2", default=None, help="distilled ternary ResNet20 checkpoint "
                   "(default: the shipped resnet20_cifar10_ternary with --data, else PTQ)")
    p.add_argument("--student4", default=None, help="distilled 4-bit ResNet20 checkpoint "
                   "(default: the shipped resnet20_cifar10_w4 with --data, else PTQ)")
    p.add_argument("--min-agreement", type=float, default=0.999)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    thresholds = Thresholds(min_agreement=args.min_agreement)

    rows = []
    ckpt = args.resnet20 or models.pretrained("resnet20_cifar10")
    if Path(ckpt).is_file():
        resnet, info = _checkpoint.load_model(ckpt)[0], _checkpoint.load(ckpt)["data"]
    else:
        torch.manual_seed(0)
        resnet = models.create("resnet20").eval()
        # BatchNorm statistics like a trained network's: init ones fold to zero biases that
        # share one initializer, which would flatter the file size
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
        info = {"name": "random", "classes": [str(i) for i in range(10)], "mean": [0.0] * 3,
                "std": [1.0] * 3, "input_shape": [3, 32, 32]}
    if args.data:
        test, train = data.load(args.data, train=False), data.load(args.data, train=True)
        calib = [normalize(train.images[i:i + 128], train.mean, train.std)
                 for i in range(0, 512, 128)]
        verify = test
    else:
        gen = torch.Generator().manual_seed(0)
        calib, verify = [torch.randn(128, 3, 32, 32, generator=gen)], None
    example = torch.zeros(1, 3, 32, 32)
    shipped = {2: "resnet20_cifar10_ternary", 4: "resnet20_cifar10_w4"}
    for bits, given in [(2, args.student2), (4, args.student4)]:
        if given is None and args.data and models.PRETRAINED[shipped[bits]].is_file():
            given = models.PRETRAINED[shipped[bits]]  # CIFAR-10 students for CIFAR-10 data
        student = _checkpoint.load_model(given)[0] if given else \
            calibrate(quantize(resnet, weight_bits=bits), calib).eval()
        rows.append(measure("resnet20", resnet, student, bits, verify, info, example,
                            thresholds))

    digits = digits_model()
    d_train, d_test = data.digits(train=True), data.digits(train=False)
    d_calib = [normalize(d_train.images[:512], d_train.mean, d_train.std)]
    for bits in (2, 4):
        student = calibrate(quantize(digits, weight_bits=bits), d_calib).eval()
        rows.append(measure("digits_cnn", digits, student, bits, d_test, d_test,
                            torch.zeros(1, 1, 8, 8), thresholds))

    RESULTS.mkdir(exist_ok=True)
    write_report(RESULTS / "export_size.json", {"rows": rows, "resnet20": str(ckpt),
                                             "verification_data": args.data or "random"})
    atomic_write(RESULTS / "export_size.md", lambda f: f.write_text(markdown(rows)))


if __name__ == "__main__":
    main()
