"""Top-1 agreement of an exported ONNX with its PyTorch student under onnxruntime settings.

Shows which onnxruntime graph optimisation changes the exported model's numerics (e.g. the
int32 bias rounding of ``WeightBiasQuantization`` when it fuses QLinearConv).
usage: python benchmarks/ort_optimizer_agreement.py STUDENT.pt MODEL.onnx --data cifar10:DIR
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import torch

from lowbit import _checkpoint, data

SETTINGS = {
    "default (all)": ({}, None),
    "all, WeightBiasQuantization off": ({"disabled_optimizers": ["WeightBiasQuantization"]}, None),
    "basic": ({}, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    "disable all": ({}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("student", help="lowbit student checkpoint (.pt)")
    p.add_argument("onnx", help="its exported .onnx (export with --min-agreement 0 to keep it)")
    p.add_argument("--data", required=True, help="cifar10:DIR or digits")
    p.add_argument("--limit", type=int, default=2000, help="test images")
    args = p.parse_args()
    model, _ = _checkpoint.load_model(args.student)
    test = data.load(args.data, train=False).subset(args.limit)
    x = data.normalize(test.images, test.mean, test.std)
    with torch.inference_mode():
        ref = model(x).numpy()
    print(f"{len(x)} {test.name} test images; PyTorch student vs onnxruntime {ort.__version__}")
    for name, (kwargs, level) in SETTINGS.items():
        so = ort.SessionOptions()
        if level is not None:
            so.graph_optimization_level = level
        sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"], **kwargs)
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        agree = float(np.mean(out.argmax(1) == ref.argmax(1)))
        diff = float(np.abs(out - ref).max())
        print(f"{name:34s} top-1 agreement {agree:.2%}, max |logit diff| {diff:.3f}")


if __name__ == "__main__":
    main()
