"""Torch-free dataset readers: CIFAR-10/100 (official python format, md5-checked), digits, .npz.

They return numpy arrays (:class:`Arrays`), so the edge runtime (numpy + onnxruntime only)
and :mod:`lowbit.data` (which wraps them in torch tensors for training) share one reader.
Inputs are uint8 raw pixels ``[N, C, H, W]`` (``mean``/``std`` per channel on the 0..255
scale) or float32 ``[N, ...]`` of any rank (images, ``[N, C, L]`` sequences, feature
vectors), which are used as they are unless the file gives ``mean``/``std``.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class Arrays:
    """A dataset as numpy arrays: inputs ``images`` ``[N, ...]`` (uint8 raw pixels or float32)
    and labels int64 ``[N]``; ``split`` names the part of the source they are ("train",
    "test", "file")."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    split: str = "train"

    def __post_init__(self) -> None:
        check_inputs(self.name, self.images.dtype == np.uint8,
                     np.issubdtype(self.images.dtype, np.floating), self.images.shape,
                     self.mean, self.std)
        if self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but labels of shape "
                            f"{tuple(self.labels.shape)}")


def check_inputs(name: str, is_uint8: bool, is_float: bool, shape: tuple[int, ...],
                 mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Refuse inputs lowbit cannot feed a model: the one check of the data contract.

    uint8 inputs are raw pixels and need per-channel ``mean``/``std`` (dim 1); float inputs
    are used as they are, or normalised when ``mean``/``std`` are given.
    """
    if not (is_uint8 or is_float) or len(shape) < 2:
        raise DataError(f"{name}: inputs must be uint8 raw pixels [N, C, H, W] or floats "
                        f"[N, ...] (images, [N, C, L] sequences, [N, F] features); got "
                        f"{'floats' if is_float else 'a non-float, non-uint8 type'} of shape "
                        f"{tuple(shape)}")
    if (mean is None) != (std is None):
        raise DataError(f"{name}: give both mean and std, or neither")
    if is_uint8 and mean is None:
        raise DataError(f"{name}: uint8 inputs need their per-channel mean/std (0..255 scale)")
    if mean is not None and (len(mean) != len(std) or len(mean) not in (1, shape[1])):
        raise DataError(f"{name}: mean/std need 1 or {shape[1]} (dim 1) values, got "
                        f"{len(mean)} and {len(std)}")


# Official md5 sums (from the CIFAR download page / torchvision).
CIFAR = {
    "cifar10": {
        "dir": "cifar-10-batches-py",
        "tar": "cifar-10-python.tar.gz",
        "tar_md5": "c58f30108f718f92721af3b95e74349a",
        "train": [(f"data_batch_{i}", md5) for i, md5 in enumerate([
            "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
            "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
            "482c414d41f54cd18b22e5b47cb7c3cb"], start=1)],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        "label_key": "labels",
        "names_key": "label_names",
        "mean": (125.307, 122.950, 113.865),
        "std": (62.993, 62.089, 66.705),
    },
    "cifar100": {
        "dir": "cifar-100-python",
        "tar": "cifar-100-python.tar.gz",
        "tar_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48"),
        "label_key": "fine_labels",
        "names_key": "fine_label_names",
        "mean": (129.304, 124.070, 112.434),
        "std": (68.170, 65.392, 70.418),
    },
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_member(root: Path | tarfile.TarFile, folder: str, fname: str, md5: str, verify: bool,
                 where: Path) -> dict:
    """Read one pickled batch from a directory or a tarball, checking its md5 sum."""
    if isinstance(root, tarfile.TarFile):
        try:
            member = root.extractfile(f"{folder}/{fname}")
        except KeyError:
            member = None
        if member is None:
            raise DataError(f"{where}: archive has no {folder}/{fname}; expected the official "
                            f"CIFAR python-format tarball")
        raw = member.read()
    else:
        path = root / fname
        if not path.is_file():
            raise DataError(f"{path}: file missing; expected the official CIFAR python-format "
                            f"directory ({folder}/ with {fname})")
        raw = path.read_bytes()
    if verify and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{where / fname}: md5 mismatch (truncated or modified file); "
                        f"expected {md5}, re-extract the official archive")
    try:
        return pickle.loads(raw, encoding="latin1")  # official files are Python 2 pickles
    except Exception as exc:  # any unpickling failure means a wrong format
        raise DataError(f"{where / fname}: not a CIFAR python-format batch ({exc})") from None


def cifar(name: str, path: str | Path, train: bool = True, verify: bool = True) -> Arrays:
    """Read CIFAR-10 (``name="cifar10"``) or CIFAR-100 from the python-format directory.

    ``path`` may be the ``cifar-10-batches-py`` directory itself, its parent, or the
    official ``.tar.gz``. Every file read is checked against the official md5 sum.
    """
    if name not in CIFAR:
        raise DataError(f"unknown CIFAR variant {name!r}; expected one of {', '.join(CIFAR)}")
    spec = CIFAR[name]
    p = Path(path).expanduser()
    if p.is_dir() and (p / spec["dir"]).is_dir():
        p = p / spec["dir"]
    if p.is_dir() and (p / spec["tar"]).is_file() and not (p / spec["meta"][0]).exists():
        p = p / spec["tar"]
    if not p.exists():
        raise DataError(f"{p}: not found; expected the {name} directory '{spec['dir']}/' or "
                        f"'{spec['tar']}' (official python version)")
    files = spec["train"] if train else spec["test"]
    if p.is_file():
        if verify and _md5(p) != spec["tar_md5"]:
            raise DataError(f"{p}: md5 mismatch; expected the official {spec['tar']} "
                            f"({spec['tar_md5']})")
        try:
            with tarfile.open(p, "r:gz") as tar:
                meta = _read_member(tar, spec["dir"], *spec["meta"], verify, p)
                batches = [_read_member(tar, spec["dir"], f, m, False, p) for f, m in files]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{p}: not a readable .tar.gz ({exc})") from None
    else:
        meta = _read_member(p, spec["dir"], *spec["meta"], verify, p)
        batches = [_read_member(p, spec["dir"], f, m, verify, p) for f, m in files]
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[spec["label_key"]], dtype=np.int64) for b in batches])
        classes = tuple(meta[spec["names_key"]])
        images = data.reshape(-1, 3, 32, 32)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{p}: batches do not hold CIFAR data/labels ({exc})") from None
    return Arrays(name, images, labels, classes, spec["mean"], spec["std"],
                  "train" if train else "test")


def digits(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Arrays:
    """scikit-learn's bundled 8x8 digits (1,797 real images), split train/test by ``seed``.

    Pixels 0..16 are scaled to 0..255 uint8 so every dataset looks like raw image bytes.
    Needs scikit-learn (the ``train`` extra); an edge install reads ``.npz`` files instead.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn (pip install 'lowbit[train]'); "
                        "without it pass an .npz file with images and labels") from None

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    idx = order[n_test:] if train else order[:n_test]
    fit = images[order[n_test:]].astype(np.float64)  # normalisation comes from the train split
    mean, std = float(fit.mean()), float(fit.std())
    return Arrays("digits", images[idx], bunch.target[idx].astype(np.int64),
                  tuple(str(i) for i in range(10)), (mean,), (std,), "train" if train else "test")


def npz(path: str | Path) -> Arrays:
    """An ``.npz`` with ``images`` and ``labels`` (integers ``[N]``).

    ``images``: uint8 raw pixels ``[N, C, H, W]`` or float32 inputs ``[N, ...]``. Optional
    arrays: ``classes`` (names), ``mean`` and ``std`` (per channel; for uint8 on the 0..255
    scale, computed from the images when absent; float inputs are used as they are unless
    given). Loaded without pickle, so the file cannot run code.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: not found; expected an .npz with arrays 'images' (uint8 "
                        f"[N, C, H, W]) and 'labels'")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: not a readable .npz ({exc})") from None
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise DataError(f"{p}: missing array(s) {', '.join(sorted(missing))}; expected 'images' "
                        f"(uint8 [N, C, H, W]) and 'labels', found {', '.join(arrays) or 'none'}")
    images, labels = arrays["images"], arrays["labels"]
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{p}: labels must be integers, got {labels.dtype}")
    if np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32, copy=False)
    mean, std = arrays.get("mean"), arrays.get("std")
    if images.dtype == np.uint8 and mean is None and std is None and images.ndim >= 2:
        mean, std = channel_stats(images)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = tuple(str(c) for c in arrays.get("classes", range(n_classes)))
    return Arrays(p.stem, images, labels.astype(np.int64), classes, _floats(mean), _floats(std),
                  "file")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (dim 1) mean and std of ``[N, C, ...]`` inputs."""
    axes = (0, *range(2, images.ndim))
    return (tuple(float(v) for v in images.mean(axis=axes, dtype=np.float64)),
            tuple(float(v) for v in images.std(axis=axes, dtype=np.float64)))


def _floats(values: np.ndarray | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in np.atleast_1d(values))


def load(spec: str, train: bool = True) -> Arrays:
    """Parse a data spec: ``cifar10:DIR``, ``cifar100:DIR``, ``digits`` or ``FILE.npz``."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return digits(train)
    if kind in CIFAR:
        if not path:
            raise DataError(f"data spec {spec!r} needs a path: {kind}:DIR")
        return cifar(kind, path, train)
    if spec.endswith(".npz"):
        return npz(spec)
    raise DataError(f"unknown data spec {spec!r}; expected cifar10:DIR, cifar100:DIR, digits "
                    f"or FILE.npz")


def as_arrays(data) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` as numpy arrays, torch-free, from: an object with ``images`` and
    ``labels`` (:class:`Arrays`, a lowbit Dataset), an ``(inputs, labels)`` pair, a map-style
    dataset of ``(input, label)`` items (a torch ``Dataset``; tensors convert through their
    ``__array__``) or an iterable of ``(inputs, labels)`` batches (a ``DataLoader``)."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        return np.asarray(data.images), np.asarray(data.labels)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return np.asarray(data[0]), np.asarray(data[1])
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        pairs = [(np.asarray(x)[None], np.asarray(y).reshape(1)) for x, y in items]
    elif hasattr(data, "__iter__"):
        pairs = [(np.asarray(x), np.asarray(y).reshape(-1)) for x, y in data]
    else:
        raise DataError(f"expected (inputs, labels) arrays, a dataset of (input, label) pairs "
                        f"or batches of them, got {type(data).__name__}")
    if not pairs:
        raise DataError(f"{type(data).__name__}: no examples")
    return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])

