"""A Flower deployment with client sampling against the in-process engine (issue 18).

K = 5 SuperNodes on 127.0.0.1 (TLS and node authentication, the default recipe), 60 % of the
clients a round (m = 3), 3 rounds, synthetic data, 40 % attackers. With SDFC (the default) the
clients skip rounds and come back, so its per-client state (H_k and anchor) is read after
absences. Prints per round the sampled ids and the per-client weights of both engines, and the
largest difference of the final weights; exit 2 when the sampled ids differ or the final weights
differ by more than 1e-4. Every process started is stopped.

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    python benchmarks/sampled_deployment.py [--defense sdfc] [--clients 5] [--fraction 0.6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 1e-4


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense", default="sdfc")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--fraction", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import torch

    from fisherguard import config
    from fisherguard.engine.flower import launch
    from fisherguard.engine.runner import run
    from fisherguard.results import RunDir

    cfg = config.resolve({
        "experiment": {"name": "deploy-sampled", "seed": 1},
        "data": {"dataset": "synthetic", "synthetic_train": 300 * a.clients,
                 "synthetic_test": 100},
        "federation": {"clients": a.clients, "fraction": a.fraction, "rounds": a.rounds,
                       "local_epochs": 1, "batch_size": 32},
        "attack": {"fraction": 0.4}, "server": {"val_size": 32}, "defense": a.defense,
        "runtime": {"threads": 1}})
    with tempfile.TemporaryDirectory(prefix="fisherguard-sampled-") as tmp:
        out = Path(tmp)
        t0 = time.perf_counter()
        run(cfg, out / "inprocess", progress=None)
        t1 = time.perf_counter()
        with launch.options(run_timeout=900.0):
            launch.deploy(cfg, out / "flower", progress=None)
        t2 = time.perf_counter()
        ref, got = RunDir(out / "inprocess").rounds(), RunDir(out / "flower").rounds()
        same_ids = True
        print(f"# {a.defense}, K = {a.clients}, fraction {a.fraction}, {a.rounds} rounds: "
              f"in-process {t1 - t0:.1f} s, deployment {t2 - t1:.1f} s (start-up included)")
        for r, g in zip(ref, got):
            same_ids &= r["clients"]["ids"] == g["clients"]["ids"]
            print(f"  round {r['round']}: ids {r['clients']['ids']} / {g['clients']['ids']}, "
                  f"weights {[round(w, 6) for w in r['clients']['weights']]} / "
                  f"{[round(w, 6) for w in g['clients']['weights']]}, attackers sampled "
                  f"{g['sampling']['attackers_sampled']}")
        wa = torch.load(out / "inprocess" / "checkpoint.pt", weights_only=False)["weights"]
        wb = torch.load(out / "flower" / "checkpoint.pt", weights_only=False)["weights"]
        d = float((wa - wb).abs().max())
    print(f"  final weights: max-abs difference {d:.2e}"
          + ("" if d <= TOLERANCE and same_ids and len(ref) == len(got) else "  ERROR"))
    return 0 if d <= TOLERANCE and same_ids and len(ref) == len(got) else 2


if __name__ == "__main__":
    sys.exit(main())
