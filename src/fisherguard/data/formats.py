"""Readers and writers for the datasets' on-disk formats (spec data.md §5-§7).

Every reader validates what it reads and raises :class:`DatasetCorruptError` naming the file and
the failing check.  The writers produce the same formats from arrays; tests and fixtures use them
so every reader is exercised without real data.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO, Mapping

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
    "write_idx",
    "write_usps_text",
    "write_usps_libsvm",
    "write_cifar_batches",
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
    """Decode an IDX buffer (data.md §7) into a uint8 array; ``path`` only names it in errors."""
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


# --------------------------------------------------------------------------- USPS


def _usps_to_uint8(values: np.ndarray) -> np.ndarray:
    # torchvision's arithmetic, float32 included: ((x + 1) / 2 * 255) truncated.  Exact
    # arithmetic would differ at x = -0.6 (51 vs torchvision's 50), so this is what "follows
    # torchvision" means (protocol §1.1).
    x = values.astype(np.float32)
    return ((x + np.float32(1)) / np.float32(2) * np.float32(255)).astype(np.uint8)


def _uint8_to_usps(images: np.ndarray) -> np.ndarray:
    """Values in [-1, 1] at the files' 0.001 resolution that map back to the same uint8."""
    u = np.asarray(images, dtype=np.float64)
    x = np.round((u + 0.5) / 255.0 * 2.0 - 1.0, 3)
    x[u == 0] = -1.0  # background is exactly -1 in the real files
    x[u == 255] = 1.0
    return x


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


def write_usps_text(path: PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write ESL "zip" text (gzip'd if the name ends in ``.gz``) that reads back to ``images``."""
    p = Path(path)
    x = _uint8_to_usps(np.asarray(images).reshape(len(images), 256))
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
    x = _uint8_to_usps(np.asarray(images).reshape(len(images), 256))
    y = np.asarray(labels, dtype=np.int64) + 1
    lines = [f"{int(lab)} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row)) for lab, row in zip(y, x)]
    payload = ("\n".join(lines) + "\n").encode("ascii")
    p.write_bytes(bz2.compress(payload) if p.name.endswith(".bz2") else payload)
    return p


# --------------------------------------------------------------------------- CIFAR-10


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2; the numpy.core alias warns there
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals the CIFAR-10 python batches need (data.md §6).

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


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Emits what Python 2's cPickle wrote for CIFAR-10: ``bytes`` and ``str`` as py2 ``str``
    opcodes and the numpy 1 module path, so the fixtures exercise the same opcodes as the real files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_py2_text(self, obj: str) -> None:
        # Python 2 had no separate text type here: numpy's dtype state ('u1', '|') was a str too
        self.save_py2_str(obj.encode("latin1"))

    dispatch[str] = save_py2_text

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _numpy_reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump_cifar(path: Path, obj: Mapping[Any, Any], py2: bool) -> None:
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
