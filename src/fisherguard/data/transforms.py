"""Raw uint8 images → the model's normalised 3×32×32 (or 1×32×32) tensors (docs/protocol.md §1.2).

Images are resized once and kept as uint8 at 32×32 (one channel for grey sets, to save memory);
crop, flip, scaling, channel replication and normalisation run per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GREY_MEAN, GREY_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)
PAD = 4
SIZE = 32


def resize_to_32(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W) or (N,3,H,W) → uint8 (N,C,32,32), bilinear, rounded back to uint8 like PIL."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[-2:] == (SIZE, SIZE):
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], SIZE, SIZE), dtype=torch.uint8)
    for s in range(0, x.shape[0], 4096):  # chunks keep the float copy small
        f = F.interpolate(x[s:s + 4096].float(), size=(SIZE, SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
        out[s:s + 4096] = f.round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass(frozen=True)
class Normaliser:
    """Scaling to [0, 1], channel replication for grey sets, per-channel normalisation."""

    grey: bool
    out_channels: int  # 3 (protocol) or 1 (the 1-channel variant, grey sets only)

    @property
    def mean(self) -> torch.Tensor:
        m = GREY_MEAN * self.out_channels if self.grey else CIFAR_MEAN
        return torch.tensor(m).view(1, -1, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        s = GREY_STD * self.out_channels if self.grey else CIFAR_STD
        return torch.tensor(s).view(1, -1, 1, 1)

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.float().div_(255.0)
        if self.grey and self.out_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, *, flip: bool) -> torch.Tensor:
    """Zero-pad by 4 and cut a random 32×32 window per image (and flip half of them, CIFAR-10)."""
    b, c = x.shape[:2]
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    oy = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    ar = torch.arange(SIZE)
    rows = (oy[:, None] + ar)[:, :, None]  # (B, 32, 1)
    cols = (ox[:, None] + ar)[:, None, :]  # (B, 1, 32)
    if flip:
        do = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(do[:, None, None], cols.flip(-1), cols)
    bi = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows, cols]  # (B, 32, 32, C)
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Pipeline:
    """The training and test transforms of one dataset (docs/protocol.md §1.2–§1.3)."""

    grey: bool
    out_channels: int = 3

    @property
    def normalise(self) -> Normaliser:
        return Normaliser(self.grey, self.out_channels)

    def train(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.normalise(random_crop_flip(x_uint8, generator, flip=not self.grey))

    def test(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.normalise(x_uint8)
