"""Client sampling (issue 18): the seeded sampler, its config keys, and f among the sampled."""

import pytest

from fisherguard import config, results
from fisherguard.config import ConfigError
from fisherguard.sampling import expected_attackers, sample_clients, sampled_count

pytestmark = pytest.mark.unit


def test_sampled_count_from_fraction_or_clients_per_round():
    assert sampled_count(1000, 0.1) == 100
    assert sampled_count(1000, 1.0) == 1000
    assert sampled_count(10, 0.05) == 2  # never fewer than two clients
    assert sampled_count(200, 1.0, 30) == 30
    assert sampled_count(10, 1.0, 50) == 10


def test_the_sampler_is_seeded_per_round_and_sorted():
    a = [sample_clients(7, t, 1000, 100) for t in range(5)]
    assert a == [sample_clients(7, t, 1000, 100) for t in range(5)]  # same seed, same sequence
    assert all(len(ids) == 100 == len(set(ids)) and ids == sorted(ids) for ids in a)
    assert len({tuple(ids) for ids in a}) == 5  # a fresh draw each round
    assert a[3] == sample_clients(7, 3, 1000, 100)  # round 3 alone (a resumed run): same clients
    assert sample_clients(8, 0, 1000, 100) != a[0]  # another seed, another sequence
    assert sample_clients(7, 0, 10, 10) == list(range(10))  # m = K: everybody, nothing drawn


def test_attackers_always_keeps_every_attacker_and_draws_the_rest():
    att = list(range(970, 1000))
    for t in range(3):
        ids = sample_clients(0, t, 1000, 100, att, attackers_always=True)
        assert len(ids) == 100 and set(att) <= set(ids)
    # without the option attackers are drawn like everyone else: about m·A/K of them
    n = [sum(c >= 970 for c in sample_clients(0, t, 1000, 100, att)) for t in range(40)]
    assert 1.5 < sum(n) / len(n) < 4.5
    with pytest.raises(ValueError):
        sample_clients(0, 0, 100, 10, list(range(90, 100)), attackers_always=True)


def test_f_is_the_count_expected_among_the_sampled_clients():
    assert expected_attackers(1000, 300, 100) == 30
    assert expected_attackers(10, 3, 10) == 3
    assert expected_attackers(200, 6, 20, attackers_always=True) == 6
    assert expected_attackers(200, 6, 20) == 1
    cfg = config.resolve({"federation": {"clients": 1000, "fraction": 0.1},
                          "attack": {"fraction": 0.3}, "defense": "multi-krum"})
    assert cfg.clients_per_round == 100 and cfg.sampling
    assert cfg.defense_options()["assumed_attackers"] == 30
    assert cfg.build_defense().assumed_attackers == 30
    full = config.resolve({"federation": {"clients": 1000}, "defense": "multi-krum"})
    assert full.defense_options()["assumed_attackers"] == 300 and not full.sampling


def test_config_keys_defaults_and_checks():
    cfg = config.resolve({})
    f = cfg.federation
    assert (f.fraction, f.clients_per_round, f.attackers_always) == (1.0, None, False)
    assert cfg.clients_per_round == 10
    bad = [{"fraction": 0.0}, {"fraction": 1.5}, {"clients_per_round": 0},
           {"clients_per_round": 11}, {"clients_per_round": 5, "fraction": 0.5}]
    for fed in bad:
        with pytest.raises(ConfigError):
            config.resolve({"federation": fed})
    with pytest.raises(ConfigError, match="attackers_always"):
        config.resolve({"federation": {"clients": 20, "clients_per_round": 5,
                                       "attackers_always": True}, "attack": {"fraction": 0.3}})


def test_older_runs_keep_their_names():
    """A run made before sampling existed (no such keys) is the same run as one at the defaults."""
    now = config.resolve({}).to_dict()
    old = {sec: dict(v) for sec, v in now.items()}
    for k in ("fraction", "clients_per_round", "attackers_always"):
        old["federation"].pop(k)
    assert results.identity_part(now) == results.identity_part(old)
    sampled = config.resolve({"federation": {"fraction": 0.5}}).to_dict()
    assert results.identity_part(sampled) != results.identity_part(old)


def test_sdfc_asks_a_fisher_only_of_clients_seen_for_the_first_time():
    """docs/algorithms.md §5.5: a client without history (first participation) trains with H and
    anchor at w^t; a client that skipped rounds keeps the H_k and anchor of its last round."""
    import torch

    from fisherguard.defenses.base import PlanInput
    from fisherguard.defenses.sdfc import SDFC

    d = SDFC()
    w = torch.zeros(4)
    d.load_state_dict({"client_ids": [1], "fisher_difference": [torch.ones(4)],
                       "anchors": [torch.full((4,), 0.5)], "rounds": [0]})
    asked = d.plan_fisher_requests(PlanInput(round_idx=7, global_weights=w, client_ids=[1, 5]))
    assert set(asked) == {5}
    plan = d.plan_clients(PlanInput(round_idx=7, global_weights=w, client_ids=[1]))
    assert torch.equal(plan[1].regulariser.anchor, torch.full((4,), 0.5))


def test_the_checkpoint_is_streamed_to_disk_and_replaced_atomically(tmp_path, monkeypatch):
    """SDFC's state at K = 1000 is 0.74 GB: the checkpoint goes straight into its temporary file
    (no copy in memory), then replaces the old one."""
    import io

    import torch

    from fisherguard.results import WRITE_LOG, RunDir

    monkeypatch.delenv(WRITE_LOG, raising=False)

    save = torch.save
    targets = []

    def spy(obj, f, *a, **k):
        targets.append(f)
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", spy)
    run = RunDir(tmp_path)
    for n in (1, 2):
        run.save_checkpoint({"rounds_done": n, "weights": torch.full((5,), float(n))})
    back = run.load_checkpoint()
    assert back["rounds_done"] == 2 and torch.equal(back["weights"], torch.full((5,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert targets and not any(isinstance(f, io.BytesIO) for f in targets)  # straight to a file
