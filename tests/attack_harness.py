"""Shared checks for attacks: a short engine run on generated data, and grouped = per-client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fisherguard import config
from fisherguard.engine.runner import run

BASE: dict[str, Any] = {
    "experiment": {"name": "attack-e2e", "seed": 0},
    "data": {"dataset": "synthetic", "synthetic_train": 1500, "synthetic_test": 300},
    "partition": {"beta": 0.5},
    "federation": {"clients": 5, "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32},
    "attack": {"fraction": 0.4},
    "server": {"val_size": 64},
    "runtime": {"threads": 1},
}


def attack_config(name: str, options: dict[str, Any] | None = None, **sets: Any) -> config.Config:
    """The harness config with this attack (``sets``: dotted overrides)."""
    raw = config.apply_overrides(BASE, {"attack.name": name, "attack.options": options or {},
                                        **sets})
    return config.resolve(raw)


def run_attack(tmp: Path, name: str, options: dict[str, Any] | None = None,
               **sets: Any) -> tuple[dict[str, Any], list[dict[str, Any]], torch.Tensor]:
    """Run 2 rounds; return the summary, the round records and the final weights."""
    cfg = attack_config(name, options, **sets)
    summary = run(cfg, tmp, progress=None)
    rounds = [json.loads(x) for x in (tmp / "rounds.jsonl").read_text().splitlines()]
    weights = torch.load(tmp / "checkpoint.pt", weights_only=False)["weights"]
    return summary, rounds, weights


def grouped_equals_per_client(tmp: Path, name: str, options: dict[str, Any] | None = None,
                              atol: float = 1e-5, **sets: Any) -> float:
    """Max difference of the final weights between the grouped and the per-client trainer."""
    _, _, a = run_attack(tmp / "grouped", name, options, **{"runtime.trainer": "grouped", **sets})
    _, _, b = run_attack(tmp / "sequential", name, options,
                         **{"runtime.trainer": "sequential", **sets})
    diff = float((a - b).abs().max())
    assert diff <= atol, f"{name}: grouped and per-client trainers differ by {diff}"
    return diff
