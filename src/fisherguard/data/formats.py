"""Readers for the datasets' on-disk formats (docs/data.md §5–§7).

Every reader validates what it reads and raises :class:`DatasetCorruptError` naming the file and
the failing check.  The package only reads these formats; the writers that build fixtures in
them live with the tests (``tests/data_writers.py``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DatasetCorruptError

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "read_bytes",
    "parse_idx",
    "read_idx",
    "read_idx_pair",
    "read_usps_text",
    "read_usps_libsvm",
    "read_cifar_batch",
    "read_cifar_meta",
    "CIFAR10_CLASSES",
]

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_IDX_UBYTE = 0x08

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

PathLike = str | os.PathLike[str]


def _corrupt(path: PathLike, check: str, detail: str) -> DatasetCorruptError:
    return DatasetCorruptError(f"{path}: {check} check failed: {detail}", path=path, check=check)


def read_bytes(path: PathLike) -> bytes:
    """The whole (decompressed) content of a plain, gzip or bzip2 file; the magic bytes decide."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(3)
    try:
        if head[:2] == b"\x1f\x8b":
            with gzip.open(p, "rb") as fh:
                return fh.read()
        if head == b"BZh":
            with bz2.open(p, "rb") as fh:
                return fh.read()
    except (OSError, EOFError, ValueError) as exc:  # truncated or damaged stream
        raise _corrupt(p, "decompression", str(exc) or type(exc).__name__) from exc
    return p.read_bytes()


# --------------------------------------------------------------------------- IDX


def parse_idx(data: bytes, path: PathLike = "<bytes>", *, expect_magic: int | None = None) -> np.ndarray:
    """Decode an IDX buffer (docs/data.md §7) into a uint8 array; ``path`` only names it in errors."""
    if len(data) < 4:
        raise _corrupt(path, "header", f"{len(data)} bytes, shorter than the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise _corrupt(path, "magic number", f"bytes 0-1 are {data[0]:#04x} {data[1]:#04x}, not zero "
                       "(not an IDX file, or still compressed)")
    magic = struct.unpack(">I", data[:4])[0]
    if data[2] != _IDX_UBYTE:
        raise _corrupt(path, "dtype", f"element type {data[2]:#04x}, only 0x08 (unsigned byte) is supported")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise _corrupt(path, "magic number", f"{magic}, expected {IDX_IMAGES_MAGIC} (images) or "
                       f"{IDX_LABELS_MAGIC} (labels)")
    if expect_magic is not None and magic != expect_magic:
        kind = "images" if expect_magic == IDX_IMAGES_MAGIC else "labels"
        raise _corrupt(path, "magic number", f"{magic}, expected {expect_magic} for an {kind} file")
    nd = data[3]
    header = 4 + 4 * nd
    if len(data) < header:
        raise _corrupt(path, "header", f"{len(data)} bytes, shorter than the {header}-byte header")
    dims = struct.unpack(f">{nd}I", data[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes"
        raise _corrupt(path, "length", f"{len(data)} bytes, expected {expected} for sizes {dims} ({what})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: PathLike, *, expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file, plain or ``.gz``: images (N, H, W) or labels (N,), uint8."""
    return parse_idx(read_bytes(path), path, expect_magic=expect_magic)


def read_idx_pair(images: PathLike | bytes, labels: PathLike | bytes, *,
                  names: tuple[str, str] | None = None,
                  image_shape: tuple[int, int] | None = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """An images/labels pair: magic numbers, shapes, equal counts, labels in 0-9.

    Accepts paths or already-read buffers (then ``names`` label the errors).
    """
    in_name = names[0] if names else (images if not isinstance(images, bytes) else "<images>")
    lb_name = names[1] if names else (labels if not isinstance(labels, bytes) else "<labels>")
    xb = images if isinstance(images, bytes) else read_bytes(images)
    yb = labels if isinstance(labels, bytes) else read_bytes(labels)
    x = parse_idx(xb, in_name, expect_magic=IDX_IMAGES_MAGIC)
    y = parse_idx(yb, lb_name, expect_magic=IDX_LABELS_MAGIC)
    if x.ndim != 3 or (image_shape is not None and x.shape[1:] != tuple(image_shape)):
        raise _corrupt(in_name, "shape", f"images have shape {x.shape}, expected (N, {image_shape[0]}, "
                       f"{image_shape[1]})" if image_shape else f"images have shape {x.shape}")
    if y.ndim != 1:
        raise _corrupt(lb_name, "shape", f"labels have shape {y.shape}, expected (N,)")
    if len(y) != len(x):
        raise _corrupt(lb_name, "label count", f"{len(y)} labels for {len(x)} images in {in_name}")
    if len(y) and y.max() > 9:
        bad = int(np.argmax(y > 9))
        raise _corrupt(lb_name, "label range", f"label {int(y[bad])} at index {bad}, expected 0-9")
    return x, y.astype(np.int64)


# --------------------------------------------------------------------------- USPS


def _usps_to_uint8(values: np.ndarray) -> np.ndarray:
    # torchvision's arithmetic, float32 included: ((x + 1) / 2 * 255) truncated.  Exact
    # arithmetic would differ at x = -0.6 (51 vs torchvision's 50), so this is what "follows
    # torchvision" means (docs/protocol.md §1.1).
    x = values.astype(np.float32)
    return ((x + np.float32(1)) / np.float32(2) * np.float32(255)).astype(np.uint8)


def _check_usps(path: PathLike, labels: np.ndarray, pixels: np.ndarray, *, label_offset: int,
                lines: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    def where(i: int) -> str:
        return f"line {int(lines[i]) if lines is not None else i + 1}"

    if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
        i = int(np.argmax(~np.isfinite(labels) | (labels != np.round(labels))))
        raise _corrupt(path, "label", f"{where(i)}: label {labels[i]!r} is not an integer")
    lab = labels.astype(np.int64) - label_offset
    if lab.size and (lab.min() < 0 or lab.max() > 9):
        i = int(np.argmax((lab < 0) | (lab > 9)))
        raise _corrupt(path, "label range", f"{where(i)}: label {int(labels[i])}, expected "
                       f"{label_offset}-{9 + label_offset}")
    bad = ~np.isfinite(pixels) | (pixels < -1.0) | (pixels > 1.0)
    if bad.any():
        i = int(np.argmax(bad.any(axis=1)))
        raise _corrupt(path, "pixel range", f"{where(i)}: value {pixels[i][bad[i]][0]!r} outside [-1, 1]")
    return _usps_to_uint8(pixels).reshape(-1, 16, 16), lab


def read_usps_text(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """ESL "zip" text (gzip'd or plain): 257 numbers a line -> uint8 (N, 16, 16), int64 labels."""
    text = read_bytes(path)
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "text", f"not ASCII: {exc}") from exc
    rows, numbers = [], []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 257:
            raise _corrupt(path, "columns", f"line {lineno} has {len(fields)} numbers, expected 257")
        rows.append(lineno)
        numbers.append(" ".join(fields))
    if not rows:
        raise _corrupt(path, "rows", "no data lines")
    try:
        data = np.loadtxt(io.StringIO("\n".join(numbers)), dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise _corrupt(path, "number format", str(exc)) from exc
    return _check_usps(path, data[:, 0], data[:, 1:], label_offset=0, lines=np.asarray(rows))


def read_usps_libsvm(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """LIBSVM ``usps``/``usps.t`` (bz2 or plain): ``label index:value ...`` with labels 1-10.

    Missing indices are zeros, as LIBSVM's sparse format defines.  Returns the same as
    :func:`read_usps_text` (labels shifted to 0-9).
    """
    text = read_bytes(path)
    try:
        lines = text.decode("ascii").splitlines()
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "text", f"not ASCII: {exc}") from exc
    labels: list[float] = []
    rows: list[int] = []
    pixels: list[np.ndarray] = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            label = float(fields[0])
            pairs = [f.split(":", 1) for f in fields[1:]]
            idx = np.array([int(a) for a, _ in pairs], dtype=np.int64)
            val = np.array([float(b) for _, b in pairs], dtype=np.float64)
        except ValueError as exc:
            raise _corrupt(path, "number format", f"line {lineno}: {exc}") from exc
        if idx.size and (idx.min() < 1 or idx.max() > 256):
            raise _corrupt(path, "feature index", f"line {lineno}: index outside 1-256")
        if len(np.unique(idx)) != len(idx):
            raise _corrupt(path, "feature index", f"line {lineno}: repeated index")
        row = np.zeros(256, dtype=np.float64)
        row[idx - 1] = val
        labels.append(label)
        rows.append(lineno)
        pixels.append(row)
    if not rows:
        raise _corrupt(path, "rows", "no data lines")
    return _check_usps(path, np.asarray(labels), np.stack(pixels), label_offset=1, lines=np.asarray(rows))


# --------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2; the numpy.core alias warns there
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals the CIFAR-10 python batches need (docs/data.md §6).

    Unpickling can call any importable callable; refusing every other global in ``find_class``
    means nothing else is ever imported or called.
    """

    def __init__(self, file: BinaryIO, path: PathLike) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        import codecs

        rec = _numpy_reconstruct()
        self._allowed = {
            ("numpy.core.multiarray", "_reconstruct"): rec,
            ("numpy._core.multiarray", "_reconstruct"): rec,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _corrupt(self._path, "unpickler", f"unexpected object in CIFAR-10 batch: {module}.{name} "
                           "is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _corrupt(self._path, "unpickler", "unexpected object in CIFAR-10 batch: persistent id")


def _unpickle(path: PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            obj = _CifarUnpickler(fh, path).load()
    except DatasetCorruptError:
        raise
    except Exception as exc:  # truncated/garbled pickles raise a zoo of types
        raise _corrupt(path, "pickle", f"cannot unpickle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise _corrupt(path, "pickle", f"top-level object is {type(obj).__name__}, expected dict")
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out[key.decode("latin1") if isinstance(key, bytes) else str(key)] = value
    return out


def _as_text(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def read_cifar_batch(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One python-version CIFAR-10 batch -> uint8 (N, 3, 32, 32), int64 labels (bytes or str keys)."""
    d = _unpickle(path)
    for key in ("data", "labels"):
        if key not in d:
            raise _corrupt(path, "keys", f"no {key!r} entry (keys: {sorted(d)})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _corrupt(path, "data shape", f"'data' is {desc}, expected uint8 (N, 3072)")
    try:
        labels = np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise _corrupt(path, "labels", f"'labels' is not a list of integers: {exc}") from exc
    if labels.ndim != 1 or len(labels) != len(data):
        raise _corrupt(path, "label count", f"{labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        i = int(np.argmax((labels < 0) | (labels > 9)))
        raise _corrupt(path, "label range", f"label {int(labels[i])} at index {i}, expected 0-9")
    return data.reshape(-1, 3, 32, 32).copy(), labels


def read_cifar_meta(path: PathLike) -> dict[str, Any]:
    """``batches.meta``: ``label_names`` (str), ``num_cases_per_batch``, ``num_vis``."""
    d = _unpickle(path)
    if "label_names" not in d:
        raise _corrupt(path, "keys", f"no 'label_names' entry (keys: {sorted(d)})")
    names = [_as_text(n) for n in d["label_names"]]
    if len(names) != 10:
        raise _corrupt(path, "label names", f"{len(names)} label names, expected 10")
    out = dict(d)
    out["label_names"] = names
    return out
