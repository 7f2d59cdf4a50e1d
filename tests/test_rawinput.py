"""Raw uint8 pixel input: one normalisation formula for loader, runtime and graph, and files
that plain onnxruntime feeds with CIFAR-10 bytes and no lowbit (issue 22's acceptance)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lowbit
from lowbit import _checkpoint, _pixels, cli, data, models
from lowbit import _onnx_meta as meta
from lowbit.data._loader import normalize
from lowbit.errors import InputError
from lowbit.export import ExportError, check_kernels
from lowbit.footprint import footprint

ROOT = Path(__file__).resolve().parents[1]
N = 1000  # CIFAR-10 test images the plain-onnxruntime runs are compared on
CIFAR_STATS = ((125.307, 122.95, 113.865), (62.993, 62.089, 66.705))


def test_one_formula_for_loader_and_runtime():
    mean, std = CIFAR_STATS
    lut = _pixels.table(mean, std)
    # oracle: the float32 formula one value at a time
    for c in range(3):
        for v in range(256):
            want = (np.float32(v) - np.float32(mean[c])) / np.float32(std[c])
            assert lut[c, v] == want
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(2, 3, 256)
    assert np.array_equal(normalize(pixels, mean, std).numpy()[0], lut)  # the loader
    floats = pixels.float().numpy()  # floats on the 0..255 scale: the same values
    assert np.array_equal(_pixels.normalize(floats, mean, std), _pixels.table(mean, std)[None]
                          .repeat(2, 0))


@pytest.fixture(scope="module")
def shipped(cifar10_dir):
    """The shipped ternary CIFAR-10 student, the first N test images and its classes on them."""
    student, ckpt = _checkpoint.load_model("resnet20_cifar10_ternary")
    test = data.load(f"cifar10:{cifar10_dir.parent}", train=False).subset(N)
    with torch.no_grad():
        classes = torch.cat([student(x).argmax(1) for x, _ in test.loader(250)]).numpy()
    return student, ckpt, test, classes


def _plain_onnxruntime(model: Path, cifar10_dir: Path, nhwc: bool, tmp: Path) -> np.ndarray:
    """examples/raw_pixels.py in a fresh process that never imports lowbit or torch: the
    classes it gives for the first N test images, read from the official pickle."""
    out = tmp / "classes.npy"
    args = [str(model), str(cifar10_dir), "--limit", str(N), "--predictions", str(out)]
    code = ("import runpy, sys; sys.argv = ['raw_pixels.py', *sys.argv[1:]]; "
            f"runpy.run_path({str(ROOT / 'examples' / 'raw_pixels.py')!r}, "
            "run_name='__main__'); "
            "assert not {'lowbit', 'torch'} & set(sys.modules), 'imported lowbit or torch'")
    r = subprocess.run([sys.executable, "-c", code, *args, *(["--nhwc"] if nhwc else [])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "top-1 accuracy" in r.stdout
    return np.load(out)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_plain_onnxruntime_on_raw_cifar10_bytes_matches_the_student(shipped, cifar10_dir,
                                                                    tmp_path, layout):
    student, ckpt, test, classes = shipped
    path = tmp_path / f"raw_{layout}.onnx"
    result = lowbit.export(student, path, formats=("onnx",), verify=test.subset(250),
                           data=ckpt["data"], input="uint8", layout=layout, progress=False)
    assert all(v.passed for v in result.verification.values())
    proto = onnx.load(path)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert shape == ([3, 32, 32] if layout == "nchw" else [32, 32, 3])
    props = {p.key: p.value for p in proto.metadata_props}
    assert props[meta.INPUT] == f'{{"dtype":"uint8","layout":"{layout}"}}'
    got = _plain_onnxruntime(path, cifar10_dir, layout == "nhwc", tmp_path)
    assert np.mean(got == classes) >= 0.999
    # lowbit's runtime feeds the same file raw NCHW pixels (it transposes for NHWC)
    session = lowbit.Session(path)
    assert np.array_equal(session.predict(test.images.numpy()), got)
    with pytest.raises(InputError, match="uint8 raw pixels"):
        session.run(normalize(test.images[:2], *CIFAR_STATS).numpy())
    # the first layer is still proven: its input bound is the lookup's highest stored code
    table = next(numpy_helper.to_array(t) for t in proto.graph.initializer
                 if t.name == "pixel_table")
    pixels = test.images[:4].numpy()
    contract = check_kernels(proto, pixels if layout == "nchw" else pixels.transpose(0, 2, 3, 1),
                             result.storage)
    assert contract[0].layer == "conv1" and contract[0].bound.x_max == int(table.max())
    assert all(c.passed for c in contract) and len(contract) == result.kernels["integer"]


def test_lowbit_run_bench_and_footprint_on_a_raw_pixel_file(tmp_path, capsys):
    train = data.digits()
    student = lowbit.quantize(models.create("digits_cnn", width=4, seed=0), weight_bits=2)
    path = tmp_path / "raw.onnx"
    result = lowbit.export(student, path, formats=("onnx",), data=train, input="uint8",
                           layout="nhwc", progress=False)  # random pixels verify it
    assert result.verification["onnx-int"].source == "random"
    assert cli.main(["run", str(path), "--data", "digits"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert cli.main(["bench", str(path), "--batch-size", "1"]) == 0
    floats = tmp_path / "float.onnx"  # the default file: normalised float32 input, as before
    lowbit.export(student, floats, formats=("onnx",), data=train, progress=False)
    proto = onnx.load(floats)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert meta.INPUT not in {p.key for p in proto.metadata_props}
    pixels = data.digits(train=False).images.numpy()
    assert np.array_equal(lowbit.Session(path).run(pixels), lowbit.Session(floats).run(pixels))
    # the lookup table (one channel: 256 bytes) is the file's only extra stored data
    assert footprint(path).weight_bytes == footprint(floats).weight_bytes + 256


def test_raw_input_needs_the_models_normalisation(tmp_path):
    student = lowbit.quantize(models.create("digits_cnn", width=4, seed=0), weight_bits=2)
    with pytest.raises(ExportError, match="no mean/std is known"):
        lowbit.export(student, tmp_path / "x.onnx", example_input=torch.zeros(1, 1, 8, 8),
                      input="uint8")
    with pytest.raises(ExportError, match="pass input='uint8' too"):
        lowbit.export(student, tmp_path / "x.onnx", data=data.digits(), layout="nhwc")
    with pytest.raises(ExportError, match="not uint8 pixels normalised"):
        lowbit.export(student, tmp_path / "x.onnx", data=data.digits(), input="uint8",
                      verify=torch.randn(8, 1, 8, 8), formats=("onnx",), progress=False)
    assert not (tmp_path / "x.onnx").exists()
