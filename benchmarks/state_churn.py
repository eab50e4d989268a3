"""Resident memory of per-client state under client sampling: one tensor per client and row
against fixed slots (``fisherguard.defenses.client_rows.ClientRows``), docs/sampling.md §7.

Each round replaces two rows (P floats each, like SDFC's H_k and anchor) of m clients drawn
from K, between 200 short-lived buffers of other sizes, as a round's work would. Prints, every
5 rounds, the state held and the process's resident memory, both in MiB. One fresh process per
mode, so the allocator starts clean:

    PYTHONPATH=src python benchmarks/state_churn.py [--rounds 30] [--no-retain]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def churn(mode: str, rounds: int, clients: int, sampled: int, params: int, retain: bool) -> None:
    import torch

    from fisherguard.allocator import retain_freed_memory
    from fisherguard.defenses.client_rows import ClientRows

    if retain:
        retain_freed_memory()
    rng = random.Random(0)
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    slots = (ClientRows(), ClientRows())
    for t in range(rounds):
        ids = rng.sample(range(clients), sampled)
        buffers = [torch.randn(rng.randint(1, 3) * 50_000) for _ in range(200)]
        h, w = torch.rand(sampled, params), torch.rand(sampled, params)
        for k, cid in enumerate(ids):
            if mode == "tensors":
                tensors[cid] = (h[k].clone(), w[k].clone())
            else:
                slots[0].set(cid, h[k])
                slots[1].set(cid, w[k])
        del h, w, buffers
        if (t + 1) % 5 == 0:
            held = (sum(a.nbytes + b.nbytes for a, b in tensors.values()) if mode == "tensors"
                    else slots[0].nbytes + slots[1].nbytes)
            print(f"  {mode:7s} round {t + 1:3d}: state {held / 2**20:6.0f} MiB, "
                  f"resident {rss_mib():6.0f} MiB", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--sampled", type=int, default=100)
    p.add_argument("--params", type=int, default=92_500)
    p.add_argument("--no-retain", action="store_true", help="glibc's defaults (no mallopt)")
    p.add_argument("--mode", choices=["tensors", "slots"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        churn(a.mode, a.rounds, a.clients, a.sampled, a.params, not a.no_retain)
        return 0
    print(f"# {a.sampled} of {a.clients} clients a round, two rows of {a.params} floats each, "
          f"{a.rounds} rounds, retained memory {'off' if a.no_retain else 'on'}")
    for mode in ("tensors", "slots"):
        rc = subprocess.call([sys.executable, __file__, "--mode", mode, *sys.argv[1:]])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
