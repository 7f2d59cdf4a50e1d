"""The checkpoints shipped in ``lowbit/models/weights``: README states each one's test accuracy,
``lowbit eval`` reproduces it on the full test set, and every shipped student exports through
the default gate on 1,000 test images of its dataset, packed at its real bit widths.

Tests of a dataset skip when it is absent (``LOWBIT_DATA`` for CIFAR-10, ``LOWBIT_CIFAR100``
for CIFAR-100; ``make test`` sets both)."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
import torch.nn as nn
from onnx import TensorProto

from lowbit import _checkpoint, cli, data, models
from lowbit._onnx_meta import TRITS_BITS
from lowbit.export import export
from lowbit.quant import quant_layers

# the table of shipped checkpoints, with the measured figures
README = (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "README.md").read_text()
SHIPPED = {name: models.pretrained_info(name) for name in models.list_pretrained()}
STUDENTS = sorted(name for name, info in SHIPPED.items() if info["weight_bits"] is not None)
STORED_BITS = {"trits": TRITS_BITS, "int2": 2, "int4": 4, "int8": 8, "uint8": 8}
PACKED_TYPE = {"trits": TensorProto.UINT8, "int2": TensorProto.INT2, "int4": TensorProto.INT4,
               "int8": TensorProto.INT8, "uint8": TensorProto.UINT8}


def _test_data(request: pytest.FixtureRequest, dataset: str) -> str:
    """The data spec of ``dataset``'s directory (its fixture skips the test when absent)."""
    return f"{dataset}:{request.getfixturevalue(f'{dataset}_dir')}"


def _readme(name: str, pattern: str) -> str:
    """What README's row for shipped checkpoint ``name`` says (``pattern``'s group 1)."""
    rows = [line for line in README.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"README's table of shipped checkpoints needs one row for {name}"
    claimed = re.search(pattern, rows[0])
    assert claimed, f"README's row for {name} has no {pattern}"
    return claimed[1]


def _readme_accuracy(name: str) -> str:
    return _readme(name, r"\*\*(\d+\.\d\d)%\*\*")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_readme_states_each_shipped_accuracy(name):
    assert _readme_accuracy(name) == f"{SHIPPED[name]['test_acc']:.2%}"[:-1]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_lowbit_eval_reproduces_it(request, capsys, name):
    info = SHIPPED[name]
    assert cli.main(["eval", name, "--data", _test_data(request, info["dataset"])]) == 0
    out = capsys.readouterr().out
    assert f"top-1 accuracy {_readme_accuracy(name)}% on 10,000 {info['dataset']} test" in out


@pytest.mark.parametrize("name", STUDENTS)
def test_shipped_student_passes_the_gate(request, tmp_path, name):
    info = SHIPPED[name]
    student, ckpt = _checkpoint.load_model(models.pretrained(name))
    test = data.load(_test_data(request, info["dataset"]), train=False).subset(1000)
    path = tmp_path / "s.onnx"
    result = export(student, path, data=ckpt["data"], formats=("onnx",),
                    verify=test)  # the default thresholds: raises when they fail
    for check in result.verification.values():  # float and integer kernels
        assert check.passed and check.top1_gated and check.n == 1000
        assert check.agreement + check.near_ties / check.n >= 0.999 and check.median_steps <= 4
    # every conv/linear stored packed at its real width: the file is its codes, one scale
    # and one int32 bias per output channel, and the graph with its metadata (ResNet20:
    # 278 nodes and their names, ~17 KiB)
    proto = onnx.load(str(path))
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}
    weights = {n.removesuffix(".weight"): p for n, p in student.named_parameters()
               if n.endswith(".weight") and p.ndim > 1}
    assert set(result.storage) == set(weights)
    assert all(dtypes[layer] == PACKED_TYPE[kind] for layer, kind in result.storage.items())
    packed = sum(weights[layer].numel() * STORED_BITS[kind] / 8 + weights[layer].shape[0] * 8
                 for layer, kind in result.storage.items())
    # float32 parameters no conv/linear folds in: LayerNorm's, a position embedding (ViT)
    packed += 4 * sum(p.numel() for m in student.modules() if isinstance(m, nn.LayerNorm)
                      for p in m.parameters())
    packed += 4 * sum(p.numel() for _, p in student.named_parameters(recurse=False))
    assert path.stat().st_size <= packed + 24 * 1024
    claimed = int(_readme(name, r"\| ([\d,]+) B \|").replace(",", ""))
    assert abs(path.stat().st_size - claimed) <= 0.01 * claimed  # metadata varies by a few B
    narrow = "trits" if info["weight_bits"] == 2 else "int4"
    assert sum(kind == narrow for kind in result.storage.values()) == len(weights) - 2
    # the 8-bit first conv reads the 8-bit input: uint8 + 128, exact on every CPU family
    first = quant_layers(student)[0].name  # conv1 (ResNet20), patch_embed (ViT)
    assert result.storage[first] == "uint8" and all(c.passed for c in result.contract)
