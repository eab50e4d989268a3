"""Choosing a round's trainer, and running it in forked one-thread worker processes.

The round's clients are first cut into fixed groups (``grouped.make_groups``: a function of the
clients and ``group_size``, never of the worker count); workers take whole groups (largest total
work first, each to the least-loaded worker), train each with the same trainer class on one thread
and return weights and Fisher. Every client draws from its own named stream and trains in the same
ensemble on one thread whatever the split, so the numbers do not depend on the worker count, bit
for bit (``tests/test_determinism.py``). Fork shares the clients' data copy-on-write
(docs/performance.md §3, docs/performance.md §6).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fisherguard.clients.grouped import GroupedTrainer, make_groups, supports
from fisherguard.clients.regulariser import Regulariser
from fisherguard.clients.training import (ClientDataset, ClientJob, ClientResult, FisherRequest,
                                          LocalTrainer, SequentialTrainer, TrainPlan, num_steps)

log = logging.getLogger("fisherguard")

TRAINERS = ("auto", "grouped", "sequential")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_workers(clients: int, group_size: int) -> int:
    """``runtime.workers: null``: one worker per usable core, at most one per group of clients."""
    return max(1, min(usable_cores(), -(-clients // max(1, group_size))))


def build_trainer(model_factory: Callable[[], nn.Module], datasets: list[ClientDataset], *,
                  kind: str = "auto", workers: int = 1, group_size: int = 10) -> LocalTrainer:
    """``auto``: the grouped fast path when it covers the model, else the per-client reference (logged)."""
    if kind not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {kind!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if kind == "auto":
        kind = "grouped" if supports(model_factory()) else "sequential"
        if kind == "sequential":
            log.info("the grouped trainer does not cover this model; using the sequential trainer")

    def make() -> LocalTrainer:
        if kind == "grouped":
            return GroupedTrainer(model_factory, group_size)
        return SequentialTrainer(model_factory)

    if workers == 1:
        return make()
    return ParallelTrainer(make, datasets, workers, group_size)


@dataclass
class _Spec:
    """What a worker needs for one client: everything but the data, which it already holds."""

    client_id: int
    dataset: int  # index of the job's dataset among those the workers hold
    start_weights: torch.Tensor
    generator_state: torch.Tensor
    regulariser: Regulariser | None
    fisher_options: dict[str, Any] | None
    fisher_state: torch.Tensor | None


def _generator(state: torch.Tensor) -> torch.Generator:
    g = torch.Generator()
    g.set_state(state)
    return g


# set in the parent just before forking; the children inherit it and never pickle the data
_SHARED: dict[str, Any] = {}


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group: let the parent decide, then terminate us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _SHARED["trainer"] = _SHARED["make"]()


def _work(task: tuple[list[list[_Spec]], TrainPlan]) -> list[list[ClientResult]]:
    groups, plan = task
    data: list[ClientDataset] = _SHARED["datasets"]
    t0 = time.perf_counter()
    out = []
    for specs in groups:  # one group at a time: the same ensembles as in a single process
        jobs = [ClientJob(s.client_id, s.start_weights, data[s.dataset],
                          _generator(s.generator_state), s.regulariser,
                          FisherRequest(s.fisher_options, _generator(s.fisher_state))
                          if s.fisher_options is not None and s.fisher_state is not None else None)
                for s in specs]
        out.append(_SHARED["trainer"].train_round(jobs, plan))
    if out and out[0]:  # this worker's busy time, once: the round's idle time is the gap to the slowest
        out[0][0].timing["worker_s"] = time.perf_counter() - t0
    return out


def split_work(jobs: list[ClientJob], plan: TrainPlan, workers: int,
               group_size: int = 1) -> list[list[list[int]]]:
    """Each worker's share of the round: whole groups of job indices (``make_groups``), assigned
    longest-processing-time first by local steps. The groups never depend on ``workers``."""
    loads = [0] * workers
    parts: list[list[list[int]]] = [[] for _ in range(workers)]
    for group in make_groups(jobs, plan, group_size):  # largest first already
        w = loads.index(min(loads))
        parts[w].append(group)
        loads[w] += sum(num_steps(len(jobs[i].data), plan) + 1 for i in group)
    return parts


class ParallelTrainer:
    """N forked one-thread processes, each running the inner trainer on its share of the clients."""

    name = "parallel"

    def __init__(self, make: Callable[[], LocalTrainer], datasets: list[ClientDataset],
                 workers: int, group_size: int = 10) -> None:
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("workers > 1 needs the 'fork' start method (Linux/macOS)")
        self.workers, self.group_size = workers, group_size
        self.inner_name = getattr(make(), "name", "trainer")
        _SHARED.clear()
        _SHARED.update(make=make, datasets=datasets)
        self._pool = mp.get_context("fork").Pool(workers, initializer=_init_worker)
        self._parent = os.getpid()

    def train_round(self, jobs: list[ClientJob], plan: TrainPlan) -> list[ClientResult]:
        if self._pool is None:
            raise RuntimeError("this ParallelTrainer has been closed")
        held = {id(d): i for i, d in enumerate(_SHARED["datasets"])}
        for j in jobs:
            if id(j.data) not in held:
                raise ValueError(f"client {j.client_id}: workers only train the datasets they were "
                                 "started with")
            if j.modifier is not None:
                raise ValueError(f"client {j.client_id}: a job with an attack's training stage "
                                 "takes the per-client path, not the workers")
        specs = [_Spec(j.client_id, held[id(j.data)], j.start_weights, j.generator.get_state(),
                       j.regulariser,
                       j.fisher.options if j.fisher else None,
                       j.fisher.generator.get_state() if j.fisher else None) for j in jobs]
        parts = [p for p in split_work(jobs, plan, self.workers, self.group_size) if p]
        try:
            outs = self._pool.map(_work, [([[specs[i] for i in g] for g in p], plan)
                                          for p in parts], chunksize=1)
        except BaseException:
            self.close()
            raise
        results: dict[int, ClientResult] = {}
        for p, out in zip(parts, outs):
            for group, rs in zip(p, out):
                for i, r in zip(group, rs):
                    results[i] = r
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        """Stop the workers (idempotent); called by the engine on success, error and Ctrl-C."""
        if self._pool is not None and os.getpid() == self._parent:
            self._pool.terminate()
            self._pool.join()
        self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
