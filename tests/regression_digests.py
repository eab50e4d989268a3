"""Fixed-seed final-weight digests of FedAvg, FDCR, SDFC and Multi-Krum runs.

The refactoring regression check: the same config must give bit-identical final weights on the
in-process engine before and after a change that claims not to change results.
``test_regression.py`` runs the synthetic set against the digests stored there;
``python tests/regression_digests.py --demo`` prints the demo config's (real Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from fisherguard import config

DEFENSES = ("fedavg", "fdcr", "sdfc", "multi-krum")

SYNTHETIC = {
    "experiment": {"name": "regression", "seed": 3},
    "data": {"dataset": "synthetic", "synthetic_train": 1200, "synthetic_test": 200},
    "partition": {"beta": 0.5},
    "federation": {"clients": 5, "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32},
    "attack": {"fraction": 0.4},
    "server": {"val_size": 64},
    "runtime": {"threads": 1},  # one thread: one reduction order for the stored digests
}


def final_weights(raw: dict[str, Any], defense: str, out: Path) -> torch.Tensor:
    from fisherguard.engine.runner import run

    cfg = config.resolve(config.apply_overrides(raw, {"defense": defense}))
    run(cfg, out, progress=None)
    return torch.load(out / "checkpoint.pt", weights_only=False)["weights"]


def machine() -> str:
    """This CPU and torch, as far as float rounding goes: the CPU's model name and feature flags
    and torch's version, hashed (kernels and their rounding are picked from these)."""
    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    key = f"{model}|{flags}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def digest(weights: torch.Tensor) -> str:
    return hashlib.sha256(weights.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def digests(raw: dict[str, Any], root: Path) -> dict[str, str]:
    return {d: digest(final_weights(raw, d, root / d)) for d in DEFENSES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--demo", action="store_true", help="the demo config (needs Fashion-MNIST)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the demo config")
    args = ap.parse_args()
    raw = SYNTHETIC
    if args.demo:
        import yaml

        raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
        raw.pop("variants")
        raw["federation"]["rounds"] = args.rounds
        raw["runtime"] = {"threads": 1}
    print(f"machine {machine()} ({torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__})")
    with tempfile.TemporaryDirectory() as tmp:
        for name, d in digests(raw, Path(tmp)).items():
            print(f"{name:12s} {d}")


if __name__ == "__main__":
    main()
