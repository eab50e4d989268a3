"""Helper of test_flower_runtime (not a test module): one round of FedAvg, FDCR and SDFC, and two
rounds of FedAvg under each trigger-optimising attack (its per-round trigger shipped to the attacker
node), at K = 3; two sampled rounds of SDFC and of FDCR (rule `cumulative`) at K = 200 with 10
clients a round, so that clients skip a round and the defenses' per-client state matters (issue
18); all through the in-process engine and through Flower's simulation (one Flower run for all,
200 simulated nodes: the K = 3 runs use the first three), printed as one JSON line. The test
runs it inside a network namespace that has only loopback, because Ray binds ports on every
interface (docs/flower.md §8.0)."""

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
# K = 200, 10 sampled a round, 20 attackers; `workers: 1` keeps the in-process grouped trainer in
# this process (no worker start-up; the numbers do not depend on it)
SAMPLED_RAW = {"experiment": {"name": "sampled", "seed": 5},
               "data": {"dataset": "synthetic", "synthetic_train": 2400, "synthetic_test": 100},
               "partition": {"beta": 0.0, "min_size": 5},
               "federation": {"clients": 200, "clients_per_round": 10, "rounds": 2,
                              "local_epochs": 1, "batch_size": 8},
               "attack": {"fraction": 0.1}, "server": {"val_size": 32},
               "runtime": {"threads": 1, "workers": 1}}
SAMPLED = {"sampled-sdfc": {"defense": "sdfc"},
           "sampled-fdcr": {"defense": "fdcr", "defense.options": {"rule": "cumulative"}}}


def _rounds(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines() if x.strip()]


def state_gap(a, b) -> float:
    """Largest difference between two defense states relative to max(1, |value|); inf when
    their structure (keys, client ids, lengths, non-float values) differs."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return float("inf")
        return max([state_gap(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return float("inf")
        return max([state_gap(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        return float((a.double() - b.double()).abs().max() / max(1.0, float(a.abs().max())))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) / max(1.0, abs(a))
    return 0.0 if a == b else float("inf")


def sampled_result(root: Path, label: str, cfg) -> dict:
    """Per round: sampled ids, per-client aggregation weights and flags, the `sampling` block of
    each engine's record; the final weights' and the defense state's largest difference."""
    dirs = [root / e / label for e in ("inprocess", "flower-sim")]
    ra, rb = (_rounds(d) for d in dirs)
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in dirs)
    w0 = initial_weights(prepare(cfg))
    return {"ids": [[r["clients"]["ids"] for r in rs] for rs in (ra, rb)],
            "weight_gap": max(max(abs(x - y) for x, y in zip(p["clients"]["weights"],
                                                              q["clients"]["weights"]))
                              if len(p["clients"]["weights"]) == len(q["clients"]["weights"])
                              else float("inf") for p, q in zip(ra, rb)),
            "weights": [r["clients"]["weights"] for r in ra],
            "flags": [[r["clients"]["flagged"] for r in rs] for rs in (ra, rb)],
            "sampling": [[r.get("sampling") for r in rs] for rs in (ra, rb)],
            "replies": [r["replies"]["received"] for r in rb],
            "attackers": json.loads((dirs[0] / "partition.json").read_text())["attackers"],
            "max_abs": float((a["weights"] - b["weights"]).abs().max()),
            "moved": float((a["weights"] - w0).abs().max()),
            "state_gap": state_gap(a["defense_state"], b["defense_state"]),
            "state_clients": len(a["defense_state"].get("client_ids")
                                 or a["defense_state"].get("cumulative") or ())}


def main(root: Path) -> None:
    cfgs = {d: config.resolve(config.apply_overrides(RAW, o)) for d, o in RUNS.items()}
    cfgs.update({d: config.resolve(config.apply_overrides(SAMPLED_RAW, o))
                 for d, o in SAMPLED.items()})
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
    for d in SAMPLED:
        out[d] = sampled_result(root, d, cfgs[d])
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
