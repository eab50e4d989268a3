"""Writers of the datasets' on-disk formats (docs/data.md §5–§7), for test fixtures only.

They produce IDX, USPS (ESL text and LIBSVM) and CIFAR-10 python batches from arrays, so every
reader in ``fisherguard.data.formats`` is exercised without real data.  The package never
writes these formats, so the writers live with the tests.
"""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# The readers' own constants, so writer and reader cannot drift apart.
from fisherguard.data.formats import CIFAR10_CLASSES, PathLike, _IDX_UBYTE, _numpy_reconstruct

__all__ = ["uint8_to_usps", "write_idx", "write_usps_text", "write_usps_libsvm", "write_cifar_batches"]


def write_idx(path: PathLike, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write a uint8 array as IDX (magic 2051 for 3-D images, 2049 for 1-D labels).

    ``gz=None`` compresses when the name ends in ``.gz``; a given ``gz`` adds/keeps the suffix.
    """
    p = Path(path)
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("IDX unsigned-byte data must lie in 0..255")
        arr = arr.astype(np.uint8)
    if arr.ndim not in (1, 3):
        raise ValueError(f"write_idx handles labels (N,) and images (N, H, W), got shape {arr.shape}")
    if gz is None:
        gz = p.name.endswith(".gz")
    elif gz and not p.name.endswith(".gz"):
        p = p.with_name(p.name + ".gz")
    header = bytes([0, 0, _IDX_UBYTE, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr).tobytes()
    if gz:
        # mtime=0 keeps fixtures byte-identical between runs
        with open(p, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
            fh.write(payload)
    else:
        p.write_bytes(payload)
    return p


def uint8_to_usps(images: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] at the files' 0.001 resolution that map back to the same uint8."""
    u = np.asarray(images, dtype=np.float64)
    x = np.round((u + 0.5) / 255.0 * 2.0 - 1.0, 3)
    x[u == 0] = -1.0  # background is exactly -1 in the real files
    x[u == 255] = 1.0
    return x


def write_usps_text(path: PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ESL "zip" text (gzip'd if the name ends in ``.gz``) that reads back to ``images``."""
    p = Path(path)
    x = uint8_to_usps(np.asarray(images).reshape(len(images), 256))
    y = np.asarray(labels, dtype=np.int64)
    lines = [f"{float(lab):.4f} " + " ".join(f"{v:.4f}" for v in row) for lab, row in zip(y, x)]
    payload = ("\n".join(lines) + "\n").encode("ascii")
    if p.name.endswith(".gz"):
        with open(p, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
            fh.write(payload)
    else:
        p.write_bytes(payload)
    return p


def write_usps_libsvm(path: PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write LIBSVM USPS (bz2 if the name ends in ``.bz2``), labels stored as 1-10."""
    p = Path(path)
    x = uint8_to_usps(np.asarray(images).reshape(len(images), 256))
    y = np.asarray(labels, dtype=np.int64) + 1
    lines = [f"{int(lab)} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row)) for lab, row in zip(y, x)]
    payload = ("\n".join(lines) + "\n").encode("ascii")
    p.write_bytes(bz2.compress(payload) if p.name.endswith(".bz2") else payload)
    return p


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Emits what Python 2's cPickle wrote for CIFAR-10: ``bytes`` and ``str`` as py2 ``str``
    opcodes and the numpy 1 module path, so the fixtures exercise the same opcodes as the real files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        """Write bytes as a Python 2 ``str`` (SHORT_BINSTRING/BINSTRING)."""
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_py2_text(self, obj: str) -> None:
        """Write text as a Python 2 ``str`` too (latin1 bytes)."""
        # Python 2 had no separate text type here: numpy's dtype state ('u1', '|') was a str too
        self.save_py2_str(obj.encode("latin1"))

    dispatch[str] = save_py2_text

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """Name numpy's array reconstructor by its numpy 1 path, as the real files do."""
        if obj is _numpy_reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump_cifar(path: Path, obj: Mapping[Any, Any], py2: bool) -> None:
    """Pickle one CIFAR-10 file with protocol 2, as Python 2 or as Python 3 wrote it."""
    with open(path, "wb") as fh:
        if py2:
            _Py2Pickler(fh, protocol=2).dump(obj)
        else:
            pickle.dump(obj, fh, protocol=2)


def write_cifar_batches(directory: PathLike, train_images: np.ndarray, train_labels: np.ndarray,
                        test_images: np.ndarray, test_labels: np.ndarray, *,
                        keys: str = "bytes") -> Path:
    """Write ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` like the real python version.

    ``keys="bytes"`` mimics the Python 2 files (keys and strings load as ``bytes`` with
    ``encoding="bytes"``); ``keys="str"`` writes a Python 3 pickle with ``str`` keys.  The
    training set is split into five near-equal batches in order.
    """
    if keys not in ("bytes", "str"):
        raise ValueError("keys must be 'bytes' or 'str'")
    py2 = keys == "bytes"
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def k(s: str) -> Any:
        return s.encode("latin1") if py2 else s

    def batch(images: np.ndarray, labels: np.ndarray, label: str, start: int) -> dict:
        x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).reshape(len(images), 3072))
        return {
            k("batch_label"): k(label),
            k("labels"): [int(v) for v in np.asarray(labels)],
            k("data"): x,
            k("filenames"): [k(f"synthetic_{start + i:05d}.png") for i in range(len(x))],
        }

    tx, ty = np.asarray(train_images), np.asarray(train_labels)
    bounds = np.linspace(0, len(tx), 6).astype(int)
    for i in range(5):
        lo, hi = bounds[i], bounds[i + 1]
        _dump_cifar(d / f"data_batch_{i + 1}", batch(tx[lo:hi], ty[lo:hi], f"training batch {i + 1} of 5", lo), py2)
    _dump_cifar(d / "test_batch", batch(test_images, test_labels, "testing batch 1 of 1", 0), py2)
    meta = {k("num_cases_per_batch"): int(bounds[1] - bounds[0]),
            k("label_names"): [k(n) for n in CIFAR10_CLASSES], k("num_vis"): 3072}
    _dump_cifar(d / "batches.meta", meta, py2)
    return d
