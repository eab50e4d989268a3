"""``fisherguard reproduce``: the run grid behind a published table, planned and run once.

docs/results.md §4: each table's grid (datasets × β × Υ × methods × seeds) comes from its
published cells; every run is a resolved config whose directory name ends in a hash of the
config's results part (runtime and name aside), so a run shared by two tables is run once and a
finished run is never redone. Runs execute as ``fisherguard run`` subprocesses, N at a time, each
with one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fisherguard.config import Config, apply_overrides, resolve
from fisherguard.report import published
from fisherguard.results import RunDir, identity_part

# docs/results.md §4: priorities; P0 first
PRIORITY = {"fdcr-t4": "P0", "fdcr-t3": "P0", "sdfc-t5": "P0", "sdfc-t3": "P0",
            "sdfc-t2": "P1", "sdfc-t4": "P1", "fdcr-t1": "P1", "fdcr-t2": "P1"}
# docs/results.md §4: full = the papers' T and E; reduced = T 20, E 2 (configs/fmnist-reduced.yaml)
SCALES = {"full": {"rounds": 50, "local_epochs": 10}, "reduced": {"rounds": 20, "local_epochs": 2}}
CODE_ROUNDS_FDCR = 100  # docs/protocol.md §8: the fdcr family's released configs (not MNIST)
EXTRA_METHODS = {"sdfc-t5": ["fedavg"]}  # docs/results.md §4: FedAvg in every column (project)
ORACLE_TABLES = frozenset(published.ORACLE_ROWS)


class PlanError(ValueError):
    """A reproduce request names an unknown table, dataset, method or setting."""


@dataclass
class PlannedRun:
    """One run of the plan: its key (directory name), resolved config and where it goes."""

    key: str
    table: str
    method: str
    config: Config
    path: Path

    @property
    def status(self) -> str:
        """done (a complete summary), partial (rounds logged, resumable) or pending."""
        if RunDir(self.path).finished_summary() is not None:
            return "done"
        if (self.path / RunDir.ROUNDS).is_file():
            return "partial"
        return "pending"


def table_id(name: str) -> str:
    """'fdcr-t4', 'FDCR Table 4', 'fdcr4' → 'fdcr-t4'."""
    s = "".join(ch for ch in name.lower() if ch.isalnum())
    s = s.replace("table", "").replace("t", "", 1) if s[:4] in ("sdfc", "fdcr") else s
    tid = f"{s[:4]}-t{s[4:]}"
    if tid not in published.TABLES:
        raise PlanError(f"unknown table {name!r}; choose one of {', '.join(PRIORITY)}")
    if tid not in PRIORITY:
        raise PlanError(f"{tid} is qualitative; nothing to regenerate (docs/results.md §4)")
    return tid


def grid(table: str) -> dict[str, list[Any]]:
    """The published grid of a table: datasets, betas, upsilons and method ids, in print order."""
    cells = published.cells(table)
    out: dict[str, list[Any]] = {k: list(dict.fromkeys(c[k] for c in cells))
                                 for k in ("dataset", "beta", "upsilon", "method")}
    out["method"] += [m for m in EXTRA_METHODS.get(table, []) if m not in out["method"]]
    return out


def columns(table: str) -> list[tuple[str, float, int]]:
    """The (dataset, β, Υ) columns the table prints."""
    return list(dict.fromkeys((c["dataset"], c["beta"], c["upsilon"])
                              for c in published.cells(table)))


def config_for(table: str, method: str, dataset: str, beta: float, upsilon: int, seed: int, *,
               preset: str = "paper", scale: str = "full",
               overrides: list[tuple[str, Any]] | None = None) -> Config:
    """The resolved config of one run (docs/protocol.md §4–§5; docs/results.md §4)."""
    family = table.split("-")[0]
    sc = dict(SCALES[scale])
    if scale == "full" and preset == "code" and family == "fdcr" and dataset != "mnist":
        sc["rounds"] = CODE_ROUNDS_FDCR
    defense, options = published.METHODS[method]
    raw = {
        "experiment": {"name": method, "seed": seed, "preset": preset, "family": family},
        "data": {"dataset": dataset},
        "partition": {"beta": beta},
        "federation": {"clients": 10, "rounds": sc["rounds"], "local_epochs": sc["local_epochs"],
                       "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5},
        "attack": {"name": "badnets", "fraction": upsilon / 100, "poison_prob": 0.5, "target": 2},
        "defense": {"name": defense, "options": dict(options)},
        "runtime": {"threads": 1},
    }
    return resolve(apply_overrides(raw, overrides or []))


def run_key(cfg: Config) -> str:
    """Directory name of a run: readable fields plus a hash of the config's results part."""
    part = identity_part(cfg.to_yaml())
    digest = hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]
    e = cfg.experiment
    return (f"{cfg.data.dataset}-{cfg.defense.name}-b{cfg.partition.beta:g}"
            f"-u{round(cfg.attack.fraction * 100)}-{e.preset}-s{e.seed}-{digest}")


def plan(table: str, *, datasets: list[str] | None = None, methods: list[str] | None = None,
         betas: list[float] | None = None, upsilons: list[int] | None = None,
         seeds: list[int] = (0, 1, 2), presets: list[str] = ("paper",), scale: str = "full",
         out: str | Path = "runs/reproduce",
         overrides: list[tuple[str, Any]] | None = None) -> list[PlannedRun]:
    """Every run of a table's grid, restricted by the filters (docs/results.md §4)."""
    table = table_id(table)
    if scale not in SCALES:
        raise PlanError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    g = grid(table)
    allowed = g["method"] + (["fdcr-oracle"] if table in ORACLE_TABLES else [])
    for name, wanted, have in (("dataset", datasets, g["dataset"]), ("method", methods, allowed),
                               ("beta", betas, g["beta"]), ("upsilon", upsilons, g["upsilon"])):
        bad = [w for w in wanted or [] if w not in have]
        if bad:
            raise PlanError(f"{table}: no {name} {bad[0]!r}; the table has "
                            f"{', '.join(map(str, have))}")
    cols = [c for c in columns(table) if (not datasets or c[0] in datasets)
            and (not betas or c[1] in betas) and (not upsilons or c[2] in upsilons)]
    runs: dict[str, PlannedRun] = {}
    for dataset, beta, ups in cols:
        for method in methods or g["method"]:
            for preset in presets:
                for seed in seeds:
                    cfg = config_for(table, method, dataset, beta, ups, seed, preset=preset,
                                     scale=scale, overrides=overrides)
                    key = run_key(cfg)
                    runs.setdefault(key, PlannedRun(key, table, method, cfg, Path(out) / key))
    return list(runs.values())


def describe(runs: list[PlannedRun]) -> str:
    """The dry-run listing: one line per run (key, dataset, method, seed, status) and totals."""
    lines, counts = [], {"done": 0, "partial": 0, "pending": 0}
    for r in runs:
        st = r.status
        counts[st] += 1
        seed = r.config.experiment.seed
        lines.append(f"{r.key}  {r.config.data.dataset}  {r.method}  seed {seed}  {st}")
    lines.append(f"total {len(runs)} runs: {counts['done']} done, {counts['partial']} partial, "
                 f"{counts['pending']} pending")
    return "\n".join(lines)


def command(table: str, dataset: str, beta: float, upsilon: int, method: str) -> str:
    """The ``fisherguard reproduce`` command that runs one cell (printed for a cell not run)."""
    return (f"fisherguard reproduce {table} --datasets {dataset} --betas {beta:g} "
            f"--upsilons {upsilon} --methods {method}")


def execute(runs: list[PlannedRun], *, jobs: int = 1, resume: bool = False,
            echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run the pending runs (and, with ``resume``, the partial ones), ``jobs`` at a time, each as a
    ``fisherguard run`` subprocess with one thread; return counts by outcome."""
    todo = [r for r in runs if r.status == "pending" or (resume and r.status == "partial")]
    skipped = {"done": 0, "partial": 0}
    for r in runs:
        if r not in todo:
            skipped[r.status] = skipped.get(r.status, 0) + 1
    if skipped["partial"]:
        echo(f"{skipped['partial']} partial runs skipped; pass --resume to continue them")

    def one(r: PlannedRun) -> int:
        cfg_dir, log_dir = r.path.parent / "configs", r.path.parent / "logs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        cfg_file = cfg_dir / f"{r.key}.yaml"
        cfg_file.write_text(r.config.to_yaml())
        cmd = [sys.executable, "-m", "fisherguard", "run", str(cfg_file), "--out", str(r.path),
               "-q"] + (["--resume"] if r.status == "partial" else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log_dir / f"{r.key}.log", "ab") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        echo(f"{'ok    ' if rc == 0 else f'failed ({rc})'} {r.key}")
        return rc

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        codes = list(pool.map(one, todo))
    return {"ran": sum(c == 0 for c in codes), "failed": sum(c != 0 for c in codes),
            "already done": skipped["done"], "partial skipped": skipped["partial"]}
