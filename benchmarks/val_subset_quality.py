"""What SDFC's ``val_fisher_samples`` changes (issue 18): FDAgg's weights with M_k(U) on a subset of
U against the weights with all of U, on the same uploads.

Runs the sampled K = 1000 cell of ``benchmarks/sampling_cost.py`` (Fashion-MNIST, 10 % sampled,
E = 2, batch 16, BadNets 30 %, SDFC with all of U), non-IID by default (β = 0.5). In every round, before SDFC combines the
uploads, it also computes T_k = Σ_v |M_k(D_k) − M_k(U_s)|_v for subsets U_s of each size asked for
(drawn as the option draws them, a fresh subset per size and round) and compares the FDAgg weights
they give with the whole-U weights: Spearman's rank correlation of T, the total-variation distance
½ Σ_k |α_k − α_k^U|, the attackers' weight share under each (the benchmark, like the metrics layer,
reads who attacked), the time of one M_k(U_s), and the echo ratio ρ that an upload echoing the
whole-U Fisher would show against the subset (the echo check, docs/algorithms.md §8.2, is
calibrated on whole-U statistics).

    PYTHONPATH=src python benchmarks/val_subset_quality.py --sizes 26,64,128 --rounds 3 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from fisherguard import config  # noqa: E402
from fisherguard.defenses import sdfc as sdfc_mod  # noqa: E402

POOL = 59_744


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n−1 (ties broken by position; T_k are continuous)."""
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a) - (a.numel() - 1) / 2, ranks(b) - (b.numel() - 1) / 2
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="26,64,128", help="subset sizes of U to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=6000, help="training samples a round")
    ap.add_argument("--beta", type=float, default=0.5, help="Dirichlet β (0: iid)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    torch.set_num_threads(1)
    m = config.resolve({"federation": {"clients": a.clients, "fraction": a.fraction}}).clients_per_round
    cfg = config.resolve({
        "experiment": {"name": "val-subset", "seed": 0},
        "data": {"dataset": "fashion-mnist", "train_subset": min(POOL, round(a.samples * a.clients / m)),
                 "test_subset": 1000},
        "partition": {"beta": a.beta},
        "federation": {"clients": a.clients, "fraction": a.fraction, "rounds": a.rounds,
                       "local_epochs": 2, "batch_size": 16},
        "attack": {"name": "badnets", "fraction": 0.3},
        "defense": {"name": "sdfc", "options": {"hardening": "off"}},
        "runtime": {"workers": 1}})
    rows: list[dict] = []
    original = sdfc_mod.SDFC.combine

    def combine(self, ri, rows_, reasons):  # type: ignore[no-untyped-def]
        u = ri.server_data
        valid = [k for k in range(ri.num_clients) if reasons[k] is None]
        models = [(ri.global_weights.to(torch.float64) + ri.updates[k].to(torch.float64))
                  .to(ri.global_weights.dtype) for k in valid]
        local = [ri.fisher[k].to(torch.float64) for k in valid]
        attackers = torch.tensor([int(ri.client_ids[k]) in fed_attackers for k in valid])
        t0 = time.perf_counter()
        vals = [u.fisher(w).to(torch.float64) for w in models]
        full = torch.stack([(lo - v).abs().sum() for lo, v in zip(local, vals)])
        per_model = {"all": (time.perf_counter() - t0) / len(valid)}
        alpha_full = sdfc_mod.fdagg_weights(full, self.fdagg_weights)
        row = {"round": int(ri.round_idx), "models": len(valid), "U": u.size,
               "attacker_share_all": float(alpha_full[attackers].sum()),
               "honest_rho_all_min": round(min(sdfc_mod.echo_ratio(lo, v)
                                               for lo, v in zip(local, vals)), 4)}
        for s in sizes:
            sub = u.subset(s)
            t0 = time.perf_counter()
            subs = [sub.fisher(w).to(torch.float64) for w in models]
            per_model[str(s)] = (time.perf_counter() - t0) / len(valid)
            tot = torch.stack([(lo - v).abs().sum() for lo, v in zip(local, subs)])
            # an upload echoing the whole-U Fisher, judged against the subset: its echo ratio ρ
            # (the echo check rejects ρ < echo_rtol, calibrated on whole-U statistics)
            echo = torch.tensor([sdfc_mod.echo_ratio(v, w) for v, w in zip(vals, subs)])
            honest = torch.tensor([sdfc_mod.echo_ratio(lo, w) for lo, w in zip(local, subs)])
            row[f"echo_rho_{s}_median"] = round(float(echo.median()), 4)
            row[f"honest_rho_{s}_min"] = round(float(honest.min()), 4)
            alpha = sdfc_mod.fdagg_weights(tot, self.fdagg_weights)
            row[f"spearman_{s}"] = round(spearman(full, tot), 4)
            row[f"tv_{s}"] = round(float((alpha - alpha_full).abs().sum() / 2), 5)
            row[f"attacker_share_{s}"] = float(alpha[attackers].sum())
        row["s_per_model"] = {k: round(v, 4) for k, v in per_model.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return original(self, ri, rows_, reasons)

    from fisherguard.engine import runner

    fed_attackers: set[int] = set()
    prepare = runner.prepare

    def prepare_and_note(*args, **kwargs):  # type: ignore[no-untyped-def]
        fed = prepare(*args, **kwargs)
        fed_attackers.update(int(i) for i in fed.attackers)
        return fed

    runner.prepare = prepare_and_note
    sdfc_mod.SDFC.combine = combine
    print(f"# K = {a.clients}, m = {m}, {a.rounds} rounds, sizes {sizes}; torch "
          f"{torch.__version__}, 1 thread", flush=True)
    with tempfile.TemporaryDirectory() as d:
        runner.run(cfg, d, progress=None)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if not rows:
        sys.exit("no round reached the defense")


if __name__ == "__main__":
    main()
