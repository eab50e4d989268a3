"""Cost of a sampled round (issue 18): time per round and peak RSS for K clients × fraction.

Each cell is one fresh process (peak RSS is the process's own, ``resource.getrusage``) running
the first ``--rounds`` rounds of a demo-scale Fashion-MNIST run (E = 2, iid, batch 16, BadNets 30 %, one worker).
The client pool is sized so that every cell trains the same number of samples a round
(``--samples``), so the table shows whether the cost follows the sampled clients' data or K.

    PYTHONPATH=src python benchmarks/sampling_cost.py --defense fdcr sdfc --out cost.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

POOL = 59_744  # Fashion-MNIST's client pool under the `paper` preset (60 000 − |U| = 256)

# K = 1000 at fraction 1 would leave 6 samples a client at 6 000 a round: not a cell
CELLS = [(10, 1.0), (10, 0.1), (100, 1.0), (100, 0.1), (1000, 0.1)]


def cell(defense: str, clients: int, fraction: float, samples: int, rounds: int,
         hardening: str | None = None, retain: bool = True,
         val_fisher_samples: int | None = None) -> dict:
    from fisherguard import config
    from fisherguard.engine.runner import run
    from fisherguard.results import RunDir

    m = config.resolve({"federation": {"clients": clients, "fraction": fraction}}).clients_per_round
    subset = min(POOL, round(samples * clients / m))
    cfg = config.resolve({
        "experiment": {"name": "cost", "seed": 0},
        "data": {"dataset": "fashion-mnist", "train_subset": subset, "test_subset": 1000},
        # iid and batch 16: every client (about 60 samples at K = 1000) takes its steps, so
        # the work a round is the same in every cell
        "partition": {"beta": 0.0},
        "federation": {"clients": clients, "fraction": fraction, "rounds": rounds,
                       "local_epochs": 2, "batch_size": 16},
        "attack": {"name": "badnets", "fraction": 0.3},
        # hardening off: no client is rejected and forgotten, so SDFC's state holds every client seen
        "defense": {"name": defense, "options": {
            **({} if hardening is None else {"hardening": hardening}),
            **({} if val_fisher_samples is None else {"val_fisher_samples": val_fisher_samples})}},
        "runtime": {"workers": 1, "retain_memory": retain}})
    with tempfile.TemporaryDirectory() as d:
        run(cfg, d, progress=None)
        recs = RunDir(d).rounds()
    last = recs[-1]
    return {"defense": defense, "K": clients, "fraction": fraction, "sampled": m,
            "pool": subset, "samples_per_round": sum(last["clients"]["num_samples"]),
            "round_s": [r["wall_time_s"] for r in recs],
            # the engine's own split of each round: training + client Fishers, server, evaluation
            "timing": [{k: round(v, 3) for k, v in r["timing"].items() if k.endswith("_s")
                        or k.endswith("_summed")} for r in recs],
            "state_bytes": (last.get("sampling") or {}).get("defense_state_bytes"),
            "clients_seen": (last.get("sampling") or {}).get("clients_seen"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defense", nargs="+", default=["fdcr", "sdfc"])
    p.add_argument("--samples", type=int, default=6000, help="training samples a round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cells", default=",".join(f"{k}:{f}" for k, f in CELLS))
    p.add_argument("--hardening", choices=["on", "off"], default=None,
                   help="the defense's hardening option (default: the defense's own)")
    p.add_argument("--no-retain", action="store_true", help="runtime.retain_memory: false")
    p.add_argument("--val-fisher-samples", type=int, default=None,
                   help="SDFC only: M_k(U) on this many samples of U a round (default all)")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's cell
    a = p.parse_args()
    if a.one:
        d, k, f = a.one.split(":")
        print(json.dumps(cell(d, int(k), float(f), a.samples, a.rounds, a.hardening,
                              not a.no_retain, a.val_fisher_samples if d == "sdfc" else None)))
        return
    rows = []
    for d in a.defense:
        for spec in a.cells.split(","):
            extra = (["--hardening", a.hardening] if a.hardening else []) + (
                ["--no-retain"] if a.no_retain else []) + (
                ["--val-fisher-samples", str(a.val_fisher_samples)] if a.val_fisher_samples else [])
            out = subprocess.run([sys.executable, __file__, "--one", f"{d}:{spec}",
                                  "--samples", str(a.samples), "--rounds", str(a.rounds), *extra],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "w") as fh:
                    json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
