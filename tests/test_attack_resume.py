"""Attacks with cross-round state: a run killed after round 2 and resumed equals an uninterrupted one.

The stages that carry state from one round to the next (A3FL's δ, IBA's generator, 3DFed's
previous global model / α / indicators, the previous global model of Neurotoxin and of
constrain-and-scale's cosine term) save it in ``state_dict`` and the engine writes it to each
round's checkpoint. The resumed half is a second ``run`` that builds a new federation and a new
attack from the config, as a new process would; the tests check the attack object is new.
"""

from __future__ import annotations

import json

import pytest
import torch

from attack_harness import attack_config
from fisherguard.attacks import registry
from fisherguard.attacks.a3fl import A3FL
from fisherguard.attacks.base import AttackContext, RoundView
from fisherguard.attacks.constrain import ConstrainAndScale
from fisherguard.attacks.iba import IBA
from fisherguard.attacks.neurotoxin import Neurotoxin
from fisherguard.attacks.plan import AttackPlan
from fisherguard.attacks.threedfed import ThreeDFed
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.data.transforms import Pipeline
from fisherguard.engine.runner import run
from fisherguard.models import SimpleCNN, flatten

pytestmark = pytest.mark.integration

# (attack name, options): tiny budgets, 3 rounds, every stateful stage of docs/attacks.md
CASES = {
    "a3fl": ("a3fl", {"trigger_epochs": 1, "adv_epochs": 1, "batch_size": 64}),
    "iba": ("iba", {"generator_epochs": 1, "batch_size": 64, "width": 4, "pgd_bound": 5.0}),
    "3dfed": ("3dfed", {"noise_steps": 3, "decoys": 1}),
    "neurotoxin": ("badnets+neurotoxin", {"badnets": {}, "neurotoxin": {"topk": 0.05}}),
    "constrain-cosine": ("badnets+constrain-and-scale",
                         {"badnets": {}, "constrain-and-scale": {"anomaly": "cosine",
                                                                 "norm_cap": 5.0}}),
}
ROUNDS = {"federation.rounds": 3}


# wall-clock seconds: the only fields of a round record that may differ between two runs
CLOCK = ("wall_time_s", "timing", "attack_reference_s", "contrastive_s")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in CLOCK}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _records(out):
    return [_strip(json.loads(x)) for x in (out / "rounds.jsonl").read_text().splitlines()]


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["weights"]


def _spy(monkeypatch) -> list[AttackPlan]:
    """Record every attack the runs build (each ``run`` must build its own)."""
    built: list[AttackPlan] = []
    orig = registry.from_config

    def spy(cfg):
        plan = orig(cfg)
        built.append(plan)
        return plan

    monkeypatch.setattr(registry, "from_config", spy)
    return built


def _killed_and_resumed(cfg, out, built):
    run(cfg, out, progress=None, stop_after=2)  # "killed" after round 2
    assert len(_records(out)) == 2
    first = built[-1]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["attack_state"]
    run(cfg, out, resume=True, progress=None)
    second = built[-1]
    # the resumed half ran on a new attack object, restored from the checkpoint only
    assert second is not first and id(second) != id(first)
    assert all(a is not b for a, b in zip(first.stages, second.stages))
    return saved


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_kill_equals_uninterrupted(case, tmp_path, monkeypatch):
    name, options = CASES[case]
    cfg = attack_config(name, options, **ROUNDS)
    built = _spy(monkeypatch)
    run(cfg, tmp_path / "whole", progress=None)
    saved = _killed_and_resumed(cfg, tmp_path / "resumed", built)
    assert any(st for st in saved["stages"]), "the checkpoint holds the attack's state"
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "resumed")
    assert len(a) == 3 and a == b
    wa, wb = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert wa.dtype == wb.dtype and torch.equal(wa, wb)


@pytest.mark.parametrize("case", ["a3fl", "3dfed", "neurotoxin"])
def test_without_the_restore_the_resume_differs(case, tmp_path, monkeypatch):
    """The check above is sensitive: a resume that drops the attack's state does not match."""
    name, options = CASES[case]
    cfg = attack_config(name, options, **ROUNDS)
    built = _spy(monkeypatch)
    run(cfg, tmp_path / "whole", progress=None)
    monkeypatch.setattr(AttackPlan, "load_state_dict", lambda self, state: None)
    _killed_and_resumed(cfg, tmp_path / "resumed", built)
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "resumed")
    assert a[:2] == b[:2]
    assert not torch.equal(_weights(tmp_path / "whole"), _weights(tmp_path / "resumed"))


# --------------------------------------------------------------------------- unit: round trips

PIPE = Pipeline(grey=False)


def _ctx(attackers=(3, 4)) -> AttackContext:
    g = torch.Generator().manual_seed(0)
    clean = {k: ClientDataset(labels=torch.randint(0, 10, (16,), generator=g), pipeline=PIPE,
                              images=torch.randint(0, 256, (16, 3, 32, 32), generator=g,
                                                   dtype=torch.uint8))
             for k in attackers}
    return AttackContext(num_clients=5, attackers=list(attackers), seed=0, target=2,
                         clean_data=clean, model_factory=lambda: SimpleCNN(),
                         plan=TrainPlan(lr=0.05, epochs=1, batch_size=8))


def _w(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return flatten(SimpleCNN()).detach().clone()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def _stateful():
    """Each stateful stage, bound and moved away from its initial state."""
    ctx = _ctx()
    a3fl = A3FL(trigger_epochs=1, adv_epochs=0)
    a3fl.bind(ctx)
    a3fl.trigger.delta = torch.rand(a3fl.trigger.delta.shape, generator=torch.Generator().manual_seed(1))
    iba = IBA(width=4)
    iba.bind(ctx)
    with torch.no_grad():
        for p in iba.trigger.generator.parameters():
            p.add_(0.01)
    fed3 = ThreeDFed(noise_steps=2, indicators=3)
    fed3.bind(ctx)
    g0, g1 = _w(0), _w(1)
    for r, g in enumerate((g0, g1)):
        own = {k: Upload(client_id=k, weights=g + 0.01 * (k + 1))
               for k in ctx.attackers}
        fed3.after_training(RoundView(r, g, own))
    assert fed3._planted is not None and fed3._prev_global is not None and fed3.feedback
    neuro = Neurotoxin(eps="off")
    neuro.bind(ctx)
    cas = ConstrainAndScale(anomaly="cosine")
    cas.bind(ctx)
    for stage in (neuro, cas):
        stage.previous.update(0, g0)
        stage.previous.update(1, g1)
    return {"a3fl": a3fl, "iba": iba, "3dfed": fed3, "neurotoxin": neuro,
            "constrain-and-scale": cas}


def _fresh(name: str):
    stage = {"a3fl": lambda: A3FL(trigger_epochs=1, adv_epochs=0), "iba": lambda: IBA(width=4),
             "3dfed": lambda: ThreeDFed(noise_steps=2, indicators=3),
             "neurotoxin": lambda: Neurotoxin(eps="off"),
             "constrain-and-scale": lambda: ConstrainAndScale(anomaly="cosine")}[name]()
    stage.bind(_ctx())
    return stage


@pytest.mark.unit
def test_state_dict_round_trips_for_every_stateful_stage():
    for name, stage in _stateful().items():
        state = stage.state_dict()
        fresh = _fresh(name)
        assert not _equal(fresh.state_dict(), state), name  # the state really moved
        fresh.load_state_dict(state)
        assert _equal(fresh.state_dict(), state), name
        if name == "a3fl":  # restored by value: training on in place leaves the saved state alone
            kept = state["delta"].clone()
            fresh.trigger.delta.add_(0.5)
            assert torch.equal(state["delta"], kept)
    plan = AttackPlan([_stateful()["neurotoxin"]])
    fresh = AttackPlan([_fresh("neurotoxin")])
    fresh.load_state_dict(plan.state_dict())
    assert _equal(fresh.state_dict(), plan.state_dict())


@pytest.mark.unit
def test_restored_stage_behaves_like_the_original():
    stages = _stateful()
    x = torch.rand(2, 3, 32, 32)
    for name in ("a3fl", "iba"):
        fresh = _fresh(name)
        fresh.load_state_dict(stages[name].state_dict())
        assert torch.equal(fresh.test_trigger()(x), stages[name].test_trigger()(x)), name
    for name in ("neurotoxin", "constrain-and-scale"):
        fresh = _fresh(name)
        fresh.load_state_dict(stages[name].state_dict())
        g2 = _w(2)
        assert torch.equal(fresh.previous.update(2, g2), stages[name].previous.update(2, g2))


@pytest.mark.unit
def test_load_state_dict_refuses_unknown_keys_and_wrong_shapes():
    stages = _stateful()
    for name, stage in stages.items():
        state = stage.state_dict()
        with pytest.raises(ValueError, match="unknown"):
            _fresh(name).load_state_dict({**state, "bogus": 1})
        with pytest.raises(ValueError, match="lacks"):
            _fresh(name).load_state_dict({})
    bad = {"delta": torch.zeros(3, 16, 16)}
    with pytest.raises(ValueError, match="shape"):
        _fresh("a3fl").load_state_dict(bad)
    gen = dict(stages["iba"].state_dict()["generator"])
    key = next(iter(gen))
    gen[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        _fresh("iba").load_state_dict({"generator": gen})
    prev = stages["neurotoxin"].state_dict()["previous"]
    short = {"rounds": prev["rounds"], "weights": [w[:-1] for w in prev["weights"]]}
    with pytest.raises(ValueError, match="shape"):
        _fresh("neurotoxin").load_state_dict({"previous": short})
    st = stages["3dfed"].state_dict()
    with pytest.raises(ValueError, match="shape"):
        _fresh("3dfed").load_state_dict({**st, "planted_shift": torch.zeros(2)})
    with pytest.raises(ValueError, match="stages"):
        AttackPlan([_fresh("a3fl")]).load_state_dict({"stages": []})


@pytest.mark.unit
@pytest.mark.parametrize("name", ["badnets", "pgd", "scaling", "dba", "label-flip", "gaussian"])
def test_stateless_stage_keeps_no_state_and_refuses_some(name):
    stage = registry.build(name, {})
    assert stage.state_dict() == {}
    stage.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        stage.load_state_dict({"delta": torch.zeros(1)})
