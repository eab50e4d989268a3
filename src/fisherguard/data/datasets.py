"""Raw datasets as uint8 arrays (docs/data.md §1, docs/data.md §8): one entry point, :func:`load_raw`,
and :func:`verify`, the full check behind ``fisherguard data verify``.

Transforms to 3×32×32 live elsewhere (docs/protocol.md §1.2); this module joins lookup
(:mod:`~fisherguard.data.locate`), checksums and the format readers into a checked load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import catalogue, formats, locate
from .catalogue import DATASETS
# the function, not the module: load_located's public `checksums=` argument would shadow it
from .checksums import check_checksums
from .errors import DatasetCorruptError
from .raw import RawDataset
from .synthetic import make_synthetic

__all__ = ["RawDataset", "load_raw", "load_located", "verify", "DATASETS", "NUM_CLASSES", "CLASS_NAMES",
           "EXPECTED_COUNTS"]

NUM_CLASSES = 10

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "usps": tuple(str(i) for i in range(10)),
    "cifar10": formats.CIFAR10_CLASSES,
}

# Per-class counts of the real files (docs/data.md §3–§6), checked on every strict load.
EXPECTED_COUNTS: dict[str, dict[str, tuple[int, ...]]] = {
    "mnist": {
        "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    },
    "fashion-mnist": {"train": (6000,) * 10, "test": (1000,) * 10},
    "usps": {
        "train": (1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644),
        "test": (359, 264, 198, 166, 200, 160, 170, 147, 166, 177),
    },
    "cifar10": {"train": (5000,) * 10, "test": (1000,) * 10},
}

_IMAGE_SHAPE = {"mnist": (28, 28), "fashion-mnist": (28, 28), "usps": (16, 16), "cifar10": (3, 32, 32)}


def load_raw(name: str, root: str | os.PathLike[str] | None = None, *, strict: bool = True,
             **synthetic_kwargs: Any) -> RawDataset:
    """Load ``mnist``, ``fashion-mnist``, ``usps``, ``cifar10`` or ``synthetic`` as uint8 arrays.

    ``root`` is the data root (docs/data.md §2; ``None``: ``$FISHERGUARD_DATA`` or the cache dir, plus
    the datasets' extra places).  Every load checks headers, shapes and label range; with
    ``strict`` (the default) it also checks the published per-class counts and the checksums
    (hashed once, then remembered by a stamp file next to the data).  ``strict=False`` is for
    generated fixtures in the real formats.  Keyword arguments go to
    :func:`~fisherguard.data.synthetic.make_synthetic` for ``synthetic`` only.

    Raises :class:`~fisherguard.data.errors.DatasetMissingError` (with the fetch command) or
    :class:`~fisherguard.data.errors.DatasetCorruptError`.
    """
    key = catalogue.canonical_name(name)
    if key == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if synthetic_kwargs:
        raise TypeError(f"load_raw({key!r}) takes no {', '.join(sorted(synthetic_kwargs))} argument "
                        "(those are for the synthetic dataset)")
    directory, files = locate.find_files(key, root)
    return load_located(key, directory, files, root=root, strict=strict)


def load_located(name: str, directory: Path, files: Mapping[str, Path], *,
                 root: str | os.PathLike[str] | None = None, strict: bool = True,
                 checksums: dict | None = None) -> RawDataset:
    """Read a dataset whose files :func:`~fisherguard.data.locate.find_files` already located.

    ``checksums`` is a report of :func:`~fisherguard.data.checksums.check_checksums` done by the
    caller (:func:`verify`).
    """
    key = catalogue.canonical_name(name)
    try:
        return _load(key, Path(directory), dict(files), root, strict, checksums)
    except DatasetCorruptError as exc:
        if exc.dataset is not None:  # already carries the dataset and fix commands
            raise
        raise locate.enrich_corrupt(exc, key, root, Path(directory)) from exc


def _load(key: str, directory: Path, files: dict[str, Path], root: Any, strict: bool,
          checksums: dict | None) -> RawDataset:
    """Read, check and wrap located files; ``checksums`` is a report already made, if any."""
    spec_fmt = catalogue.format_of(catalogue.spec_of(key), files)
    contents: dict[str, bytes] = {}
    if spec_fmt == "idx":
        contents = {logical: formats.read_bytes(path) for logical, path in files.items()}
    if strict and checksums is None:
        checksums = check_checksums(key, directory, files, root=root, contents=contents)
    if spec_fmt == "idx":
        tr = formats.read_idx_pair(contents["train-images"], contents["train-labels"],
                                   names=(str(files["train-images"]), str(files["train-labels"])))
        te = formats.read_idx_pair(contents["test-images"], contents["test-labels"],
                                   names=(str(files["test-images"]), str(files["test-labels"])))
        grey, class_names = True, CLASS_NAMES[key]
    elif spec_fmt in ("usps-text", "usps-libsvm"):
        reader = formats.read_usps_text if spec_fmt == "usps-text" else formats.read_usps_libsvm
        tr, te = reader(files["train"]), reader(files["test"])
        grey, class_names = True, CLASS_NAMES[key]
    else:
        tr, te, class_names = _load_cifar(files, strict)
        grey = False

    for split, (x, y), path in (("train", tr, _first(files, "train")), ("test", te, _first(files, "test"))):
        if x.shape[1:] != _IMAGE_SHAPE[key]:
            raise DatasetCorruptError(f"{path}: shape check failed: images {x.shape}, expected "
                                      f"(N, {', '.join(map(str, _IMAGE_SHAPE[key]))})", path=path, check="shape")
        if strict:
            counts = tuple(np.bincount(y, minlength=NUM_CLASSES).tolist())
            want = EXPECTED_COUNTS[key][split]
            if counts != want:
                raise DatasetCorruptError(
                    f"{path}: per-class count check failed: {split} counts {list(counts)} (total "
                    f"{sum(counts)}), expected {list(want)} (total {sum(want)})", path=path, check="counts")
    meta = {
        "name": key,
        "source_dir": str(directory),
        "files": {logical: p.name for logical, p in files.items()},
        "format": spec_fmt,
        "checksums": checksums["source"] if checksums else "skipped (strict=False)",
        "class_names": list(class_names),
        "splits": {"train": int(len(tr[1])), "test": int(len(te[1]))},
    }
    return RawDataset(key, tr[0], tr[1], te[0], te[1], grey=grey, meta=meta)


def _first(files: Mapping[str, Path], split: str) -> Path:
    """The file that names a split in error messages."""
    for logical in (f"{split}-images", split, "data_batch_1" if split == "train" else "test_batch"):
        if logical in files:
            return files[logical]
    return next(iter(files.values()))


def _load_cifar(files: Mapping[str, Path], strict: bool):
    """The five training batches joined, the test batch and the class names of CIFAR-10."""
    xs, ys = [], []
    for i in range(1, 6):
        path = files[f"data_batch_{i}"]
        x, y = formats.read_cifar_batch(path)
        if strict and len(y) != 10000:
            raise DatasetCorruptError(f"{path}: batch size check failed: {len(y)} images, expected 10000",
                                      path=path, check="batch size")
        xs.append(x)
        ys.append(y)
    te = formats.read_cifar_batch(files["test_batch"])
    meta = formats.read_cifar_meta(files["batches.meta"])
    return (np.concatenate(xs), np.concatenate(ys)), te, tuple(meta["label_names"])


def verify(name: str, root: str | os.PathLike[str] | None = None) -> dict:
    """The full check of docs/data.md §8 (for ``fisherguard data verify``): every file hashed afresh,
    then loaded with every cheap check (shapes, label range, per-class counts).

    Returns a JSON-able report; raises :class:`~fisherguard.data.errors.DatasetMissingError` or
    :class:`~fisherguard.data.errors.DatasetCorruptError`.
    """
    key = catalogue.canonical_name(name)
    t0 = time.monotonic()
    if key == "synthetic":
        ds = load_raw("synthetic")
        return {"name": key, "ok": True, "directory": None, "files": {},
                "train": int(len(ds.train_y)), "test": int(len(ds.test_y)),
                "note": "generated in memory; nothing to verify on disk",
                "seconds": round(time.monotonic() - t0, 3)}
    directory, files = locate.find_files(key, root)
    sums = check_checksums(key, directory, files, root=root, use_stamp=False)
    ds = load_located(key, directory, files, root=root, checksums=sums)
    return {
        "name": key,
        "ok": True,
        "directory": str(directory),
        "format": ds.meta.get("format"),
        "files": sums["files"],
        "train": int(len(ds.train_y)),
        "test": int(len(ds.test_y)),
        "counts": {
            "train": [int(c) for c in _bincount(ds.train_y)],
            "test": [int(c) for c in _bincount(ds.test_y)],
        },
        "seconds": round(time.monotonic() - t0, 3),
    }


def _bincount(y: np.ndarray) -> list[int]:
    """Per-class counts of labels 0-9 (longer if a label is larger)."""
    return np.bincount(np.asarray(y), minlength=10).tolist()
