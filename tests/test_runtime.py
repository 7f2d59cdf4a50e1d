"""The torch-free runtime: Session on real onnxruntime sessions, .ort conversion, CLI, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lowbit import _datafiles, _onnx_meta, data, models
from lowbit.cli import main
from lowbit.distill import evaluate, train
from lowbit.errors import OutputError
from lowbit.runtime import InputError, ModelError, Session, convert_ort, markdown_table


def _export_float(model: torch.nn.Module, ds: data.Dataset, path) -> None:
    """A float ONNX with lowbit's metadata (torch.onnx.export; lowbit.export writes the packed
    quantized form with the same input/output names and metadata keys)."""
    import onnx

    x = data.normalize(ds.images[:2], ds.mean, ds.std)
    torch.onnx.export(model.eval(), (x,), str(path), input_names=[_onnx_meta.INPUT_NAME],
                      output_names=[_onnx_meta.OUTPUT_NAME], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "N"} for name in (_onnx_meta.INPUT_NAME,
                                                                 _onnx_meta.OUTPUT_NAME)})
    proto = onnx.load(str(path))
    proto.ir_version = 8
    onnx.helper.set_model_props(proto, {
        _onnx_meta.CLASSES: json.dumps(list(ds.classes)), _onnx_meta.MEAN: json.dumps(ds.mean),
        _onnx_meta.STD: json.dumps(ds.std), _onnx_meta.INPUT_SHAPE: json.dumps(ds.input_shape)})
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, digits_split):
    """A trained digits CNN, its exported ONNX and an .npz of the test split."""
    train_set, test_set = digits_split
    torch.manual_seed(0)
    model, _ = train(models.create("digits_cnn", width=8), train_set, None, epochs=3,
                     batch_size=64, lr=0.05, progress=False)
    d = tmp_path_factory.mktemp("runtime")
    _export_float(model, train_set, d / "digits.onnx")
    np.savez(d / "digits_test.npz", images=test_set.images.numpy(), labels=test_set.labels.numpy())
    return model.eval(), d / "digits.onnx", d / "digits_test.npz"


def test_session_matches_pytorch_on_raw_pixels(digits_model, digits_split):
    model, path, npz = digits_model
    test = digits_split[1]
    s = Session(path, threads=1, max_batch=100)  # several batches: chunking is exercised
    assert s.info.input_shape == (1, 8, 8) and s.classes == test.classes
    logits = s.run(test.images.numpy())  # uint8 pixels, normalised from the file's metadata
    with torch.no_grad():
        ref = model(data.normalize(test.images, test.mean, test.std)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(s.predict(test.images.numpy()), ref.argmax(1))
    acc = evaluate(model, test)
    assert acc > 0.8  # a trained model: wrong normalisation would not reach this
    assert s.evaluate("digits") == pytest.approx(acc, abs=1 / len(test))
    assert s.evaluate(str(npz)) == s.evaluate((test.images.numpy(), test.labels.numpy()))
    assert s.evaluate(test, limit=50) == pytest.approx(
        float((ref[:50].argmax(1) == test.labels.numpy()[:50]).mean()))
    # float32 input is taken as already normalised; one [C, H, W] image gets a batch axis
    x = data.normalize(test.images[:3], test.mean, test.std).numpy()
    np.testing.assert_allclose(s.run(x), ref[:3], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(s.run(test.images[0].numpy()), ref[:1], atol=1e-4, rtol=1e-4)


def test_benchmark_table(digits_model):
    s = Session(digits_model[1], threads=1)
    rows = s.benchmark([1, 4], warmup=1, repeat=3, min_time=0.0)
    assert [r.batch for r in rows] == [1, 4]
    for r in rows:
        assert r.runs >= 3 and 0 < r.latency_ms <= r.p90_ms
        assert r.throughput == pytest.approx(r.batch / r.latency_ms * 1e3)
    table = markdown_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 |") and table[3].startswith("| 4 |")


def test_ort_format_gives_identical_outputs(digits_model, digits_split, tmp_path):
    _, path, _ = digits_model
    out = convert_ort(path, tmp_path / "digits.ort")
    assert out.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of the ORT format
    a, b = Session(path), Session(out)
    assert b.info == a.info  # metadata survives the conversion
    x = digits_split[1].images.numpy()
    np.testing.assert_allclose(b.run(x), a.run(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(OutputError, match="overwrite the input"):
        convert_ort(out, out)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_bad_inputs_give_one_line_errors(digits_model, tmp_path):
    _, path, _ = digits_model
    with pytest.raises(ModelError, match=r"nope.onnx: not found; expected an .onnx or .ort") as e:
        Session(tmp_path / "nope.onnx")
    _one_line(e)
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n")
    with pytest.raises(ModelError, match=r"junk.onnx: not a model onnxruntime .* can load") as e:
        Session(junk)
    _one_line(e)
    s = Session(path, threads=1)
    with pytest.raises(InputError, match=r"expected images \[N, 1, 8, 8\] uint8 .* got shape "
                       r"\(2, 3, 8, 8\)") as e:
        s.run(np.zeros((2, 3, 8, 8), np.uint8))
    _one_line(e)
    with pytest.raises(InputError, match=r"got dtype float64") as e:
        s.run(np.zeros((2, 1, 8, 8)))
    _one_line(e)
    with pytest.raises(InputError, match=r"got dtype int64"):
        s.predict(np.zeros((2, 1, 8, 8), np.int64))
    with pytest.raises(InputError, match=r"a batch of 1000000000000 images needs about .* GiB "
                       r"but .* GiB is available; expected a batch of at most \d+ images") as e:
        s.benchmark([1, 10**12])
    _one_line(e)
    with pytest.raises(InputError, match="labels range over"):
        s.evaluate((np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 10])))


def test_model_without_metadata_takes_floats_only(tmp_path, digits_split):
    model = models.create("digits_cnn", width=4).eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False)
    s = Session(path)
    assert s.info.mean is None and s.info.num_outputs == 10
    with pytest.raises(InputError, match="no lowbit.mean/lowbit.std metadata"):
        s.run(np.zeros((1, 1, 8, 8), np.uint8))
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(s.run(x), model(torch.from_numpy(x)).numpy(), atol=1e-5)
    assert [r.batch for r in s.benchmark([1], warmup=0, repeat=1, min_time=0)] == [1]


def test_npz_reader_errors(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 1, 8, 8), np.int16), labels=[0, 1])
    with pytest.raises(_datafiles.DataError, match="inputs must be uint8 raw pixels .* or floats"):
        _datafiles.load(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", pixels=np.zeros((2, 1, 8, 8), np.uint8))
    with pytest.raises(_datafiles.DataError, match="missing array.*images, labels.*found pixels"):
        _datafiles.load(str(tmp_path / "b.npz"))
    (tmp_path / "c.npz").write_text("not a zip")
    with pytest.raises(_datafiles.DataError, match="not a readable .npz"):
        _datafiles.load(str(tmp_path / "c.npz"))
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([1, 0]))
    ds = data.load(str(tmp_path / "d.npz"))  # lowbit.data wraps the same reader
    assert ds.input_shape == (3, 4, 4) and ds.classes == ("0", "1")
    assert ds.mean == pytest.approx(images.astype(np.float64).mean(axis=(0, 2, 3)))


def test_cli_run_bench_convert(digits_model, digits_split, tmp_path, capsys):
    _, path, npz = digits_model
    assert main(["run", str(path), "--data", str(npz), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "top-1 accuracy" in out and f"{len(digits_split[1])} digits_test test examples" in out
    report = tmp_path / "bench.json"
    assert main(["bench", str(path), "--batch-size", "1", "2", "--repeat", "2", "--min-time", "0",
                 "--warmup", "0", "--threads", "1", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert main(["convert-ort", str(path), "-o", str(tmp_path / "m.ort")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "m.ort"), "--data", str(npz)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "{missing}", "--data", "digits"], "missing.onnx: not found"),
    (["run", "{junk}", "--data", "digits"], "not a model onnxruntime"),
    (["run", "{model}", "--data", "mnist"], "unknown data spec 'mnist'"),
    (["bench", "{model}", "--json", "{model}"], "would overwrite the input"),
    (["convert-ort", "{junk}"], "not a model onnxruntime"),
])
def test_cli_errors_exit_2_with_one_line(digits_model, tmp_path, capsys, argv, message):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage")
    paths = {"missing": tmp_path / "missing.onnx", "junk": junk, "model": digits_model[1]}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "junk.ort").exists()


def test_runtime_and_its_cli_never_import_torch(digits_model):
    _, path, npz = digits_model
    code = (
        "import sys\n"
        "import lowbit.runtime\n"
        "from lowbit.cli import main\n"
        f"assert main(['run', {str(path)!r}, '--data', {str(npz)!r}]) == 0\n"
        f"assert main(['bench', {str(path)!r}, '--batch-size', '1', '--repeat', '1',"
        " '--min-time', '0']) == 0\n"
        "heavy = [m for m in ('torch', 'onnx', 'brevitas', 'sklearn', 'lowbit.data')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_session_runs_a_lowbit_export(digits_model, digits_split, tmp_path):
    """A real packed export (4-bit weights, PTQ student): uint8 in, same answers as PyTorch."""
    from lowbit import quant
    from lowbit.export import Thresholds, export

    train_set, test = digits_split
    calib = [data.normalize(train_set.images[i:i + 128], train_set.mean, train_set.std)
             for i in range(0, 512, 128)]
    student = quant.calibrate(quant.quantize(digits_model[0], weight_bits=4, act_bits=4), calib)
    student.eval()
    path = tmp_path / "w4.onnx"
    # a PTQ student on 359 images: one borderline image may flip (the gate is the exporter's)
    export(student, path, formats=("onnx",), data=train_set, verify=test,
           thresholds=Thresholds(min_agreement=0.99))
    s = Session(path, threads=1)
    assert s.info.weight_bits == 4 and s.classes == test.classes
    with torch.no_grad():
        ref = student(data.normalize(test.images, test.mean, test.std)).argmax(1).numpy()
    assert (s.predict(test.images.numpy()) == ref).mean() >= 0.99
    ort_file = convert_ort(path)
    x = test.images.numpy()
    np.testing.assert_allclose(Session(ort_file).run(x), s.run(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16,), (2, 24), (1, 8, 8)], ids=["N,F", "N,C,L", "N,C,H,W"])
def test_session_and_run_take_any_input_rank(tmp_path, capsys, shape):
    from lowbit.export import export
    from lowbit.quant import calibrate, quantize
    from tests.user_models import SignalNet, SmallCNN

    torch.manual_seed(0)
    net = {1: torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 3)),
           2: SignalNet(in_channels=2, num_classes=3), 3: SmallCNN(3, 1, 4)}[len(shape)]
    x = torch.randn(64, *shape)
    student = quantize(net.eval(), weight_bits=2)
    calibrate(student, [x])
    student.eval()
    path = tmp_path / "m.onnx"
    export(student, path, example_input=x[:1], formats=("onnx",), verify=x, progress=False)
    s = Session(path)
    assert s.info.input_shape == shape
    with torch.no_grad():
        want = student(x).numpy()
    np.testing.assert_allclose(s.run(x.numpy()), want, atol=1e-4)
    assert s.run(x[0].numpy()).shape == (1, 3)  # one input without its batch axis
    expected = r"expected (images|inputs) \[N, " + ", ".join(map(str, shape))
    with pytest.raises(InputError, match=expected):
        s.run(np.zeros((2, *shape, 1), np.float32))
    np.savez(tmp_path / "d.npz", images=x.numpy(), labels=want.argmax(1))
    assert main(["run", str(path), "--data", str(tmp_path / "d.npz")]) == 0
    assert "top-1 accuracy 100.00% on 64" in capsys.readouterr().out
