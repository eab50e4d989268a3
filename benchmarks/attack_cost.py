#!/usr/bin/env python
"""Per-round cost of each attack against BadNets on the demo setting (attacks issue, Performance).

    python benchmarks/attack_cost.py                  # `make bench-attacks`: FedAvg, 3 repetitions
    python benchmarks/attack_cost.py --reps 5 --attacks badnets,alie,dba

One federated round (round 1: begin, every client's local training, the attack's stages,
aggregation, evaluation, record) is timed per attack, from the same initial weights, with the
federation built before the clock starts (an edge-case tail's reference model and any other
one-time preparation are excluded and printed apart). Attacks run round-robin after one untimed
warm-up round each, one thread, so a slow phase of the machine hits every attack alike. The
measure is the process's CPU seconds (robust to other processes taking cores; wall seconds are
printed beside) and each attack's median is divided by BadNets' median of the same run.
Target: an attack that only transforms data or uploads costs < 5 % more per round than BadNets
(PASS/MISS); attacks that change training or optimise a trigger are printed for information.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

benchlib.pin_threads(1)

# attacks whose work is a data transform or an upload transform (the < 5 % target)
TRANSFORM_ONLY = ("dba", "badnets+scaling", "edge-case", "label-flip", "sign-flip", "gaussian",
                  "alie", "ipm", "min-max", "min-sum", "random-model")
INFORMATION = ("badnets+pgd", "badnets+neurotoxin", "badnets+constrain-and-scale")
TARGET = 1.05


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/attacks-demo.yaml",
                    help="base config (its variants are ignored)")
    ap.add_argument("--defense", default="fedavg")
    ap.add_argument("--attacks", default=",".join(TRANSFORM_ONLY + INFORMATION),
                    help="comma-separated; BadNets is always the reference")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    import yaml

    from fisherguard import config
    from fisherguard.clients.trainers import build_trainer
    from fisherguard.engine.federation import prepare
    from fisherguard.engine.round import InProcessClients, Server, run_round
    from fisherguard.results import RunDir

    torch.set_num_threads(1)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw.pop("variants", None)
    names = ["badnets"] + [a for a in args.attacks.split(",") if a and a != "badnets"]
    benchlib.print_system(benchlib.system_info())
    print(f"config {args.config}, defense {args.defense}, {args.reps} repetitions, 1 thread\n")

    built = {}
    for name in names:
        cfg = config.resolve(config.apply_overrides(raw, {"attack.name": name,
                                                          "defense": args.defense,
                                                          "runtime.threads": 1}))
        t0 = time.process_time()
        fed = prepare(cfg)
        trainer = build_trainer(fed.model_factory, fed.datasets(), kind=cfg.runtime.trainer,
                                group_size=cfg.runtime.group_size)
        built[name] = (cfg, fed, trainer, time.process_time() - t0)

    def one_round(name: str, root: Path) -> tuple[float, float]:
        cfg, fed, trainer, _ = built[name]
        run_dir = RunDir(root / name)
        run_dir.start(cfg.to_yaml(), resume=False)
        server = Server(fed, run_dir, 0, label=name, engine="inprocess", progress=None)
        state = fed.attack.state_dict()  # every repetition starts from the same attack state
        c0, w0 = time.process_time(), time.perf_counter()
        run_round(server, InProcessClients(fed, trainer), 0)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        fed.attack.load_state_dict(state)
        return cpu, wall

    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="fisherguard-attack-cost-") as tmp:
        for rep in range(-1, args.reps):  # rep -1: the untimed warm-up
            for name in names:
                root = Path(tmp) / f"rep{rep + 1}"
                c, w = one_round(name, root)
                if rep >= 0:
                    cpu[name].append(c)
                    wall[name].append(w)
            if rep >= 0:
                print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)

    ref = statistics.median(cpu["badnets"])
    width = max(len(n) for n in names)
    print(f"{'attack'.ljust(width)}  {'cpu s/round':>11}  {'wall s':>7}  {'vs BadNets':>10}  "
          f"{'prepare s':>9}  target")
    misses = 0
    for name in names:
        med = statistics.median(cpu[name])
        ratio = med / ref
        if name in TRANSFORM_ONLY:
            ok = ratio <= TARGET
            misses += not ok
            verdict = f"< {TARGET - 1:.0%} more: {benchlib.verdict(ok)}"
        else:
            verdict = "reference" if name == "badnets" else "information"
        print(f"{name.ljust(width)}  {med:11.2f}  {statistics.median(wall[name]):7.2f}  "
              f"{ratio:10.3f}  {built[name][3]:9.2f}  {verdict}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
