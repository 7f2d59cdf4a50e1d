"""QAT step speed: lowbit's quantizers vs Brevitas' defaults vs float training, one process.

One SGD step (forward, cross-entropy, backward, update) of ResNet20 on a batch of random
32x32 images, channels_last, for:

* ``float``            the float model (the baseline)
* ``lowbit``           ``quantize(resnet20)``: ternary TWN weights, 4-bit activations with a
                       learned range and the fused fake-quant (ranges initialised beforehand)
* ``lowbit+teacher``   the same plus a no-grad forward of a float teacher (distillation)
* ``brevitas_default`` the same layers with Brevitas' default quantizers (per-channel abs-max
                       2-bit weights, ``Uint8ActPerTensorFloat`` at 4 bits: percentile
                       statistics during its first 300 steps, where this runs)

each in fp32 and bf16 autocast. Configurations are interleaved step by step over ``--rounds``
rounds and the median step time is kept, so background load hits all of them alike.
Writes ``benchmarks/results/quant_speed.{json,md}``. Reproduce:
``python benchmarks/quant_speed.py --threads 2``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantLinear, QuantReLU
from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
from common import write_report

from lowbit import models
from lowbit._io import atomic_write
from lowbit.quant import calibrate, quantize

RESULTS = Path(__file__).resolve().parent / "results"


def brevitas_default(model: nn.Module) -> nn.Module:
    """ResNet20 with Brevitas' stock quantizers in place of every conv/linear/ReLU."""
    for name, m in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(m, nn.Conv2d):
            new = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                              bias=False, weight_quant=Int8WeightPerChannelFloat,
                              weight_bit_width=2)
        elif isinstance(m, nn.Linear):
            new = QuantLinear(m.in_features, m.out_features, bias=True,
                              weight_quant=Int8WeightPerChannelFloat)
        elif isinstance(m, nn.ReLU):
            new = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4)
        else:
            continue
        setattr(owner, child, new)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    teacher = models.create("resnet20").to(memory_format=torch.channels_last).eval()
    student = quantize(models.create("resnet20"))
    calibrate(student, [x])
    nets = {"float": models.create("resnet20"), "lowbit": student,
            "lowbit+teacher": student, "brevitas_default": brevitas_default(
                models.create("resnet20"))}
    configs = [(n, prec) for prec in ("fp32", "bf16") for n in nets]
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in nets.items()}
    for m in nets.values():
        m.to(memory_format=torch.channels_last).train()

    def step(name: str, prec: str) -> float:
        auto = (torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16"
                else contextlib.nullcontext())
        t0 = time.perf_counter()
        with auto:
            if name == "lowbit+teacher":
                with torch.no_grad():
                    teacher(x)
            loss = F.cross_entropy(nets[name](x).float(), y)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        return time.perf_counter() - t0

    times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds + 1):
        for c in configs:
            t = step(*c)
            if r:  # round 0 warms up
                times[c].append(t)
    rows = []
    for name, prec in configs:
        ips = args.batch / statistics.median(times[(name, prec)])
        rows.append({"config": name, "precision": prec, "img_per_s": round(ips, 1)})
    for r in rows:
        base = next(b for b in rows if b["config"] == "float" and b["precision"] == "fp32")
        same = next(b for b in rows if b["config"] == "float" and b["precision"] == r["precision"])
        r["vs_float_fp32"] = round(r["img_per_s"] / base["img_per_s"], 3)
        r["vs_float_same_precision"] = round(r["img_per_s"] / same["img_per_s"], 3)
    write_report(RESULTS / "quant_speed.json", {"threads": args.threads, "batch": args.batch,
                                              "rounds": args.rounds, "rows": rows})
    keys = ["config", "precision", "img_per_s", "vs_float_fp32", "vs_float_same_precision"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    atomic_write(RESULTS / "quant_speed.md", lambda f: f.write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
