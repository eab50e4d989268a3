"""The papers' SimpleCNN (docs/protocol.md §6) and the flat parameter layout shared by every room."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SimpleCNN(nn.Module):
    """conv 5×5 → pool → conv 5×5 → pool → 400→120→84→84→256→10 (docs/protocol.md §6).

    Max-pool runs before ReLU: the two commute, so outputs and gradients are identical, and it is
    cheaper (docs/performance.md §3).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.l1 = nn.Linear(84, 84)
        self.l2 = nn.Linear(84, 256)
        self.cls = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = x.reshape(x.shape[0], -1)  # the release squeezes, which breaks for a batch of one
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.l1(x))
        x = self.l2(x)
        return self.cls(x)


def build_model(name: str = "simplecnn", in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    if name != "simplecnn":
        raise ValueError(f"unknown model {name!r}; available: simplecnn")
    return SimpleCNN(in_channels, num_classes)


def fold_input_channels(weights: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """SimpleCNN weights for C identical input channels → the 1-channel model computing the same function.

    conv1 sees x_c = x_0 for every c, so Σ_c W_c * x_c = (Σ_c W_c) * x_0 (docs/performance.md §8 lever).
    """
    k = 6 * channels * 25  # conv1.weight is the first parameter: (6, C, 5, 5)
    w1 = weights[:k].view(6, channels, 5, 5).sum(1)
    return torch.cat([w1.reshape(-1), weights[k:]])


def unfold_input_channels(per_param: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """A 1-channel SimpleCNN per-parameter vector (e.g. a Fisher) → the C-channel layout.

    With identical channels every W_c gets the gradient of the summed kernel, per sample, so each
    channel's entry equals the folded one.
    """
    w1 = per_param[:150].view(6, 1, 5, 5).expand(6, channels, 5, 5)
    return torch.cat([w1.reshape(-1), per_param[150:]])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters in registration order, which is docs/protocol.md §6's vector order."""
    return [p for p in model.parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model))


def flatten(model_or_tensors: nn.Module | Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters (or per-parameter tensors such as gradients) into one (P,) vector."""
    ts = trainable(model_or_tensors) if isinstance(model_or_tensors, nn.Module) else model_or_tensors
    return torch.cat([t.detach().reshape(-1) for t in ts])


def load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Write a (P,) vector into the model's trainable parameters, in place."""
    params = trainable(model)
    total = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat weights have shape {tuple(flat.shape)}, the model needs ({total},)")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
    return model


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a (P,) vector into named tensors shaped like the model's parameters (a view)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the model needs {offset}")
    return out
