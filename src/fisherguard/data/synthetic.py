"""The ``synthetic`` dataset (docs/data.md §10): seeded, balanced, learnable, backdoor-ready.

Each class has a smooth prototype (a random binary coarse grid, upsampled with softened edges).
A sample is its prototype times a random contrast factor, plus Gaussian noise, clipped, and pasted with a random shift of up to ``max_shift`` pixels into a black canvas.  The
canvas keeps a dark margin of at least ``MARGIN`` pixels on every side after the shift, so the
top-left trigger box of docs/protocol.md §5.2 (rows 0-2, columns 0-6 of the 32×32 tensor) covers
only background: it carries no class signal.
"""

from __future__ import annotations

import numpy as np

from .raw import RawDataset

__all__ = ["make_synthetic", "TASK_SEED", "MARGIN", "KINDS"]

TASK_SEED = 20240917  # fixed: every run seed sees the same task (same prototypes)
MARGIN = 4  # dark pixels on each side after the largest shift, in the raw image's coordinates
KINDS = {"grey28": (1, 28), "rgb32": (3, 32)}
_COARSE = 3  # coarse code grid: large blobs (finer grids make the ±2 px shift much harder to learn)
_MIN_DISTANCE = 4  # cells in which any two class codes differ
_TRAIN_STREAM, _TEST_STREAM = 1, 2


def _box_blur(images: np.ndarray) -> np.ndarray:
    """3×3 mean filter over the last two axes (edge-padded): softens block edges into smooth ones."""
    pad = np.pad(images, [(0, 0)] * (images.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = images.shape[-2:]
    return sum(pad[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _codes(rng: np.random.Generator) -> np.ndarray:
    """Ten binary ``_COARSE``×``_COARSE`` codes, half the cells on (similar brightness), pairwise
    differing in at least ``_MIN_DISTANCE`` cells (so no two classes look alike)."""
    cells = _COARSE * _COARSE
    codes: list[np.ndarray] = []
    tries = 0
    while len(codes) < 10:
        tries += 1
        if tries > 1000:  # a greedy draw can paint itself into a corner: start over
            codes, tries = [], 0
        code = np.zeros(cells)
        code[rng.permutation(cells)[: cells // 2]] = 1.0
        if all(int((code != other).sum()) >= _MIN_DISTANCE for other in codes):
            codes.append(code)
    return np.stack(codes).reshape(10, _COARSE, _COARSE)


def prototypes(kind: str = "grey28", task_seed: int = TASK_SEED, max_shift: int = 2) -> np.ndarray:
    """The 10 class prototypes, float in [0, 1], shape (10, C, W, W) with W the content window.

    Each is a binary coarse code upsampled to the window with softened edges; colour
    prototypes multiply it by a per-class colour.  Full-intensity strokes matter: dim
    prototypes leave SimpleCNN on its initial plateau for most of a short training run.
    """
    channels, size = KINDS[kind]
    window = size - 2 * (MARGIN + max_shift)
    if max_shift < 0 or window < 2 * _COARSE:
        raise ValueError(f"max_shift={max_shift} leaves a {window}-pixel window; the least is {2 * _COARSE}")
    rng = np.random.Generator(np.random.PCG64(task_seed))
    codes = _codes(rng)
    cell = np.arange(window) * _COARSE // window  # nearest-neighbour upsampling, any window size
    up = codes[:, None][:, :, cell][:, :, :, cell]  # (10, 1, W, W)
    protos = _box_blur(up)
    if channels == 3:
        colours = rng.uniform(0.45, 1.0, size=(10, 3, 1, 1))
        protos = protos * colours
    return protos


def _draw(n: int, rng: np.random.Generator, protos: np.ndarray, size: int, max_shift: int,
          noise: float, contrast: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.permutation(np.arange(n, dtype=np.int64) % 10)  # balanced, class-mixed order
    shifts = rng.integers(-max_shift, max_shift + 1, size=(n, 2))
    gain = rng.uniform(contrast[0], contrast[1], size=n)
    c, w = protos.shape[1], protos.shape[-1]
    content = protos[labels] * gain[:, None, None, None]
    content += noise * rng.standard_normal(content.shape)
    content = np.clip(content, 0.0, 1.0)
    images = np.zeros((n, c, size, size), dtype=np.float64)
    start = MARGIN + max_shift
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            sel = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            if sel.size:
                r, q = start + dy, start + dx
                images[sel, :, r:r + w, q:q + w] = content[sel]
    return np.rint(images * 255.0).astype(np.uint8), labels


def make_synthetic(
    n_train: int = 3000,
    n_test: int = 1000,
    *,
    kind: str = "grey28",
    seed: int = 0,
    noise: float = 0.2,
    task_seed: int = TASK_SEED,
    max_shift: int = 2,
    contrast: tuple[float, float] = (0.8, 1.0),
) -> RawDataset:
    """Generate the synthetic dataset.

    ``kind="grey28"`` gives (N, 28, 28) like MNIST, ``"rgb32"`` (N, 3, 32, 32) like CIFAR-10;
    both uint8.  ``noise`` is the Gaussian noise std in units of full intensity (the difficulty
    knob).  ``task_seed`` fixes the prototypes; ``seed`` draws the samples, with separate
    streams for train and test (so the test set does not depend on ``n_train``).  Same
    arguments give byte-identical arrays.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; available: {', '.join(KINDS)}")
    for label, n in (("n_train", n_train), ("n_test", n_test)):
        if int(n) != n or n < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {n!r}")
    if seed < 0 or task_seed < 0:
        raise ValueError("seed and task_seed must be non-negative")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if not 0 < contrast[0] <= contrast[1]:
        raise ValueError(f"contrast must be (low, high) with 0 < low <= high, got {contrast}")
    channels, size = KINDS[kind]
    protos = prototypes(kind, task_seed, max_shift)
    args = (protos, size, max_shift, noise, contrast)
    tr_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _TRAIN_STREAM])))
    te_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _TEST_STREAM])))
    train_x, train_y = _draw(int(n_train), tr_rng, *args)
    test_x, test_y = _draw(int(n_test), te_rng, *args)
    if channels == 1:
        train_x, test_x = train_x[:, 0], test_x[:, 0]
    meta = {
        "name": "synthetic",
        "kind": kind,
        "seed": seed,
        "task_seed": task_seed,
        "noise": noise,
        "max_shift": max_shift,
        "contrast": tuple(contrast),
        "source_dir": None,
        "checksums": "n/a (generated)",
        "format": "generated",
        "class_names": [f"class {i}" for i in range(10)],
        "splits": {"train": int(n_train), "test": int(n_test)},
    }
    return RawDataset("synthetic", train_x, train_y, test_x, test_y, grey=channels == 1, meta=meta)
