"""Datasets and loaders: CIFAR-10/100 (official python format, md5-checked) and digits."""

from ._datasets import DataError, Dataset, cifar, cifar10, cifar100, digits, load
from ._loader import Loader, augment, normalize

__all__ = ["DataError", "Dataset", "Loader", "augment", "cifar", "cifar10", "cifar100",
           "digits", "load", "normalize"]
