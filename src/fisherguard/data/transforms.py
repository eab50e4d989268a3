"""Raw uint8 images → the model's normalised 3×32×32 (or 1×32×32) tensors (docs/protocol.md §1.2).

Images are resized once and kept as uint8 at 32×32 (one channel for grey sets, to save memory);
crop, flip, scaling, channel replication and normalisation run per batch.
"""

from __future__ import annotations

import math
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
    b = x.shape[0]
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    oy = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * PAD + 1, (b,), generator=generator)
    # every window as a view (B, 9, 9, C, 32, 32); one gather of whole windows is ≈4× faster than
    # indexing each pixel's row and column (docs/performance.md §8.2)
    windows = padded.unfold(2, SIZE, 1).unfold(3, SIZE, 1).permute(0, 2, 3, 1, 4, 5)
    out = windows[torch.arange(b), oy, ox]  # (B, C, 32, 32)
    if flip:
        do = torch.rand(b, generator=generator) < 0.5
        out = torch.where(do[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


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


# The SDFC release's "strong" augmentation of U for CIFAR-10 (docs/protocol.md §1.3, `code`):
# random resized crop to 32 (scale 0.2–1, aspect 3/4–4/3), horizontal flip, colour jitter
# (brightness, contrast, saturation 0.4, hue 0.1) applied with p = 0.8 in a random order, random
# greyscale with p = 0.2. The parameters are the release's; the sampling is the usual one of these
# transforms, drawn from the caller's stream (torchvision's own random draws cannot be matched).
STRONG_SCALE, STRONG_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
STRONG_JITTER = (0.4, 0.4, 0.4, 0.1)
STRONG_P_JITTER, STRONG_P_GREY = 0.8, 0.2


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def resized_crop_boxes(n: int, generator: torch.Generator, size: int = SIZE
                       ) -> torch.Tensor:
    """(n, 4) boxes (top, left, height, width): up to 10 tries of a random area share in
    ``STRONG_SCALE`` and log-uniform aspect in ``STRONG_RATIO``, else the central crop."""
    area = float(size * size)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    lr = (math.log(STRONG_RATIO[0]), math.log(STRONG_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(n, *STRONG_SCALE, generator)
        aspect = torch.exp(_uniform(n, *lr, generator))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        top = (torch.rand(n, generator=generator, dtype=torch.float64)
               * (size - h + 1).clamp(min=1)).long()
        left = (torch.rand(n, generator=generator, dtype=torch.float64)
                * (size - w + 1).clamp(min=1)).long()
        ok = ~done & (w > 0) & (w <= size) & (h > 0) & (h <= size)
        boxes[ok] = torch.stack([top, left, h, w], 1)[ok]
        done |= ok
    boxes[~done] = torch.tensor([0, 0, size, size])  # ratio 1 lies inside STRONG_RATIO
    return boxes


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized (bilinear) to the full size; a box never exceeds the image, so
    this only enlarges and needs no antialiasing."""
    b, _, hgt, wid = x.shape
    top, left, h, w = (boxes[:, i].to(x.dtype) for i in range(4))
    # output pixel centres mapped into the box, in the [-1, 1] coordinates of grid_sample
    ar = (torch.arange(SIZE, dtype=x.dtype) + 0.5) / SIZE
    ys = (top[:, None] + ar[None] * h[:, None]) / hgt * 2 - 1  # (B, 32)
    xs = (left[:, None] + ar[None] * w[:, None]) / wid * 2 - 1
    grid = torch.stack([xs[:, None, :].expand(b, SIZE, SIZE), ys[:, :, None].expand(b, SIZE, SIZE)],
                       -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f.view(-1, 1, 1, 1) * a + (1 - f.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(mx == r, ((g - b) / safe) % 6,
                    torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)),
                    torch.zeros_like(mx))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV → RGB in closed form: channel n ∈ (5, 3, 1) is v − v·s·clamp(min(k, 4 − k), 0, 1)
    # with k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * h) % 6
        out.append(mx - mx * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def colour_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue factors per image, applied in a random order
    drawn per image (images that share an order are transformed together)."""
    n = x.shape[0]
    bri, con, sat, hue = STRONG_JITTER
    fb = _uniform(n, 1 - bri, 1 + bri, generator).to(x.dtype)
    fc = _uniform(n, 1 - con, 1 + con, generator).to(x.dtype)
    fs = _uniform(n, 1 - sat, 1 + sat, generator).to(x.dtype)
    fh = _uniform(n, -hue, hue, generator).to(x.dtype)
    orders = torch.rand(n, 4, generator=generator).argsort(1)
    out = x.clone()
    for order in torch.unique(orders, dim=0):
        idx = (orders == order).all(1).nonzero().squeeze(1)
        y = x[idx]
        for op in order.tolist():
            if op == 0:
                y = (y * fb[idx].view(-1, 1, 1, 1)).clamp(0, 1)
            elif op == 1:
                y = _blend(y, _grey(y).mean((1, 2, 3), keepdim=True), fc[idx])
            elif op == 2:
                y = _blend(y, _grey(y), fs[idx])
            else:
                y = _shift_hue(y, fh[idx])
        out[idx] = y
    return out


def strong_augment(x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The SDFC release's CIFAR-10 augmentation of U on uint8 RGB (N, 3, 32, 32), in [0, 1]."""
    if x_uint8.shape[1] != 3:
        raise ValueError("the strong augmentation needs RGB images (CIFAR-10)")
    n = x_uint8.shape[0]
    x = x_uint8.float().div(255.0)
    x = _crop_resize(x, resized_crop_boxes(n, generator))
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    jitter = torch.rand(n, generator=generator) < STRONG_P_JITTER
    if bool(jitter.any()):
        x = x.clone()
        x[jitter] = colour_jitter(x[jitter], generator)
    grey = torch.rand(n, generator=generator) < STRONG_P_GREY
    x = torch.where(grey.view(-1, 1, 1, 1), _grey(x).expand(-1, 3, -1, -1), x)
    return x


@dataclass(frozen=True)
class StrongPipeline(Pipeline):
    """A pipeline whose training transform is the strong augmentation (the `code` preset's U for
    CIFAR-10 in the `sdfc` family); the test transform is unchanged."""

    def train(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.grey:
            raise ValueError("the strong augmentation is for CIFAR-10 (RGB) only")
        x = strong_augment(x_uint8, generator)
        return (x - self.normalise.mean) / self.normalise.std
