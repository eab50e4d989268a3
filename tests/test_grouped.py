"""The fast path is exact: grouped and parallel training equal the per-client reference trainer."""

import logging
import os

import pytest
import torch
from torch import nn

from fisherguard import config
from fisherguard.clients.fdreg import FDReg
from fisherguard.clients.grouped import GroupedTrainer, group_input, make_groups
from fisherguard.clients.l1pull import L1Pull
from fisherguard.clients.trainers import ParallelTrainer, build_trainer, split_work
from fisherguard.clients.training import (ClientJob, FisherRequest, SequentialTrainer, TrainPlan,
                                          num_steps)
from fisherguard.engine.federation import initial_weights, prepare
from fisherguard.fisher import diagonal_fisher
from fisherguard.models import SimpleCNN, fold_input_channels, unfold_input_channels
from fisherguard.seeding import torch_stream

pytestmark = pytest.mark.unit

PLAN = TrainPlan(epochs=2, batch_size=32, lr=0.05)  # momentum 0.9 and weight decay on
# L1's subgradient sign(w − anchor) flips on rounding-level differences where w ≈ anchor; one flip
# moves a coordinate by at most 2·λ·lr/(1 − momentum), so L1 clients get that as tolerance
L1_LAMBDA = 1e-4
L1_TOL = 2 * L1_LAMBDA * PLAN.lr / (1 - PLAN.momentum) * 2


def federation(family="fdcr", channels=3, clients=6, train=1500):
    cfg = config.resolve(config.apply_overrides({
        "experiment": {"name": "g", "seed": 3, "family": family},
        "data": {"dataset": "synthetic", "synthetic_train": train, "synthetic_test": 100,
                 "channels": channels},
        "partition": {"beta": 0.5, "min_size": 5},
        "federation": {"clients": clients, "rounds": 1, "batch_size": 32},
        "attack": {"fraction": 0.5, "augmentation": "per_epoch" if family == "sdfc" else "frozen"},
        "server": {"val_size": 32}}, {}))
    fed = prepare(cfg)
    return fed, initial_weights(fed)


def make_jobs(fed, w, *, regularise=True, fisher=True):
    jobs = []
    for k, data in enumerate(fed.clients):
        reg = None
        if regularise and k % 3 == 0:
            h = torch.rand(w.numel(), generator=torch.Generator().manual_seed(k))
            reg = FDReg(h, w + 0.01, 0.5)
        elif regularise and k % 3 == 1:
            reg = L1Pull(L1_LAMBDA, w)
        req = FisherRequest({}, torch_stream(3, "fisher", k, 0)) if fisher else None
        jobs.append(ClientJob(k, w, data, torch_stream(3, "client", k, 0), reg, req))
    return jobs


def assert_same(ref, got, w, tol=1e-5):
    assert [r.client_id for r in ref] == [r.client_id for r in got]
    for a, b in zip(ref, got):
        assert a.steps == b.steps
        moved = float((a.weights - w).abs().max())
        diff = float((a.weights - b.weights).abs().max())
        assert a.steps == 0 or moved > 100 * tol, "training must move the weights for this to test anything"
        limit = L1_TOL if a.client_id % 3 == 1 else tol  # make_jobs' L1 clients
        assert diff <= limit, (a.client_id, diff, moved)
        assert a.stats.keys() == b.stats.keys()
        if a.fisher is not None:
            rel = float((a.fisher - b.fisher).abs().max() / a.fisher.abs().max())
            assert rel < 1e-4, (a.client_id, rel)


@pytest.fixture(scope="module")
def fdcr_fed():
    return federation("fdcr")


@pytest.fixture(scope="module")
def reference(fdcr_fed):
    fed, w = fdcr_fed
    return SequentialTrainer(fed.model_factory).train_round(make_jobs(fed, w), PLAN)


@pytest.mark.integration  # a reference and a grouped round of six clients (~2 s)
def test_grouped_equals_sequential_with_attackers_regularisers_and_uneven_clients(fdcr_fed, reference):
    fed, w = fdcr_fed
    sizes = [len(c) for c in fed.clients]
    steps = {num_steps(n, PLAN) for n in sizes}
    assert len(steps) > 2, sizes  # clients leave the group at different steps
    assert fed.attackers and all(fed.clients[k].frozen is not None for k in fed.attackers)
    got = GroupedTrainer(fed.model_factory).train_round(make_jobs(fed, w), PLAN)
    assert_same(reference, got, w)
    assert all(r.fisher is not None and r.fisher.shape == w.shape for r in got)


@pytest.mark.integration  # a grouped round against the reference one (~1 s)
def test_several_groups_equal_one(fdcr_fed, reference):
    fed, w = fdcr_fed
    got = GroupedTrainer(fed.model_factory, group_size=4).train_round(make_jobs(fed, w), PLAN)
    assert_same(reference, got, w)


@pytest.mark.integration  # a reference and a grouped round (~2.5 s)
def test_channel_0_trigger_uses_the_full_three_channel_path():
    fed, w = federation("sdfc")
    assert not all(c.replicated_channels for c in fed.clients)  # sdfc trigger: channel 0 only
    assert all(fed.clients[k].replicated_channels for k in range(len(fed.clients))
               if k not in fed.attackers)
    ref = SequentialTrainer(fed.model_factory).train_round(make_jobs(fed, w), PLAN)
    got = GroupedTrainer(fed.model_factory).train_round(make_jobs(fed, w), PLAN)
    assert_same(ref, got, w)


def test_one_channel_model():
    fed, w = federation(channels=1, clients=4, train=800)
    jobs = lambda: make_jobs(fed, w, fisher=False)  # noqa: E731
    ref = SequentialTrainer(fed.model_factory).train_round(jobs(), PLAN)
    assert_same(ref, GroupedTrainer(fed.model_factory).train_round(jobs(), PLAN), w)


def test_a_client_without_a_full_batch_returns_its_start_weights(fdcr_fed):
    fed, w = fdcr_fed
    plan = TrainPlan(epochs=1, batch_size=max(len(c) for c in fed.clients) - 1, lr=0.05)
    jobs = make_jobs(fed, w, regularise=False, fisher=False)
    res = GroupedTrainer(fed.model_factory).train_round(jobs, plan)
    idle = [r for r in res if r.steps == 0]
    assert idle and all(torch.equal(r.weights, w) for r in idle)
    assert sum(r.steps == 1 for r in res) == 1


def test_folded_fisher_equals_the_three_channel_fisher(fdcr_fed):
    fed, w = fdcr_fed
    x, y = fed.clients[0].fisher_data()
    assert torch.equal(x[:, 0], x[:, 2])
    model = fed.model_factory()
    folded = diagonal_fisher(model, w, x, y)
    full = diagonal_fisher(model, w, x.clone().contiguous(), y, backend="vmap")
    x_odd = x.clone()
    x_odd[:, 1] += 1e-3  # channels no longer identical: the full path must be taken
    odd = diagonal_fisher(model, w, x_odd, y)
    assert float((folded - full).abs().max() / full.abs().max()) < 1e-5
    assert not torch.allclose(odd, folded, rtol=0, atol=0)
    # the conv1 kernel's entries are equal across input channels, as they must be
    conv1 = folded[:450].view(6, 3, 5, 5)
    assert torch.equal(conv1[:, 0], conv1[:, 1]) and torch.equal(conv1[:, 0], conv1[:, 2])


def test_fold_and_unfold_are_consistent():
    torch.manual_seed(0)
    big, small = SimpleCNN(3), SimpleCNN(1)
    from fisherguard.models import flatten, load_flat
    w = flatten(big)
    load_flat(small, fold_input_channels(w))
    x1 = torch.randn(4, 1, 32, 32)
    assert torch.allclose(big(x1.expand(-1, 3, -1, -1)), small(x1), atol=1e-5)
    v = torch.arange(float(flatten(small).numel()))
    u = unfold_input_channels(v)
    assert u.numel() == w.numel() and torch.equal(u[450:], v[150:])


@pytest.mark.integration  # worker processes
def test_parallel_workers_equal_one_worker_and_stop(fdcr_fed, reference):
    fed, w = fdcr_fed
    make = lambda: GroupedTrainer(fed.model_factory)  # noqa: E731
    trainer = ParallelTrainer(make, fed.clients, workers=2)
    pids = [p.pid for p in trainer._pool._pool]
    try:
        got = trainer.train_round(make_jobs(fed, w), PLAN)
        again = trainer.train_round(make_jobs(fed, w), PLAN)  # the pool is reusable across rounds
    finally:
        trainer.close()
    assert_same(reference, got, w)
    assert all(torch.equal(a.weights, b.weights) for a, b in zip(got, again))
    for pid in pids:
        assert not _alive(pid)
    with pytest.raises(RuntimeError, match="closed"):
        trainer.train_round(make_jobs(fed, w), PLAN)


class _Boom:
    kind = "boom"

    def penalty(self, params):
        raise ValueError("regulariser exploded")


@pytest.mark.integration  # worker processes
def test_worker_error_reaches_the_caller_and_stops_the_workers(fdcr_fed):
    fed, w = fdcr_fed
    trainer = ParallelTrainer(lambda: GroupedTrainer(fed.model_factory), fed.clients, workers=2)
    pids = [p.pid for p in trainer._pool._pool]
    jobs = make_jobs(fed, w, regularise=False, fisher=False)
    jobs[0].regulariser = _Boom()
    with pytest.raises(ValueError, match="exploded"):
        trainer.train_round(jobs, PLAN)
    for pid in pids:
        assert not _alive(pid)


def test_split_work_balances_steps(fdcr_fed):
    fed, w = fdcr_fed
    jobs = make_jobs(fed, w, regularise=False, fisher=False)
    parts = split_work(jobs, PLAN, 2)
    assert sorted(i for p in parts for g in p for i in g) == list(range(len(jobs)))
    loads = [sum(num_steps(len(jobs[i].data), PLAN) for g in p for i in g) for p in parts]
    biggest = max(num_steps(len(j.data), PLAN) for j in jobs)
    assert abs(loads[0] - loads[1]) <= biggest


def test_workers_take_whole_groups_that_never_depend_on_the_worker_count(fdcr_fed):
    fed, w = fdcr_fed
    jobs = make_jobs(fed, w, regularise=False, fisher=False)
    groups = make_groups(jobs, PLAN, 2)
    for workers in (1, 2, 3, len(jobs)):
        parts = split_work(jobs, PLAN, workers, group_size=2)
        assert sorted(g for p in parts for g in p) == sorted(groups), workers


class _Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_auto_falls_back_to_the_reference_trainer_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="fisherguard")
    t = build_trainer(_Other, [], kind="auto")
    assert isinstance(t, SequentialTrainer)
    assert "sequential trainer" in caplog.text
    assert isinstance(build_trainer(lambda: SimpleCNN(3), []), GroupedTrainer)
    with pytest.raises(ValueError, match="SimpleCNN only"):
        build_trainer(_Other, [], kind="grouped")
    with pytest.raises(ValueError, match="trainer must be one of"):
        build_trainer(_Other, [], kind="fast")


def test_workers_config_is_checked():
    with pytest.raises(config.ConfigError, match="runtime.workers"):
        config.resolve(config.apply_overrides({"runtime": {"workers": 0}}, {}))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as stopped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration  # engine runs with workers
def test_engine_runs_agree_across_trainers_and_workers(tmp_path):
    from fisherguard.engine.runner import run

    base = {"experiment": {"name": "w", "seed": 1},
            "data": {"dataset": "synthetic", "synthetic_train": 1200, "synthetic_test": 100},
            "partition": {"beta": 0.5}, "federation": {"clients": 5, "rounds": 2, "lr": 0.05,
                                                        "local_epochs": 1},
            "attack": {"fraction": 0.4}, "defense": "fdcr", "server": {"val_size": 32}}
    finals = {}
    for name, sets in {"sequential": {"runtime.trainer": "sequential"},
                       "grouped": {}, "workers": {"runtime.workers": 2}}.items():
        cfg = config.resolve(config.apply_overrides(base, sets))
        run(cfg, tmp_path / name, progress=None)
        finals[name] = torch.load(tmp_path / name / "checkpoint.pt")["weights"]
    for name in ("grouped", "workers"):
        assert float((finals[name] - finals["sequential"]).abs().max()) < 1e-4, name


@pytest.mark.integration  # a CLI subprocess with workers (~9 s)
def test_ctrl_c_stops_the_run_and_its_workers(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fisherguard.cli", "run", "configs/synthetic-quick.yaml",
           "--set", "runtime.workers=2", "--set", "runtime.threads=1",
           "--set", "federation.rounds=200", "--out", str(out), "-q"]
    # a terminal's Ctrl-C: the child must not inherit an ignored SIGINT (background jobs have one)
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(__file__)),
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    children: list[int] = []
    try:
        deadline = time.time() + 120
        # wait for the workers and for at least one finished round
        while time.time() < deadline:
            children = _children(proc.pid)
            rounds = out / "rounds.jsonl"
            if len(children) >= 2 and rounds.exists() and rounds.read_text().strip():
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert len(children) >= 2, "the workers never started"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    time.sleep(0.5)
    assert not [c for c in children if _alive(c)]
    lines = (out / "rounds.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["round"] == i + 1 for i, x in enumerate(lines))


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _sized_jobs(sizes):
    return [ClientJob(i, torch.zeros(1), _Sized(n), torch.Generator()) for i, n in enumerate(sizes)]


def test_groups_balance_local_steps_and_list_each_group_largest_first():
    # the full paper run's round-1 client sizes (Fashion-MNIST, β = 0.5, seed 0); one batch = 64
    sizes = [4057, 6632, 6596, 6419, 5301, 5372, 6135, 3391, 4177, 5920]
    plan = TrainPlan(epochs=1, batch_size=64)
    steps = [n // 64 for n in sizes]
    groups = make_groups(_sized_jobs(sizes), plan, 5)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert [len(g) for g in groups] == [5, 5]
    for g in groups:
        assert [steps[i] for i in g] == sorted((steps[i] for i in g), reverse=True)
    loads = [sum(steps[i] for i in g) for g in groups]
    # by hand, steps 1:103 2:103 3:100 6:95 9:92 5:83 4:82 8:65 0:63 7:52 dealt to the lighter
    # group (A on ties): 1→A 103, 2→B 103, 3→A 203, 6→B 198, 9→B 290, 5→A 286, 4→A 368,
    # 8→B 355, 0→B 418 (B full), 7→A 420
    assert groups == [[1, 3, 5, 4, 7], [2, 6, 9, 8, 0]]
    assert loads == [420, 418]  # consecutive chunks of the sorted sizes: 493 against 345
    # one group: the clients largest first (ties in job order), whatever the group size above m
    one = make_groups(_sized_jobs([64, 640, 64, 128]), plan, 10)
    assert one == [[1, 3, 0, 2]]
    # groups never exceed the size, and a size-1 grouping is every client alone, largest first
    assert make_groups(_sized_jobs([64, 640, 64, 128]), plan, 1) == [[1], [3], [0], [2]]
    assert [len(g) for g in make_groups(_sized_jobs([64] * 7), plan, 3)] == [3, 2, 2]


@pytest.mark.parametrize("channels, clients", [(1, 1), (1, 5), (3, 1), (3, 4)])
def test_group_input_puts_each_clients_channels_side_by_side_in_channels_last(channels, clients):
    xs = [torch.randn(4, channels, 6, 6) for _ in range(clients)]
    xs[-1] = torch.randn(4, 3, 6, 6)[:, :channels]  # a frozen attacker's channel-0 view
    xg = group_input(xs)
    assert xg.shape == (4, clients * channels, 6, 6)
    assert xg.is_contiguous(memory_format=torch.channels_last)
    for i, x in enumerate(xs):
        assert torch.equal(xg[:, i * channels:(i + 1) * channels], x)
