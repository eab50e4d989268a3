"""Model-poisoning attacks (docs/attacks.md §3.2–§3.5): scaling, constrain-and-scale, PGD, Neurotoxin."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attack_harness import attack_config, grouped_equals_per_client, run_attack
from fisherguard import config
from fisherguard.attacks import registry
from fisherguard.attacks.base import Attack, AttackConfigError, AttackContext, RoundView
from fisherguard.attacks.constrain import AnomalyLoss, ConstrainAndScale
from fisherguard.attacks.neurotoxin import MaskedProjection, Neurotoxin, topk_mask
from fisherguard.attacks.pgd import PGD
from fisherguard.attacks.scaling import Scaling
from fisherguard.clients.modifier import TrainingModifier
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import ClientDataset, ClientJob, SequentialTrainer, Upload
from fisherguard.data.transforms import Pipeline
from fisherguard.defenses import registry as defenses
from fisherguard.defenses.base import RoundInput
from fisherguard.models import flatten, load_flat, trainable

pytestmark = pytest.mark.unit

# a toy federation: 4×4 grey images, 3 classes, a linear model
PLAN = TrainPlan(epochs=2, batch_size=16, lr=0.5, momentum=0.9, weight_decay=1e-5)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def toy_data(n: int = 64, seed: int = 0) -> ClientDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return ClientDataset(labels=y, pipeline=Pipeline(grey=True, out_channels=1), frozen=x)


def toy_ctx(num_clients: int = 5, attackers=(4,), plan: TrainPlan = PLAN) -> AttackContext:
    return AttackContext(num_clients=num_clients, attackers=list(attackers), seed=0, target=2,
                         clean_data={k: toy_data(seed=k) for k in attackers},
                         model_factory=toy_model, plan=plan)


def start_weights() -> torch.Tensor:
    return flatten(toy_model()).clone()


def train(modifier: TrainingModifier | None, w0: torch.Tensor, plan: TrainPlan = PLAN,
          cid: int = 4) -> torch.Tensor:
    job = ClientJob(cid, w0, toy_data(seed=100 + cid), torch.Generator().manual_seed(1),
                    modifier=modifier)
    return SequentialTrainer(toy_model).train_one(job, plan).weights


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


# --------------------------------------------------------------------------- scaling (§3.2)

def fedavg(w: torch.Tensor, uploads: dict[int, Upload], ids: list[int]) -> torch.Tensor:
    ri = RoundInput.from_uploads(w, [uploads[k].weights - w for k in ids],
                                 [uploads[k].num_samples for k in ids], ids)
    return defenses.build("fedavg").aggregate(ri).new_weights


@pytest.mark.parametrize("attackers", [[3], [2, 3]])
def test_scaling_by_one_over_the_attackers_weight_replaces_the_model_under_fedavg(attackers):
    ids, counts = [0, 1, 2, 3], [10, 20, 30, 40]
    w = torch.randn(50, dtype=torch.float64)
    x = w + torch.randn(50, dtype=torch.float64)  # the backdoored model X
    share = sum(counts[k] for k in attackers) / sum(counts)  # A = Σ_att α_k
    attack = Scaling(gamma=1 / share)
    attack.bind(toy_ctx(4, attackers))
    own = {k: Upload(k, x.clone(), num_samples=counts[k]) for k in attackers}
    scaled = attack.after_training(RoundView(0, w, own))
    benign = {k: Upload(k, w.clone(), num_samples=counts[k]) for k in ids if k not in attackers}
    new = fedavg(w, {**benign, **scaled}, ids)
    assert torch.allclose(new, x, atol=1e-10)


def test_scaling_defaults_to_k_and_keeps_the_honest_fisher():
    attack = Scaling()
    attack.bind(toy_ctx(5, [4]))
    w, x, f = torch.zeros(6), torch.ones(6), torch.rand(6)
    up = attack.after_training(RoundView(0, w, {4: Upload(4, x, fisher=f, num_samples=7)}))[4]
    assert torch.equal(up.weights, torch.full((6,), 5.0))
    assert up.fisher is f and up.num_samples == 7
    assert attack.training(4, 0, w) is None  # unboosted: the grouped fast path is kept


def test_scaling_boost_sets_lr_epochs_and_step_decay():
    attack = Scaling(lr=0.05, epochs=6, step_epochs=2)
    mod = attack.training(4, 0, torch.zeros(3))
    plan = mod.plan(PLAN)
    assert (plan.lr, plan.epochs, plan.momentum) == (0.05, 6, PLAN.momentum)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=plan.lr)
    lrs = []
    for step in range(6 * 4):
        mod.before_step(opt, step, 4)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[7] == 0.05
    assert math.isclose(lrs[8], 0.005) and math.isclose(lrs[16], 0.0005)


# --------------------------------------------------------------------------- constrain-and-scale (§3.3)

def anomaly_gradient(attack: ConstrainAndScale, rounds: list[torch.Tensor]) -> tuple[list, list]:
    """Gradients of the stage's loss and of α·CE alone, at a point moved away from w^t."""
    for t, w in enumerate(rounds):
        mod = attack.training(4, t, w)
    assert isinstance(mod, AnomalyLoss)
    model = load_flat(toy_model(), rounds[-1])
    params = trainable(model)
    mod.begin(model, params, rounds[-1])
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    x, y = toy_data().frozen[:8], toy_data().labels[:8]
    ce = nn.functional.cross_entropy(model(x), y)
    full = torch.autograd.grad(mod.loss(ce, ce, model, params, x, y), params, retain_graph=True)
    ce_only = torch.autograd.grad(attack.alpha * ce, params)
    return full, ce_only, flatten(params) - rounds[-1]


def test_constrain_l2_anomaly_term_is_differentiable():
    attack = ConstrainAndScale(alpha=0.5)
    w0 = start_weights()
    full, ce_only, delta = anomaly_gradient(attack, [w0])
    extra = torch.cat([(a - b).reshape(-1) for a, b in zip(full, ce_only)])
    assert norm(extra) > 0
    # d/dX (1 − α)‖X − w^t‖² = 2(1 − α)(X − w^t): the term's gradient is exactly that
    assert torch.allclose(extra, 2 * 0.5 * delta, atol=1e-6)


def test_constrain_cosine_term_uses_the_last_global_update_and_is_differentiable():
    attack = ConstrainAndScale(alpha=0.5, anomaly="cosine")
    w0 = start_weights()
    w1 = w0 + 0.01 * torch.randn_like(w0)
    full, ce_only, _ = anomaly_gradient(attack, [w0, w1])
    extra = torch.cat([(a - b).reshape(-1) for a, b in zip(full, ce_only)])
    assert torch.isfinite(extra).all() and norm(extra) > 0
    assert attack.training(4, 1, w1).direction is not None  # u = w^1 − w^0 was available


def test_constrain_and_scale_caps_the_scaled_update():
    attack = ConstrainAndScale(gamma=10.0, norm_cap=2.0)
    attack.bind(toy_ctx())
    w, x = torch.zeros(8), torch.ones(8)
    up = attack.after_training(RoundView(0, w, {4: Upload(4, x, num_samples=1)}))[4]
    assert math.isclose(norm(up.weights - w), 2.0, rel_tol=1e-6)
    assert torch.allclose(up.weights / norm(up.weights), x / norm(x))


def test_constrain_and_scale_training_lowers_the_distance():
    w0 = start_weights()
    plain = norm(train(None, w0) - w0)
    attack = ConstrainAndScale(alpha=0.1)
    constrained = norm(train(attack.training(4, 0, w0), w0) - w0)
    assert constrained < plain


# --------------------------------------------------------------------------- PGD (§3.4)

@pytest.mark.parametrize("every", [1, 3])
def test_pgd_output_lies_in_the_eps_ball(every):
    w0 = start_weights()
    free = norm(train(None, w0) - w0)
    eps = free / 4
    attack = PGD(eps=eps, every=every)
    attack.bind(toy_ctx())
    w = train(attack.training(4, 0, w0), w0)
    assert norm(w - w0) <= eps + 1e-6


def test_pgd_default_eps_is_the_norm_of_the_attackers_clean_update():
    ctx = toy_ctx()
    w0 = start_weights()
    attack = PGD()
    attack.bind(ctx)
    mod = attack.training(4, 0, w0)
    job = ClientJob(4, w0, ctx.clean_data[4], torch.Generator())
    from fisherguard.seeding import torch_stream
    job.generator = torch_stream(0, "pgd-reference", 4, 0)
    ref = SequentialTrainer(toy_model).train_one(job, PLAN).weights - w0
    assert math.isclose(mod.eps, norm(ref), rel_tol=1e-6)
    w = train(mod, w0, PLAN)
    assert norm(w - w0) <= mod.eps + 1e-6


def test_pgd_replacement_stays_in_the_bound():
    attack = PGD(eps=1.5, gamma=10.0)
    attack.bind(toy_ctx())
    w, x = torch.zeros(4), torch.full((4,), 0.1)
    attack.training(4, 0, w)
    up = attack.after_training(RoundView(0, w, {4: Upload(4, x, num_samples=1)}))[4]
    assert math.isclose(norm(up.weights - w), 1.5, rel_tol=1e-6)


# --------------------------------------------------------------------------- Neurotoxin (§3.5)

def test_topk_mask_drops_exactly_the_largest_share():
    u = torch.tensor([0.1, -5.0, 0.2, 3.0, 0.0, -0.3, 0.05, 1.0, 0.01, 0.02])
    assert topk_mask(u, 0.2).tolist() == [True, False, True, False] + [True] * 6
    per = topk_mask(u, 0.2, sizes=[5, 5])  # one of each half
    assert per.tolist() == [True, False, True, True, True, True, True, False, True, True]


class GradMaskOnly(TrainingModifier):
    """The gradient mask without undoing what the optimiser adds (the control)."""

    def __init__(self, keep):
        self.keep = keep

    def begin(self, model, params, start_weights):
        self.parts, off = [], 0
        for p in params:
            self.parts.append(self.keep[off:off + p.numel()].view_as(p))
            off += p.numel()

    def after_backward(self, params):
        for p, m in zip(params, self.parts):
            p.grad.mul_(m)


def test_neurotoxin_leaves_masked_coordinates_unchanged_despite_momentum_and_weight_decay():
    plan = TrainPlan(epochs=2, batch_size=16, lr=0.5, momentum=0.9, weight_decay=0.1)
    w0 = start_weights()
    keep = topk_mask(torch.randn(w0.numel(), generator=torch.Generator().manual_seed(3)), 0.3)
    w = train(MaskedProjection(keep, eps=None), w0, plan)
    assert torch.equal(w[~keep], w0[~keep])  # exactly w^t on every masked coordinate
    assert bool((w[keep] != w0[keep]).any())
    # a gradient mask alone lets weight decay (through momentum) move them: that is not "unchanged"
    control = train(GradMaskOnly(keep), w0, plan)
    assert not torch.equal(control[~keep], w0[~keep])


def test_neurotoxin_masks_the_last_global_update_and_projects():
    attack = Neurotoxin(topk=0.1, eps=0.05)
    attack.bind(toy_ctx())
    w0 = start_weights()
    attack.training(4, 0, w0)  # round 0: no previous global model (falls back to the clean update)
    w1 = w0 + torch.randn(w0.numel(), generator=torch.Generator().manual_seed(5))
    mod = attack.training(4, 1, w1)
    expected = topk_mask(w1 - w0, 0.1)
    assert torch.equal(mod.keep_flat, expected)
    assert int((~expected).sum()) == math.ceil(0.1 * w0.numel())
    w = train(mod, w1)
    assert torch.equal(w[~expected], w1[~expected])
    assert norm(w - w1) <= 0.05 + 1e-6


def test_neurotoxin_gradient_source_uses_the_clean_update():
    attack = Neurotoxin(source="gradient", eps="off")
    attack.bind(toy_ctx())
    w0 = start_weights()
    mod = attack.training(4, 0, w0)
    ref = attack.reference.update(attack.ctx, 4, 0, w0)
    assert torch.equal(mod.keep_flat, topk_mask(ref, 0.01)) and mod.eps is None


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("name,options,option", [
    ("scaling", {"gamma": 0}, "gamma"),
    ("scaling", {"gamma": "auto"}, "gamma"),
    ("scaling", {"lr": -1}, "lr"),
    ("scaling", {"epochs": 1.5}, "epochs"),
    ("scaling", {"step_factor": 0}, "step_factor"),
    ("constrain-and-scale", {"alpha": 1.5}, "alpha"),
    ("constrain-and-scale", {"anomaly": "l1"}, "anomaly"),
    ("constrain-and-scale", {"norm_cap": 0}, "norm_cap"),
    ("pgd", {"eps": "clip"}, "eps"),
    ("pgd", {"eps": -2.0}, "eps"),
    ("pgd", {"every": 0}, "every"),
    ("pgd", {"gamma": 0}, "gamma"),
    ("neurotoxin", {"topk": 1.0}, "topk"),
    ("neurotoxin", {"topk": 1}, "topk"),
    ("neurotoxin", {"source": "oracle"}, "source"),
    ("neurotoxin", {"per_layer": "yes"}, "per_layer"),
    ("neurotoxin", {"eps": 0}, "eps"),
])
def test_bad_options_name_the_option(name, options, option):
    with pytest.raises(AttackConfigError, match=rf"{name} option {option} must be"):
        registry.build(name, options)
    with pytest.raises(config.ConfigError, match=rf"option {option}"):
        attack_config(f"badnets+{name}", {"badnets": {}, name: options})


@pytest.mark.parametrize("name", ["scaling", "constrain-and-scale", "pgd", "neurotoxin"])
def test_every_option_is_stored_under_its_name(name):
    attack = registry.build(name)
    assert attack.get_params() == type(attack).options()
    assert attack.knowledge == "model" and attack.kind == "model poisoning"


@pytest.mark.parametrize("name", ["scaling", "constrain-and-scale", "pgd", "neurotoxin"])
def test_no_stage_needs_begin_round_so_flower_engines_accept_them(name):
    config.resolve({"data": {"dataset": "synthetic"}, "attack": {"name": f"badnets+{name}"},
                    "runtime": {"engine": "flower-sim"}})


# --------------------------------------------------------------------------- through the engine

def _finite_run(tmp_path, name, options=None):
    summary, rounds, w = run_attack(tmp_path, name, options)
    assert len(rounds) == 2 and summary["complete"]
    assert all(r["attack"] == {"name": name, "active": True} for r in rounds)
    assert torch.isfinite(w).all()
    return rounds, w


@pytest.mark.integration
def test_scaling_end_to_end(tmp_path):
    _, scaled = _finite_run(tmp_path / "s", "badnets+scaling")
    _, plain = run_attack(tmp_path / "b", "badnets")[1:]
    assert not torch.equal(scaled, plain)


@pytest.mark.integration
def test_constrain_and_scale_end_to_end(tmp_path):
    _finite_run(tmp_path, "badnets+constrain-and-scale",
                {"badnets": {}, "constrain-and-scale": {"anomaly": "cosine", "norm_cap": 5.0}})


class DeltaProbe(Attack):
    """A test stage placed before the attack's upload stage: records each trained Δ_k = w_k − w^t."""

    name = "test-delta-probe"
    knowledge = "model"
    seen: list[dict[int, torch.Tensor]] = []

    def after_training(self, view):
        DeltaProbe.seen.append({k: u.weights - view.global_weights for k, u in view.own.items()})
        return view.own


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.setitem(registry.ATTACKS, "test-delta-probe", DeltaProbe)
    DeltaProbe.seen.clear()
    return DeltaProbe


@pytest.mark.integration
def test_pgd_end_to_end_trains_inside_the_ball(tmp_path, probe):
    _finite_run(tmp_path, "badnets+test-delta-probe+pgd",
                {"badnets": {}, "test-delta-probe": {}, "pgd": {"eps": 0.5}})
    trained = [d for r in probe.seen for d in r.values()]
    assert len(trained) == 4 and all(norm(d) <= 0.5 + 1e-5 for d in trained)


@pytest.mark.integration
def test_neurotoxin_end_to_end_leaves_the_masked_share_at_zero(tmp_path, probe):
    rounds, _ = _finite_run(tmp_path, "badnets+test-delta-probe+neurotoxin",
                            {"badnets": {}, "test-delta-probe": {}, "neurotoxin": {"topk": 0.05}})
    for r in rounds:  # the clean reference training (default eps) is timed in the attackers' stats
        train = r["clients"]["train"]
        assert [k for k, st in enumerate(train) if "attack_reference_s" in st] == [3, 4]
    for r in probe.seen:
        for d in r.values():
            assert int((d == 0).sum()) >= math.ceil(0.05 * d.numel())


@pytest.mark.integration
def test_unboosted_scaling_keeps_the_grouped_path(tmp_path):
    assert grouped_equals_per_client(tmp_path, "badnets+scaling") <= 1e-5
