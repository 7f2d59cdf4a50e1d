"""Post-training quantization on digits: what each calibration method costs at ternary and
4-bit weights (4-bit activations), next to the float teacher, in the exported file.

The teacher is the README's digits CNN (20 epochs, validation held out of the training data);
each row is ``lowbit.export`` of it with ``bits`` and ``PTQConfig(method=...)``, its accuracy
measured by the export on the 359 test digits in onnxruntime's integer kernels.

    python benchmarks/ptq_digits.py          # -> benchmarks/results/ptq_digits.{json,md}
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import save_results

import lowbit
from lowbit import data, models
from lowbit.quant import CALIB_METHODS, PTQConfig

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHT_BITS = {"ternary": 2, "4-bit": 4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "ptq_digits"), help="output path stem")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = data.digits(), data.digits(train=False)
    train, val = data.validation_split(train)
    teacher, record = lowbit.train(models.create("digits_cnn", seed=0), train, val, epochs=20,
                                   batch_size=64, lr=0.05, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, bits in WEIGHT_BITS.items():
            for method in CALIB_METHODS:
                result = lowbit.export(teacher, Path(tmp) / f"{label}_{method}.onnx", bits=bits,
                                       act_bits=4, calib=train, verify=test, data=train,
                                       formats=("onnx",), progress=False,
                                       ptq=PTQConfig(method=method, max_drop=1.0))
                rows.append({"weights": label, "method": method, **result.accuracy})
    float_acc = rows[0]["float"]
    lines = [f"digits CNN, float teacher {float_acc:.2%} on the {len(test)} test digits "
             f"(validation {record['val_acc']:.2%} on {len(val)} held out of the training "
             f"data); post-training quantization to 4-bit activations, accuracy of the "
             f"exported file (onnxruntime, integer kernels). Command: `python "
             f"benchmarks/ptq_digits.py`.", "",
             "| weights | " + " | ".join(CALIB_METHODS) + " |",
             "|---|" + "---|" * len(CALIB_METHODS)]
    for label in WEIGHT_BITS:
        accs = {r["method"]: r["onnx"] for r in rows if r["weights"] == label}
        lines.append(f"| {label} | " + " | ".join(f"{accs[m]:.2%}" for m in CALIB_METHODS)
                     + " |")
    save_results(Path(args.out), {"float_test_acc": float_acc, "val_acc": record["val_acc"],
                                  "validation": val.split, "test_examples": len(test),
                                  "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
