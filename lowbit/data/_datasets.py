"""Datasets held in memory as uint8 tensors: CIFAR-10/100 (official python format) and digits.

Images stay uint8 ``[N, C, H, W]`` until a batch is drawn, so a whole CIFAR training set is
150 MB and augmentation works on bytes. ``mean``/``std`` (per channel, on the 0..255 scale)
travel with the dataset into checkpoints and exported models, so inference takes raw pixels.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """A dataset is missing, truncated, corrupt or in the wrong format."""


@dataclass(frozen=True)
class Dataset:
    """Images ``[N, C, H, W]`` uint8, labels ``[N]`` int64, and the normalisation to apply."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int) -> Dataset:
        """The first ``n`` examples (for quick runs and tests)."""
        return Dataset(self.name, self.images[:n], self.labels[:n], self.classes, self.mean, self.std)


# Official md5 sums (from the CIFAR download page / torchvision).
_CIFAR = {
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


def cifar(name: str, path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 from the python-format directory.

    ``path`` may be the ``cifar-10-batches-py`` directory itself, its parent, or the
    official ``.tar.gz``. Every file read is checked against the official md5 sum.
    """
    if name not in _CIFAR:
        raise DataError(f"unknown CIFAR variant {name!r}; expected one of {', '.join(_CIFAR)}")
    spec = _CIFAR[name]
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
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{p}: batches do not hold CIFAR data/labels ({exc})") from None
    return Dataset(name, images, torch.from_numpy(labels), classes, spec["mean"], spec["std"])


def cifar10(path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``."""
    return cifar("cifar10", path, train, verify)


def cifar100(path: str | Path, train: bool = True, verify: bool = True) -> Dataset:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` or ``cifar-100-python.tar.gz``."""
    return cifar("cifar100", path, train, verify)


def digits(train: bool = True, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 real images), split train/test by ``seed``.

    Pixels 0..16 are scaled to 0..255 uint8 so every dataset looks like raw image bytes.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    idx = order[n_test:] if train else order[:n_test]
    x = torch.from_numpy(images[idx].copy())
    y = torch.from_numpy(bunch.target[idx].astype(np.int64))
    fit = images[order[n_test:]].astype(np.float64)  # normalisation comes from the train split
    mean, std = float(fit.mean()), float(fit.std())
    return Dataset("digits", x, y, tuple(str(i) for i in range(10)), (mean,), (std,))


def load(spec: str, train: bool = True) -> Dataset:
    """Parse a data spec as the CLI takes it: ``cifar10:DIR``, ``cifar100:DIR`` or ``digits``."""
    kind, _, path = spec.partition(":")
    if kind == "digits" and not path:
        return digits(train)
    if kind in _CIFAR:
        if not path:
            raise DataError(f"data spec {spec!r} needs a path: {kind}:DIR")
        return cifar(kind, path, train)
    raise DataError(f"unknown data spec {spec!r}; expected cifar10:DIR, cifar100:DIR or digits")
