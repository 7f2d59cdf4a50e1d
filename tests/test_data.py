"""Datasets and loader: real CIFAR-10 counts and md5 sums, bad paths, augmentation."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from lowbit import data


def test_cifar10_counts_labels_and_stats(cifar10_dir):
    train, test = data.cifar10(cifar10_dir), data.cifar10(cifar10_dir, train=False)
    assert (len(train), len(test)) == (50000, 10000)
    assert train.images.shape == (50000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[:2] == ("airplane", "automobile")
    # The normalisation constants are the training set's per-channel statistics.
    mean = train.images.float().mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(train.mean), atol=0.01)
    # Parent directory and the data spec string reach the same files.
    assert len(data.load(f"cifar10:{cifar10_dir.parent}", train=False)) == 10000


def _fake_cifar_dir(tmp_path, cifar10_dir, test_bytes: bytes):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    shutil.copy(cifar10_dir / "batches.meta", d)
    (d / "test_batch").write_bytes(test_bytes)
    return d


def test_truncated_file_fails_md5(tmp_path, cifar10_dir):
    d = _fake_cifar_dir(tmp_path, cifar10_dir, (cifar10_dir / "test_batch").read_bytes()[:5000])
    with pytest.raises(data.DataError, match=r"test_batch: md5 mismatch"):
        data.cifar10(d, train=False)


def test_missing_file_and_path(tmp_path, cifar10_dir):
    d = _fake_cifar_dir(tmp_path, cifar10_dir, b"")
    (d / "test_batch").unlink()
    with pytest.raises(data.DataError, match="test_batch: file missing"):
        data.cifar10(d, train=False)
    with pytest.raises(data.DataError, match=r"nowhere.*not found.*cifar-10-batches-py"):
        data.cifar10(tmp_path / "nowhere")


def test_wrong_format_is_named(tmp_path, cifar10_dir):
    d = _fake_cifar_dir(tmp_path, cifar10_dir, b"this is not a pickle")
    with pytest.raises(data.DataError, match="not a CIFAR python-format batch"):
        data.cifar10(d, train=False, verify=False)


def _tarball(path, n=20):
    """A small archive laid out like the official cifar-10-python.tar.gz."""
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             "labels": rng.integers(0, 10, n).tolist()}
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [("batches.meta", meta), ("test_batch", batch)]:
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batch


def test_tarball_reading_and_md5(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    batch = _tarball(path)
    ds = data.cifar10(path, train=False, verify=False)
    assert ds.images.shape == (20, 3, 32, 32)
    assert torch.equal(ds.images.reshape(20, -1), torch.from_numpy(batch["data"]))
    assert ds.labels.tolist() == batch["labels"]
    with pytest.raises(data.DataError, match="md5 mismatch.*cifar-10-python.tar.gz"):
        data.cifar10(path, train=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(data.DataError, match="not a readable .tar.gz"):
        data.cifar10(path, train=False, verify=False)


def test_digits_split(digits_split):
    train, test = digits_split
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert int(train.images.max()) == 255 and set(train.labels.tolist()) == set(range(10))


def test_bad_spec():
    with pytest.raises(data.DataError, match="unknown data spec 'mnist'"):
        data.load("mnist")
    with pytest.raises(data.DataError, match="needs a path"):
        data.load("cifar10")


def test_augment_is_a_crop_of_the_padded_image_and_seeded():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = data.augment(images, torch.Generator().manual_seed(1))
    again = data.augment(images, torch.Generator().manual_seed(1))
    other = data.augment(images, torch.Generator().manual_seed(2))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, again) and not torch.equal(out, other)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for img, src in zip(out, padded, strict=True):
        windows = [src[:, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(-1)) for w in windows)


def test_loader_epochs_and_shards(digits_split):
    train, _ = digits_split
    loader = data.Loader(train, 100, train=True, seed=3)
    loader.set_epoch(0)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    loader.set_epoch(0)
    assert torch.equal(first, torch.cat([y for _, y in loader]))
    assert not torch.equal(first, second) and len(first) == 1400
    x, _ = next(iter(loader))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 0.3
    shards = [data.Loader(train, 50, train=True, seed=3, shard=(r, 2)) for r in range(2)]
    seen = [torch.cat([x.flatten(1) for x, _ in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 700


# ------------------------------------------------------------------ the data adapter (as_data)

def test_as_data_takes_arrays_torch_datasets_and_loaders(digits_split):
    from torch.utils.data import DataLoader, TensorDataset

    train, _ = digits_split
    features = (np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32),
                np.arange(40) % 3)
    flat = data.as_data(features)  # float feature vectors: used as they are
    assert flat.mean is None and flat.input_shape == (6,) and flat.num_classes == 3
    x, y = next(iter(flat.loader(40)))
    assert torch.equal(x, torch.from_numpy(features[0])) and y.dtype == torch.int64
    pixels = data.as_data(TensorDataset(train.images, train.labels))  # uint8: standardised
    assert pixels.mean == pytest.approx((train.images.double().mean().item(),))
    raw = data.as_data(TensorDataset(train.images, train.labels), normalize=False)
    assert torch.equal(next(iter(raw.loader(8)))[0], train.images[:8].float())
    alike = data.as_data((train.images[:50], train.labels[:50]), stats=(train.mean, train.std))
    assert alike.mean == train.mean  # validation data normalised as the training data
    stream = data.as_data(DataLoader(TensorDataset(torch.randn(10, 2, 16),
                                                   torch.arange(10) % 2), batch_size=4))
    assert isinstance(stream, data.Stream) and stream.input_shape == (2, 16)
    assert [len(y) for _, y in stream.loader(99)] == [4, 4, 2] and len(stream) == 10
    for bad, message in [("mnist", "unknown data spec"), (42, "expected a lowbit Dataset"),
                         ((np.zeros((4, 3), np.int32), np.zeros(4, int)), "uint8 .* or floats"),
                         ((np.zeros((4, 3), np.float32), np.zeros(4)), "integer class indices")]:
        with pytest.raises(data.DataError, match=message):
            data.as_data(bad)


def test_augmentation_is_said_and_can_be_turned_off(tmp_path):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    cifar_like = data.as_data((images, torch.arange(8) % 2))
    assert cifar_like.augments and not data.as_data(cifar_like, augment=False).augments
    assert not data.as_data((images[:, :, :8, :8], torch.arange(8) % 2)).augments
    with pytest.raises(data.DataError, match="augmentation .* needs uint8 images"):
        data.as_data((torch.randn(8, 3, 32, 32), torch.arange(8) % 2), augment=True)


def test_float_npz_and_held_out_validation(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2, 16)).astype(np.float32)
    np.savez(tmp_path / "seq.npz", images=x, labels=np.arange(50) % 5)
    ds = data.load(str(tmp_path / "seq.npz"))
    assert ds.mean is None and ds.split == "file" and ds.input_shape == (2, 16)
    rest, val = ds.holdout(0.2)
    assert (len(rest), len(val)) == (40, 10)
    assert val.split.startswith("validation (10 held out of seq")
    seen = {tuple(v.flatten()[:3].tolist()) for v in rest.images}
    assert not any(tuple(v.flatten()[:3].tolist()) in seen for v in val.images)  # disjoint
