"""Checkpoints: self-describing round trip with weights_only, and every refusal."""

from __future__ import annotations

import pickle

import pytest
import torch

from lowbit import _checkpoint, models
from lowbit._checkpoint import CheckpointError

DATA = {"name": "digits", "classes": [str(i) for i in range(10)], "mean": [77.0], "std": [96.0],
        "input_shape": [1, 8, 8]}


def _saved(tmp_path):
    model = models.create("digits_cnn", width=8).eval()
    path = _checkpoint.save(tmp_path / "m.pt", model, data=DATA, record={"note": "test"})
    return model, path


def test_round_trip_loads_with_weights_only(tmp_path):
    model, path = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == {"name": "digits_cnn", "kwargs": {"width": 8}}
    assert raw["quant"] is None and raw["record"] == {"note": "test"}
    loaded, ckpt = _checkpoint.load_model(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x)) and ckpt["data"] == DATA
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("content, message", [
    (lambda p: p.write_bytes(pickle.dumps({"format": "lowbit.checkpoint", "x": Evil()})),
     "refused to unpickle|corrupt"),
    (lambda p: torch.save({"format": "lowbit.checkpoint", "x": Evil()}, p),
     "refused to unpickle"),
    (lambda p: p.write_bytes(b"PK\x03\x04garbage"), "corrupt or truncated"),
    (lambda p: torch.save(models.create("resnet20").state_dict(), p), "not a lowbit checkpoint"),
    (lambda p: torch.save({"format": "lowbit.checkpoint", "version": 99}, p), "version 99"),
])
def test_refusals(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    content(path)
    with pytest.raises(CheckpointError, match=message):
        _checkpoint.load(path)


def test_truncated_and_missing(tmp_path):
    _, path = _saved(tmp_path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no such file"):
        _checkpoint.load(tmp_path / "missing.pt")


def test_state_dict_must_fit_arch(tmp_path):
    _, path = _saved(tmp_path)
    ckpt = _checkpoint.load(path)
    ckpt["arch"]["kwargs"]["width"] = 16
    with pytest.raises(CheckpointError, match="does not fit digits_cnn"):
        _checkpoint.build(ckpt)
