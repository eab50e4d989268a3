"""K = 1000 virtual nodes in one Flower simulation on this machine (issue 18), against the in-process engine.

One sampled run (synthetic data, K clients, ``--per-round`` sampled a round, 10 % attackers,
E = 1) per defense, in-process and then on Flower's simulation (``fisherguard run --engine
flower-sim``: a SuperLink in simulation mode with K simulated nodes, Ray actors one per core).
Printed per defense: the wall time of each engine from launch to saved model, the rounds' wall
times, the sampled ids (equal in both), the largest difference of the per-client weights and of
the final global weights, and each engine's peak memory summed over its process tree (PSS, sampled every 0.5 s).

Ray binds ports on every interface; ``--netns`` re-runs the script inside a private network
namespace that has only loopback (Linux, root or user namespaces).

    python benchmarks/sim_scale.py --netns [--clients 1000] [--per-round 100] [--defense sdfc fdcr]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib


def config(defense: str, clients: int, per_round: int, rounds: int) -> dict:
    return {"experiment": {"name": f"sim-scale-{defense}", "seed": 7},
            # 20 samples a client: the sampled clients' work stays small, so the cost shown is
            # that of K nodes, not of training
            "data": {"dataset": "synthetic", "synthetic_train": 20 * clients + 300,
                     "synthetic_test": 200, "train_subset": 20 * clients},
            "partition": {"beta": 0.0, "min_size": 5},
            "federation": {"clients": clients, "clients_per_round": per_round, "rounds": rounds,
                           "local_epochs": 1, "batch_size": 10},
            "attack": {"fraction": 0.1}, "server": {"val_size": 64},
            "defense": defense, "runtime": {"threads": 1, "workers": 1}}


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak summed PSS (MiB) of the process tree sampled every 0.5 s, return code."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], benchlib.tree_pss_bytes(p.pid) / 2**20)
            time.sleep(0.5)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    _, err = p.communicate()
    w.join()
    if p.returncode:
        print(err[-3000:], file=sys.stderr)
    return time.perf_counter() - t0, peak[0], p.returncode


def rounds(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines() if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--defense", nargs="+", default=["sdfc", "fdcr"])
    ap.add_argument("--json", type=Path, help="append one JSON line per defense here")
    ap.add_argument("--netns", action="store_true",
                    help="re-run inside a private loopback-only network namespace")
    a = ap.parse_args()
    if a.netns and (code := benchlib.rerun_in_netns()) is not None:
        return code

    import torch
    import yaml

    from fisherguard.engine.flower import FLOWER_ENV

    env = {**os.environ, **FLOWER_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    benchlib.print_system(benchlib.system_info())
    with tempfile.TemporaryDirectory() as tmp:
        for defense in a.defense:
            cfg = Path(tmp) / f"{defense}.yaml"
            cfg.write_text(yaml.safe_dump(config(defense, a.clients, a.per_round, a.rounds)))
            out = {}
            row: dict = {"defense": defense, "K": a.clients, "per_round": a.per_round}
            for engine in ("in-process", "flower-sim"):
                out[engine] = Path(tmp) / f"{defense}-{engine}"
                cmd = [sys.executable, "-m", "fisherguard", "run", str(cfg), "--out",
                       str(out[engine]), "-q"] + (["--engine", engine] if engine != "in-process" else [])
                wall, peak, rc = timed_run(cmd, env)
                if rc:
                    print(f"{defense} {engine}: exit {rc}", file=sys.stderr)
                    return rc
                recs = rounds(out[engine])
                row[engine] = {"wall_s": round(wall, 1), "peak_pss_mib": round(peak),
                               "round_s": [round(r["wall_time_s"], 2) for r in recs]}
            ra, rb = rounds(out["in-process"]), rounds(out["flower-sim"])
            row["same_ids"] = all(x["clients"]["ids"] == y["clients"]["ids"] for x, y in zip(ra, rb))
            row["replies"] = [r.get("replies", {}).get("received") for r in rb]
            row["max_weight_gap"] = max(abs(u - v) for x, y in zip(ra, rb)
                                        for u, v in zip(x["clients"]["weights"], y["clients"]["weights"]))
            wa, wb = (torch.load(out[e] / "checkpoint.pt", weights_only=False)["weights"]
                      for e in ("in-process", "flower-sim"))
            row["max_final_gap"] = float((wa - wb).abs().max())
            print(json.dumps(row), flush=True)
            if a.json:
                with a.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
