"""Sampled rounds end to end on the in-process engine (issue 18): records over the sampled
clients, resume, and the per-client state of the stateful defenses for clients that skip rounds."""

import json

import pytest
import torch

from fisherguard import config
from fisherguard.engine.runner import run
from fisherguard.results import RunDir
from fisherguard.sampling import sample_clients

pytestmark = pytest.mark.integration

K, M = 60, 8
BASE = {
    "experiment": {"name": "sampled", "seed": 3},
    "data": {"dataset": "synthetic", "synthetic_train": 1800, "synthetic_test": 200},
    "partition": {"beta": 0.0, "min_size": 5},
    "federation": {"clients": K, "clients_per_round": M, "rounds": 2, "local_epochs": 1,
                   "batch_size": 16, "lr": 0.05},
    "attack": {"fraction": 0.2},
    "server": {"val_size": 64},
    "runtime": {"trainer": "sequential", "workers": 1},
}


def cfg(defense, **sets):
    return config.resolve(config.apply_overrides({**BASE, "defense": defense}, sets))


def _state(d):
    return RunDir(d).load_checkpoint()["defense_state"]


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    c = cfg("fedavg")
    run(c, root / "full", progress=None)
    run(c, root / "resumed", progress=None, stop_after=1)
    run(c, root / "resumed", progress=None, resume=True)
    return c, root


def test_records_are_over_the_sampled_clients(fedavg_run):
    c, root = fedavg_run
    recs = RunDir(root / "full").rounds()
    attackers = json.loads((root / "full" / "partition.json").read_text())["attackers"]
    assert len(attackers) == 12
    for t, rec in enumerate(recs):
        ids = sample_clients(3, t, K, M)
        assert rec["clients"]["ids"] == ids
        assert all(len(rec["clients"][k]) == M for k in ("weights", "flagged", "reasons",
                                                         "num_samples"))
        assert abs(sum(rec["clients"]["weights"]) - 1) < 1e-9
        s = rec["sampling"]
        assert (s["clients"], s["sampled"], s["assumed_attackers"]) == (K, M, 2)
        assert s["attackers_sampled"] == sum(i in attackers for i in ids)
    assert recs[0]["clients"]["ids"] != recs[1]["clients"]["ids"]


def test_resume_draws_the_same_clients_and_numbers(fedavg_run):
    _, root = fedavg_run
    a, b = RunDir(root / "full").rounds(), RunDir(root / "resumed").rounds()
    assert [r["clients"]["ids"] for r in a] == [r["clients"]["ids"] for r in b]
    assert [r["metrics"]["A"] for r in a] == [r["metrics"]["A"] for r in b]


def test_attackers_always_puts_every_attacker_in_each_round(tmp_path):
    c = cfg("fedavg", **{"federation.clients_per_round": 16, "federation.attackers_always": True,
                         "federation.rounds": 1})
    run(c, tmp_path, progress=None)
    rec = RunDir(tmp_path).rounds()[0]
    attackers = json.loads((tmp_path / "partition.json").read_text())["attackers"]
    assert set(attackers) <= set(rec["clients"]["ids"]) and len(rec["clients"]["ids"]) == 16
    assert rec["sampling"]["assumed_attackers"] == rec["sampling"]["attackers_sampled"] == 12


@pytest.mark.parametrize("defense", ["multi-krum", "fdcr"])
def test_stateless_rules_run_sampled(defense, tmp_path):
    s = run(cfg(defense, **{"federation.rounds": 1}), tmp_path, progress=None)
    assert s["complete"]
    rec = RunDir(tmp_path).rounds()[0]
    assert len(rec["clients"]["ids"]) == M and rec["sampling"]["assumed_attackers"] == 2
    if defense == "multi-krum":  # f = round(8 · 12 / 60) = 2, not ⌊60 · 0.2⌋ = 12
        params = json.loads((tmp_path / "defense.json").read_text())["params"]
        assert params["assumed_attackers"] == 2


# defense → (its config, the state's per-client map, how to read one client's entry)
STATEFUL = {
    "foolsgold": ({"name": "foolsgold"}, lambda s: s["history"]),
    "rsa": ({"name": "rsa"}, lambda s: s["local_models"]),
    "sdfc": ({"name": "sdfc"}, lambda s: dict(zip(s["client_ids"],
                                                  zip(s["fisher_difference"], s["anchors"],
                                                      s["rounds"])))),
    "fdcr-cumulative": ({"name": "fdcr", "options": {"rule": "cumulative"}},
                        lambda s: {c: tuple(v) for c, v in s["cumulative"].items()}),
}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_absent_clients_keep_their_state_and_state_grows_with_clients_seen(name, tmp_path):
    defense, entries = STATEFUL[name]
    c = cfg(defense)
    run(c, tmp_path, progress=None, stop_after=1)
    after1 = entries(_state(tmp_path))
    run(c, tmp_path, progress=None, resume=True)
    after2 = entries(_state(tmp_path))
    r1, r2 = (set(r["clients"]["ids"]) for r in RunDir(tmp_path).rounds())
    # only clients that took part hold state: it grows with the clients seen, not with K
    assert set(after1) <= r1 and set(after2) <= r1 | r2 and len(after2) < K
    assert len(after2) >= len(r1 | r2) - 2  # (SDFC forgets a client it rejected)
    # a client absent from round 2 keeps its round-1 state untouched
    for cid in r1 - r2:
        if cid in after1:
            assert cid in after2 and _same(after1[cid], after2[cid]), cid
    # the record states the bytes: a fixed size per client that holds state
    P = 92_626  # SimpleCNN, 3 channels
    per_client = {"rsa": 4 * P, "sdfc": 8 * P + 16, "foolsgold": 8 * P, "fdcr-cumulative": 16}[name]
    b1, b2 = (r["sampling"]["defense_state_bytes"] for r in RunDir(tmp_path).rounds())
    assert b2 - b1 == per_client * (len(after2) - len(after1))
    assert RunDir(tmp_path).rounds()[1]["sampling"]["clients_seen"] == len(r1 | r2)
    # a client first seen in round 2 has state from round 2 only
    for cid in r2 - r1:
        if name == "sdfc" and cid in after2:
            assert after2[cid][2] == 1
        if name == "fdcr-cumulative":
            assert after2[cid][1] == 1


def test_automatic_workers_follow_the_sampled_clients_not_k(tmp_path, monkeypatch):
    """`runtime.workers: null` sizes the worker pool for the m clients a round trains: at most one
    worker per group of m, so 8 sampled clients (one group of 10) start no worker processes
    whatever K is (the numbers never depend on the worker count)."""
    from fisherguard.engine import runner

    seen = {}

    class Stop(Exception):
        pass

    def build_trainer(*args, **kwargs):  # stop before any training
        seen.update(kwargs)
        raise Stop

    def auto_workers(clients, group_size):
        seen["clients"] = clients
        return real_auto(clients, group_size)

    real_auto = runner.auto_workers
    monkeypatch.setattr(runner, "build_trainer", build_trainer)
    monkeypatch.setattr(runner, "auto_workers", auto_workers)
    with pytest.raises(Stop):
        run(cfg("fedavg", **{"runtime.workers": None, "runtime.trainer": "auto"}), tmp_path,
            progress=None)
    assert seen["clients"] == M and seen["workers"] == 1
