"""The attack framework through the engine: stages, schedules, protocol compliance, knowledge."""

from __future__ import annotations

import pytest
import torch

from attack_harness import attack_config, run_attack
from fisherguard import config
from fisherguard.attacks import registry
from fisherguard.attacks.base import Attack, RoundView
from fisherguard.attacks.plan import Schedule
from fisherguard.clients.modifier import TrainingModifier

pytestmark = pytest.mark.integration


class Recorder(TrainingModifier):
    name = "recorder"
    calls: list[str] = []

    def after_step(self, params):
        Recorder.calls.append("step")


class Probe(Attack):
    """A test stage: marks its uploads, records what each hook was given."""

    name = "test-probe"
    kind = "model poisoning"
    knowledge = "model"
    per_client = True
    seen: list[dict] = []

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = scale

    def training(self, client_id, round_idx, start_weights):
        return Recorder()

    def after_training(self, view: RoundView):
        Probe.seen.append({"round": view.round_idx, "own": sorted(view.own),
                           "benign": view.benign})
        for u in view.own.values():
            u.weights = view.global_weights + self.scale * (u.weights - view.global_weights)
        return view.own


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.setitem(registry.ATTACKS, "test-probe", Probe)
    Probe.seen.clear()
    Recorder.calls.clear()
    return Probe


def test_a_model_level_stage_sees_its_own_uploads_only_and_trains_one_by_one(tmp_path, probe):
    summary, rounds, _ = run_attack(tmp_path, "badnets+test-probe", {"test-probe": {"scale": 3.0}})
    assert [s["own"] for s in Probe.seen] == [[3, 4], [3, 4]]
    assert all(s["benign"] is None for s in Probe.seen)
    assert Recorder.calls  # the attackers' training ran through the modifier's hooks
    assert all(r["attack"] == {"name": "badnets+test-probe", "active": True} for r in rounds)
    assert all(r["timing"]["attack_s"] >= 0 for r in rounds)


def test_an_idle_round_trains_attackers_on_clean_data_with_no_stage(tmp_path, probe):
    _, rounds, _ = run_attack(tmp_path, "badnets+test-probe", None,
                              **{"attack.schedule": "single-shot", "attack.start": 2})
    assert [r["attack"]["active"] for r in rounds] == [False, True]
    assert [s["round"] for s in Probe.seen] == [1]
    # every client trained on clean data in round 1: the same as a run without any attacker
    _, _, clean_w = run_attack(tmp_path / "clean", "none", None, **{"federation.rounds": 1})
    _, _, idle_w = run_attack(tmp_path / "idle", "badnets+test-probe", None,
                              **{"attack.schedule": "single-shot", "attack.start": 2,
                                 "federation.rounds": 1})
    assert torch.equal(clean_w, idle_w)


def test_scaling_the_upload_changes_the_result(tmp_path, probe):
    _, _, one = run_attack(tmp_path / "a", "badnets+test-probe", {"test-probe": {"scale": 1.0}})
    _, _, three = run_attack(tmp_path / "b", "badnets+test-probe", {"test-probe": {"scale": 3.0}})
    assert not torch.equal(one, three)


def test_follow_protocol_off_drops_the_defense_client_term_for_attackers(probe):
    from fisherguard.engine.federation import client_job, prepare
    from fisherguard.defenses.base import ClientPlan

    w = torch.zeros(10)
    for follow, expect in ((True, True), (False, False)):
        cfg = attack_config("badnets", None, **{"attack.follow_protocol": follow,
                                                "defense": "rsa"})
        fed = prepare(cfg)
        plan = ClientPlan(regulariser=object())  # any term the defense asks for
        assert (client_job(fed, 4, 0, w, plan).regulariser is not None) == expect
        assert client_job(fed, 0, 0, w, plan).regulariser is not None  # benign: always


@pytest.mark.parametrize("mode,start,end,every,rounds", [
    ("multi-shot", None, None, None, [1, 2, 3, 4, 5, 6]),
    ("single-shot", 3, None, None, [3]),
    ("window", 2, 4, None, [2, 3, 4]),
    ("every", 2, 5, 2, [2, 4]),
    ("every", None, None, 3, [1, 4]),
])
def test_schedules(mode, start, end, every, rounds):
    s = Schedule(mode, start, end, every)
    assert [t + 1 for t in range(6) if s.active(t)] == rounds


@pytest.mark.parametrize("sets,needle", [
    ({"attack.schedule": "single-shot"}, "needs attack.start"),
    ({"attack.schedule": "every"}, "attack.every >= 1"),
    ({"attack.schedule": "window", "attack.start": 5, "attack.end": 2}, "before attack.start"),
    ({"attack.schedule": "sometimes"}, "attack.schedule"),
    ({"attack.name": "badnets+badnets"}, "distinct"),
    ({"attack.name": "badnets+nope"}, "unknown attack 'nope'"),
    ({"attack.options": {"poison_prob": 0.1, "oops": 1}}, "no option 'oops'"),
])
def test_bad_attack_configs_name_the_key(sets, needle):
    with pytest.raises(config.ConfigError, match=needle):
        attack_config("badnets", None, **sets) if "attack.name" not in sets else \
            config.resolve(config.apply_overrides(config.apply_overrides(
                {"data": {"dataset": "synthetic"}}, {}), sets))


def test_omniscient_attacks_are_refused_on_a_real_deployment(monkeypatch):
    class Omni(Attack):
        name = "test-omni"
        knowledge = "omniscient"

    monkeypatch.setitem(registry.ATTACKS, "test-omni", Omni)
    with pytest.raises(config.ConfigError, match="omniscient"):
        config.resolve({"attack": {"name": "test-omni"},
                        "runtime": {"engine": "flower-deployment"}})
    config.resolve({"attack": {"name": "test-omni"}, "runtime": {"engine": "flower-sim"}})
