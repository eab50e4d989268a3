"""The in-memory form every loader returns: :class:`RawDataset` (docs/data.md §1).

It lives apart from the loaders so that :mod:`~fisherguard.data.synthetic` (a producer) and
:mod:`~fisherguard.data.datasets` (which dispatches to it) both import it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RawDataset"]


@dataclass
class RawDataset:
    """Uint8 images and int64 labels of one dataset's official splits.

    Grey images are (N, H, W), colour images (N, 3, H, W).  ``meta`` records the dataset name,
    source directory and files, the format, how checksums were checked, class names and split sizes.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    grey: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one image: (H, W) or (3, H, W)."""
        return tuple(self.train_x.shape[1:])

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of ``"train"`` or ``"test"``."""
        if which == "train":
            return self.train_x, self.train_y
        if which == "test":
            return self.test_x, self.test_y
        raise ValueError(f"split must be 'train' or 'test', got {which!r}")
