"""Checksums of dataset files (docs/data.md §8): digests, the stamp file that remembers them,
and :func:`check_checksums`, which compares files with the catalogue's published digests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path
from typing import IO, Any, Mapping

from . import catalogue, locate
from .catalogue import Spec
from .errors import DatasetCorruptError

__all__ = ["STAMP_NAME", "check_checksums", "file_hash"]

STAMP_NAME = ".fisherguard-verified.json"
_STAMP_VERSION = 1
_CHUNK = 1 << 20

# In-process memo keyed by (path, size, mtime_ns) so directories we may not stamp (the shared
# folder, /usr/share) are hashed once per process, not once per load.
_MEMO: dict[tuple[str, int, int, str], str] = {}


def _feed(h: Any, fh: IO[bytes]) -> None:
    """Hash a binary stream chunk by chunk, so large files are never read whole."""
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        h.update(chunk)


def file_hash(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes as stored (no decompression, no memo)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        _feed(h, fh)
    return h.hexdigest()


def _content_name(path: Path, fmt: str) -> str:
    """The key of docs/data.md's checksum tables: IDX files are hashed decompressed."""
    if fmt == "idx" and path.name.endswith(".gz"):
        return path.name[:-3]
    return path.name


def _open_content(path: Path, fmt: str) -> IO[bytes]:
    """The stream that is hashed: decompressed for a gzip'd IDX file, the raw bytes otherwise."""
    if fmt == "idx" and path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _digest(path: Path, fmt: str, algorithm: str, content: bytes | None = None, *,
            use_memo: bool = True) -> str:
    """The digest docs/data.md lists for ``path``; ``content`` saves re-reading already-read bytes."""
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
                _feed(h, fh)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DatasetCorruptError(f"{path}: decompression check failed: {exc}", path=path,
                                      check="decompression") from exc
    _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def _stampable(spec: Spec, directory: Path, root: str | os.PathLike[str] | None) -> bool:
    """Whether a stamp may be written into ``directory``."""
    # Only folders inside the data root get a stamp: the extra places (system directories, the
    # shared data folder) belong to someone else, and root can write almost anywhere.
    base = locate.data_root(root)
    try:
        directory.resolve().relative_to(base.resolve())
    except ValueError:
        return False
    return os.access(directory, os.W_OK)


def _read_stamp(directory: Path) -> dict:
    """The per-file entries of the directory's stamp; {} when absent, unreadable or of another version."""
    try:
        data = json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _STAMP_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _write_stamp(directory: Path, entries: dict[str, dict]) -> bool:
    """Write the stamp atomically; False when the folder is read-only."""
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
    """Compare every file with docs/data.md's digest (docs/data.md §8).

    ``contents`` may hold already-read bytes per logical file (decompressed for IDX) so that a
    loader does not read a file twice.  With ``use_stamp``, a valid stamp (names, sizes, mtimes
    and the expected digests) or this process's memo skips hashing; without, every file is hashed.  Returns ``{"source": "stamp"|"computed",
    "files": {...}}``; raises :class:`DatasetCorruptError` listing every mismatch.
    """
    spec = catalogue.spec_of(name)
    fmt = catalogue.format_of(spec, files)
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
        commands = locate.fix_commands(spec.name, locate.data_root(root))
        msg = (f"{spec.title}: checksum check failed in {directory}:\n  " + "\n  ".join(failures)
               + "\nDelete the bad file(s) and fetch again.\n" + locate.format_commands(commands))
        first = next(iter(f.split(":")[0] for f in failures))
        raise DatasetCorruptError(msg, path=first, check="checksum", dataset=spec.name, commands=commands)
    if _stampable(spec, directory, root):
        _write_stamp(directory, {k: {kk: vv for kk, vv in v.items() if kk not in ("expected", "ok")}
                                 for k, v in report.items()})
    return {"source": "computed", "files": report}
