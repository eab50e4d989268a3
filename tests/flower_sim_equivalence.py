"""Helper of test_flower_runtime (not a test module): one round of FedAvg, FDCR and SDFC, and two
rounds of FedAvg under each trigger-optimising attack (its per-round trigger shipped to the attacker
node), through the in-process engine and through Flower's simulation (one Flower run for all),
printed as one JSON line. The test runs it inside a network namespace that has only loopback, because Ray
binds ports on every interface (docs/flower.md §8.0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fisherguard import config
from fisherguard.engine.federation import initial_weights, prepare
from fisherguard.engine.runner import run
from fisherguard.engine.flower import launch

RAW = {"experiment": {"name": "equivalence", "seed": 3},
       "data": {"dataset": "synthetic", "synthetic_train": 900, "synthetic_test": 100},
       "federation": {"clients": 3, "rounds": 1, "local_epochs": 1, "batch_size": 32},
       "attack": {"fraction": 0.34}, "server": {"val_size": 32}, "runtime": {"threads": 1}}
DEFENSES = ("fedavg", "fdcr", "sdfc")
# label → overrides; the attacks' budgets are tiny, and asr_stop = 1 makes the trigger move
RUNS = {**{d: {"defense": d} for d in DEFENSES},
        "a3fl": {"defense": "fedavg", "federation.rounds": 2, "attack.name": "a3fl",
                 "attack.options": {"trigger_epochs": 1, "adv_epochs": 1, "asr_stop": 1.0}},
        "iba": {"defense": "fedavg", "federation.rounds": 2, "attack.name": "iba",
                "attack.options": {"generator_epochs": 1, "width": 4, "pgd_bound": 5.0,
                                   "asr_stop": 1.0}}}


def main(root: Path) -> None:
    cfgs = {d: config.resolve(config.apply_overrides(RAW, o)) for d, o in RUNS.items()}
    for d, c in cfgs.items():
        run(c, root / "inprocess" / d, progress=None)
    with launch.options(run_timeout=330.0, round_timeout=120.0, keep_logs=root / "logs"):
        summaries = launch.simulate_many([(c, root / "flower-sim" / d, d) for d, c in cfgs.items()],
                                         progress=None)
    out = {"engines": [s["engine"] for s in summaries]}
    for d in RUNS:
        a, b = (torch.load(root / e / d / "checkpoint.pt", weights_only=False)["weights"]
                for e in ("inprocess", "flower-sim"))
        ra, rb = (json.loads((root / e / d / "rounds.jsonl").read_text().splitlines()[-1])
                  for e in ("inprocess", "flower-sim"))
        w0 = initial_weights(prepare(cfgs[d]))
        out[d] = {"max_abs": float((a - b).abs().max()), "moved": float((a - w0).abs().max()),
                  "flags": [ra["clients"]["flagged"], rb["clients"]["flagged"]],
                  "replies": rb["replies"]["received"]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
