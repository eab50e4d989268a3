"""Runs above the engines: one experiment into a run directory, or a config's variants × seeds.

``run`` dispatches on ``runtime.engine``: the in-process engine here (``round.run_round`` per
round), Flower's simulation or deployment through ``engine.flower.launch``. The CLI calls this.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch

from fisherguard.allocator import retain_freed_memory
from fisherguard.clients.trainers import auto_workers, build_trainer
from fisherguard.clients.training import LocalTrainer
from fisherguard.config import Config, Variant
from fisherguard.engine.federation import prepare
from fisherguard.engine.round import InProcessClients, Server, run_round, summarise
from fisherguard.results import (RunDir, aggregate_seeds, collect_summaries, format_table, slug,
                                 write_csv)

log = logging.getLogger("fisherguard")


def run(cfg: Config, out_dir: str | Path, *, resume: bool = False, label: str | None = None,
        trainer: LocalTrainer | None = None, progress: TextIO | None = sys.stderr,
        stop_after: int | None = None) -> dict[str, Any]:
    """Run one experiment into ``out_dir``; return its summary. ``stop_after`` ends early (tests).

    ``RunInUse`` when another process is writing ``out_dir``."""
    with RunDir(out_dir).lock():
        return _run(cfg, out_dir, resume=resume, label=label or cfg.experiment.name,
                    trainer=trainer, progress=progress, stop_after=stop_after)


def _run(cfg: Config, out_dir: str | Path, *, resume: bool, label: str,
         trainer: LocalTrainer | None, progress: TextIO | None, stop_after: int | None
         ) -> dict[str, Any]:
    if cfg.runtime.engine != "inprocess":
        from fisherguard.engine.flower.launch import run_engine

        return run_engine(cfg, out_dir, resume=resume, label=label, progress=progress)
    rt = cfg.runtime
    if rt.retain_memory:
        retain_freed_memory()
    run_dir = RunDir(out_dir)
    done = run_dir.start(cfg.to_yaml(), resume=resume)
    if done >= cfg.federation.rounds:  # a finished run: nothing to load or train
        return summarise(run_dir, cfg, label)
    if rt.threads not in (None, 1):
        log.info("runtime.threads: %d is not used by the in-process engine: every process computes "
                 "on one thread so that the numbers do not depend on it; runtime.workers runs "
                 "processes side by side", rt.threads)
    # a round trains m clients (the sampled ones, K without sampling): workers for m, not K
    workers = rt.workers if rt.workers is not None else auto_workers(cfg.clients_per_round,
                                                                      rt.group_size)
    previous = torch.get_num_threads()
    # One intra-op thread in this process and in every worker: a kernel's reduction order (local
    # training, Fisher, evaluation, aggregation) then never depends on a thread count, and the same
    # seed gives the same numbers bit for bit on any machine of the same build
    # (tests/test_determinism.py, README "runtime").
    torch.set_num_threads(1)
    try:
        fed = prepare(cfg)
        server = Server(fed, run_dir, done, label=label, engine="inprocess", progress=progress)
        own_trainer = trainer is None
        trainer = trainer or build_trainer(fed.model_factory, fed.datasets(), kind=rt.trainer,
                                           workers=workers, group_size=rt.group_size)
        log.info("trainer: %s%s", getattr(trainer, "name", type(trainer).__name__),
                 f" × {workers} workers" if workers > 1 else "")
        clients = InProcessClients(fed, trainer)
        try:
            for t in range(done, server.total):
                if stop_after is not None and t >= stop_after:
                    break
                run_round(server, clients, t)
        finally:
            if own_trainer and hasattr(trainer, "close"):
                trainer.close()
        return server.summarise()
    finally:
        torch.set_num_threads(previous)


def run_all(variants: list[Variant], out_root: str | Path, *, resume: bool = False,
            progress: TextIO | None = sys.stderr, seeds: list[int] | None = None,
            on_summary: Callable[[dict[str, Any]], None] | None = None,
            on_error: Callable[[str, int | None, Exception], None] | None = None
            ) -> list[dict[str, Any]]:
    """Run each labelled variant (each seed) into its own sub-directory; ``out_root/summary.csv``
    and ``summary.txt`` then cover every finished run below ``out_root`` (``campaign_summary``).

    A run that raises stops the campaign, unless ``on_error`` is given: then it is told the
    label, seed and error and the next run starts (the failed run's directory stays resumable).
    """
    out_root = Path(out_root)
    summaries = []
    dirs: list[Path] = []
    total = len(variants) * (len(seeds) if seeds is not None else 1)
    done = 0
    for v in variants:
        sub = out_root / slug(v.label) if v.nested else out_root
        for seed in seeds if seeds is not None else [None]:
            cfg, where = v.config, sub
            if seed is not None:
                cfg = cfg.replace({"experiment.seed": seed})
                where = sub / f"seed-{seed}"
            dirs.append(where)
            done += 1
            if progress is not None and total > 1:  # where a long campaign stands
                seed_text = f" seed {seed}" if seed is not None else ""
                print(f"run {done}/{total}: {v.label}{seed_text}", file=progress, flush=True)
            try:
                s = run(cfg, where, resume=resume, label=v.label, progress=progress)
            except Exception as e:  # noqa: BLE001 - a campaign goes on; the caller reports it
                if on_error is None:
                    raise
                on_error(v.label, seed, e)
                continue
            s = dict(s, _config=cfg.to_dict())  # for results.same_but_seed; not written
            summaries.append(s)
            if on_summary:
                on_summary(s)
    if any(d != out_root for d in dirs):  # a campaign root, not a run directory
        campaign_summary(out_root, first=dirs)
    return summaries


def campaign_summary(out_root: Path, first: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """Write ``out_root/summary.csv`` (a row a run) and ``summary.txt`` (a row a variant, the
    mean ± std over its seeds where it has several) over every finished run below ``out_root``:
    the runs in ``first`` first, in that order, the others in directory order. Returns the runs.

    Built from the directory, not from one invocation's runs: a campaign run in parts (``--only``,
    ``--resume`` after a kill, two processes sharing it) gets the same, whole summary from
    whichever invocation writes it last.
    """
    try:
        found = collect_summaries(out_root, finished_only=True)
    except FileNotFoundError:  # nothing finished yet (every run failed): no summary to write
        return []
    runs = [s for s in found if Path(s["_dir"]) != out_root]
    if not runs:
        return []
    order = {str(d): i for i, d in enumerate(first)}
    runs.sort(key=lambda s: order.get(s["_dir"], len(order)))  # stable: the rest stay in directory order
    write_csv(out_root / "summary.csv", runs)
    by_variant = aggregate_seeds(runs)
    rows = by_variant if len(by_variant) < len(runs) else runs  # a row a run when no seeds pool
    RunDir(out_root).write_text("summary.txt", format_table(rows) + "\n")
    return runs
