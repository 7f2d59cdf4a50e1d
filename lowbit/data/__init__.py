"""Data: CIFAR-10/100 (official python format, md5-checked), digits, .npz, and user data.

:func:`as_data` is the one adapter every function taking data goes through: lowbit
datasets, ``(inputs, labels)`` arrays, torch Datasets and DataLoaders; uint8 images or float
inputs of any rank.
"""

from ._adapt import Data, DataLike, Stream, as_data, stats_of
from ._datasets import (
    VALIDATION_SIZE,
    DataError,
    Dataset,
    cifar,
    cifar10,
    cifar100,
    digits,
    load,
    validation_split,
)
from ._loader import Loader, augment, normalize

__all__ = ["VALIDATION_SIZE", "Data", "DataError", "DataLike", "Dataset", "Loader", "Stream",
           "as_data", "augment", "cifar", "cifar10", "cifar100", "digits", "load", "normalize",
           "stats_of", "validation_split"]
