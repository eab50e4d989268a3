"""Datasets: finding, fetching, checking and reading the raw files (docs/data.md).

``load_raw(name, root)`` returns uint8 arrays; ``fetch`` and ``verify`` back the
``fisherguard data`` commands; ``make_synthetic`` is the always-available stand-in.

The modules, bottom-up (each imports only those above it): ``errors``, ``catalogue`` (names,
files, digests), ``locate`` (data root, lookup, fix commands), ``checksums``, ``formats``
(readers), ``raw`` (RawDataset), ``synthetic``, ``datasets`` (load_raw, verify), ``fetching``.
``partition`` and ``transforms`` stand apart.
"""

from .datasets import CLASS_NAMES, DATASETS, NUM_CLASSES, RawDataset, load_raw, verify
from .errors import DatasetCorruptError, DatasetMissingError
from .fetching import fetch
from .formats import (
    read_cifar_batch,
    read_cifar_meta,
    read_idx,
    read_usps_libsvm,
    read_usps_text,
)
from .locate import data_root, find_files
from .synthetic import make_synthetic

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "NUM_CLASSES",
    "RawDataset",
    "load_raw",
    "make_synthetic",
    "DatasetCorruptError",
    "DatasetMissingError",
    "data_root",
    "fetch",
    "find_files",
    "verify",
    "read_idx",
    "read_usps_text",
    "read_usps_libsvm",
    "read_cifar_batch",
    "read_cifar_meta",
]
