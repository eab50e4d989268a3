"""Byzantine update attacks (docs/attacks.md §5): crafted vectors, z_max, γ search, knowledge."""

from __future__ import annotations

import math

import pytest
import torch

from attack_harness import grouped_equals_per_client, run_attack
from fisherguard.attacks import registry
from fisherguard.attacks.base import AttackConfigError, AttackContext, RoundView
from fisherguard.attacks.byzantine import (ALIE, IPM, GaussianNoise, LabelFlip, MinMax, MinSum,
                                           RandomModel, SignFlip, alie_z_max, gamma_search,
                                           mean_std)
from fisherguard.attacks.plan import AttackPlan
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.data.transforms import Pipeline

pytestmark = pytest.mark.unit

P = 6
G = torch.zeros(P)


def _uploads(rows: dict[int, list[float]]) -> dict[int, Upload]:
    return {k: Upload(k, torch.tensor(v), fisher=torch.ones(P), num_samples=10)
            for k, v in rows.items()}


BENIGN = {0: [1., 2., 0., 1., -1., 3.], 1: [2., 1., 1., 0., -2., 2.], 2: [0., 3., -1., 2., 0., 4.]}
OWN = {3: [5., 5., 5., 5., 5., 5.], 4: [-5., 1., 5., 3., 5., 1.]}


def _ctx(n=5, attackers=(3, 4), seed=0):
    from fisherguard.models import build_model

    return AttackContext(num_clients=n, attackers=list(attackers), seed=seed, target=2,
                         model_factory=lambda: build_model("simplecnn", 1))


def _run(attack, benign=BENIGN, own=OWN):
    """The stage through the engine's own view builder (``round_view``) and a plan."""
    attack.bind(_ctx())
    plan = AttackPlan([attack])
    plan.bind(_ctx())
    uploads = {**_uploads(benign), **_uploads(own)}
    view = plan.round_view(0, G, uploads, attackers=[3, 4])
    return plan.after_training(view)


@pytest.mark.parametrize("n,m,z", [(10, 3, 0.18), (10, 5, 0.84), (10, 2, 0.0)])
def test_alie_z_max_matches_the_table(n, m, z):
    assert alie_z_max(n, m) == pytest.approx(z, abs=5e-3)


def test_alie_z_max_agrees_with_the_normal_quantile_and_refuses_undefined_cases():
    # Φ(z) = (n − m − s₀)/(n − m) for n = 10, m = 3: s₀ = 3, q = 4/7
    z = alie_z_max(10, 3)
    assert 0.5 * (1 + math.erf(z / math.sqrt(2))) == pytest.approx(4 / 7, abs=1e-9)
    with pytest.raises(AttackConfigError, match="z=auto"):
        alie_z_max(10, 6)


def test_alie_with_m_2_of_10_is_a_no_op_and_says_so(caplog):
    a = ALIE()
    a.bind(_ctx(n=10, attackers=(8, 9)))
    assert a.z_used == 0.0
    assert "no-op" in caplog.text


def test_alie_uploads_mean_plus_z_std_of_the_benign_updates_to_every_attacker():
    a = ALIE(z=1.5)
    out = _run(a)
    mu, s = mean_std(torch.tensor(list(BENIGN.values())))
    for u in out.values():
        assert torch.allclose(u.weights, mu + 1.5 * s)
    assert torch.equal(out[3].fisher, torch.ones(P))  # honest Fisher kept


def test_alie_colluding_uses_the_attackers_own_updates_and_never_sees_benign_ones(monkeypatch):
    a = ALIE(z=1.0, sign=-1, source="colluding")
    seen = []
    orig = ALIE.after_training

    def spy(self, view):
        seen.append(view.benign)
        return orig(self, view)

    monkeypatch.setattr(ALIE, "after_training", spy)
    out = _run(a)
    assert seen == [None]
    mu, s = mean_std(torch.tensor(list(OWN.values())))
    assert torch.allclose(out[4].weights, mu - s)
    assert a.knowledge == "colluding" and ALIE.knowledge == "omniscient"


@pytest.mark.parametrize("cls", [ALIE, IPM, MinMax, MinSum, SignFlip])
def test_colluding_configured_stages_never_receive_benign_uploads(cls):
    a = cls(source="colluding")
    view = a.round_view(0, G, {**_uploads(BENIGN), **_uploads(OWN)}, attackers=[3, 4])
    assert view.benign is None and sorted(view.own) == [3, 4]
    assert AttackPlan([a]).knowledge == "colluding"


def test_sign_flip_negates_own_update_or_the_mean():
    out = _run(SignFlip(kappa=2.0))
    assert torch.allclose(out[3].weights, -2.0 * torch.tensor(OWN[3]))
    assert torch.allclose(out[4].weights, -2.0 * torch.tensor(OWN[4]))
    out = _run(SignFlip(source="omniscient"))
    assert torch.allclose(out[3].weights, -torch.tensor(list(BENIGN.values())).mean(0))


def test_ipm_is_minus_epsilon_mu():
    out = _run(IPM(epsilon=100.0))
    assert torch.allclose(out[4].weights, -100.0 * torch.tensor(list(BENIGN.values())).mean(0))


def test_gaussian_is_seeded_shared_and_has_the_asked_scale():
    a, b = _run(GaussianNoise(sigma=2.0)), _run(GaussianNoise(sigma=2.0))
    assert torch.equal(a[3].weights, b[3].weights) and torch.equal(a[3].weights, a[4].weights)
    big = GaussianNoise(sigma=1.0)
    big.bind(_ctx())
    view = RoundView(0, torch.zeros(40000), _uploads({3: [0.0] * 40000}))
    assert float(big.after_training(view)[3].weights.std()) == pytest.approx(1.0, abs=0.02)
    rel = GaussianNoise(sigma=2.0, scale="relative")
    assert rel.knowledge == "colluding" and GaussianNoise().knowledge == "model"
    rel.bind(_ctx())
    own_view = RoundView(0, G, _uploads(OWN))
    mu = torch.tensor(list(OWN.values())).mean(0)
    assert rel.std(own_view) == pytest.approx(2.0 * float(mu.norm()) / math.sqrt(P))


def test_gamma_search_halves_to_tolerance():
    g = gamma_search(lambda x: x <= 3.3, 10.0, 1e-5)
    assert g <= 3.3 and g == pytest.approx(3.3, abs=2e-5)
    assert gamma_search(lambda x: False) == 0.0


@pytest.mark.parametrize("perturbation", ["unit", "sign", "std"])
def test_min_max_constraint_holds_and_is_nearly_tight(perturbation):
    a = MinMax(perturbation=perturbation)
    out = _run(a)
    d = torch.tensor(list(BENIGN.values()), dtype=torch.float64)
    x = out[3].weights.double()
    bound = float(torch.cdist(d, d).max())
    assert float((d - x).norm(dim=1).max()) <= bound + 1e-9
    assert torch.equal(out[3].weights, out[4].weights)
    assert 0 < a.last_gamma
    # a slightly larger γ breaks the constraint (the search found the boundary)
    from fisherguard.attacks.byzantine import perturbation as direction
    bigger = d.mean(0) + (a.last_gamma + 1e-3) * direction(d, perturbation)
    assert float((d - bigger).norm(dim=1).max()) > bound


@pytest.mark.parametrize("perturbation", ["unit", "sign", "std"])
def test_min_sum_constraint_holds(perturbation):
    a = MinSum(perturbation=perturbation)
    out = _run(a)
    d = torch.tensor(list(BENIGN.values()), dtype=torch.float64)
    x = out[3].weights.double()
    bound = float((torch.cdist(d, d) ** 2).sum(1).max())
    assert float(((d - x) ** 2).sum()) <= bound + 1e-9
    assert a.last_gamma > 0


def test_label_flip_is_seeded_pair_or_symmetric():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    data = ClientDataset(labels=labels, pipeline=Pipeline(grey=True, out_channels=3),
                         images=torch.zeros(2000, 1, 32, 32, dtype=torch.uint8))
    for mode in ("pair", "symmetric"):
        a = LabelFlip(mode=mode)
        a.bind(_ctx())
        out = a.poison(3, data, seed=0)
        assert torch.equal(out.labels, a.poison(3, data, seed=0).labels)
        changed = out.labels != labels
        assert 0.45 < float(changed.float().mean()) < 0.55
        if mode == "pair":
            assert torch.equal(out.labels[changed], (labels[changed] + 1) % 10)
        else:
            assert len(set(((out.labels[changed] - labels[changed]) % 10).tolist())) == 9
        assert out.images is data.images


def test_random_model_is_a_seeded_initialisation_or_halfway():
    a = RandomModel()
    a.bind(_ctx())
    w = a.random_weights(0, 3)
    assert torch.equal(w, a.random_weights(0, 3)) and not torch.equal(w, a.random_weights(1, 3))
    g = torch.zeros_like(w)
    own = {3: Upload(3, torch.ones_like(w), num_samples=1)}
    assert torch.equal(a.after_training(RoundView(0, g, own))[3].weights, w)
    h = RandomModel(mode="halfway")
    h.bind(_ctx())
    own = {3: Upload(3, torch.ones_like(w), num_samples=1)}
    assert torch.allclose(h.after_training(RoundView(0, g, own))[3].weights, (1 + w) / 2)


@pytest.mark.parametrize("cls,opts,needle", [
    (ALIE, {"z": "big"}, "alie z"), (ALIE, {"sign": 2}, "alie sign"),
    (ALIE, {"source": "benign"}, "alie source must be one of colluding, omniscient"),
    (IPM, {"epsilon": -1}, "ipm epsilon"), (SignFlip, {"source": "x"}, "sign-flip source"),
    (SignFlip, {"kappa": 0}, "sign-flip kappa"), (GaussianNoise, {"scale": "x"}, "gaussian scale"),
    (MinMax, {"perturbation": "x"}, "min-max perturbation must be one of unit, sign, std"),
    (MinSum, {"tolerance": 0}, "min-sum tolerance"), (LabelFlip, {"mode": "x"}, "label-flip mode"),
    (LabelFlip, {"poison_prob": 2}, "label-flip poison_prob"),
    (RandomModel, {"mode": "x"}, "random-model mode"),
])
def test_options_are_validated_by_name(cls, opts, needle):
    with pytest.raises(AttackConfigError, match=needle):
        cls(**opts)


def test_options_are_stored_under_their_names():
    for name in ("sign-flip", "gaussian", "alie", "ipm", "min-max", "min-sum", "label-flip",
                 "random-model"):
        cls = registry.get(name)
        assert cls().get_params() == cls.options()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["sign-flip", "gaussian", "alie", "ipm", "min-max", "min-sum",
                                  "label-flip", "random-model"])
def test_two_rounds_end_to_end(tmp_path, name):
    summary, rounds, w = run_attack(tmp_path, name)
    assert len(rounds) == 2 and bool(torch.isfinite(w).all())
    assert all(r["attack"] == {"name": name, "active": True} for r in rounds)


@pytest.mark.integration
def test_colluding_alie_end_to_end_never_sees_benign(tmp_path, monkeypatch):
    seen = []
    orig = ALIE.after_training

    def spy(self, view):
        seen.append((sorted(view.own), view.benign))
        return orig(self, view)

    monkeypatch.setattr(ALIE, "after_training", spy)
    run_attack(tmp_path, "alie", {"source": "colluding"})
    assert seen == [([3, 4], None), ([3, 4], None)]


@pytest.mark.integration
def test_alie_grouped_equals_per_client(tmp_path):
    grouped_equals_per_client(tmp_path, "alie")


def test_the_instance_level_decides_whether_a_deployment_may_run_it():
    from fisherguard import config

    with pytest.raises(config.ConfigError, match="omniscient"):
        config.resolve({"attack": {"name": "alie"}, "runtime": {"engine": "flower-deployment"}})
    config.resolve({"attack": {"name": "alie", "options": {"source": "colluding"}},
                    "runtime": {"engine": "flower-deployment"}})
    config.resolve({"attack": {"name": "sign-flip"}, "runtime": {"engine": "flower-deployment"}})


@pytest.mark.integration
def test_a_crafted_upload_carries_the_honest_fisher_of_the_uploaded_model(tmp_path, monkeypatch):
    # docs/attacks.md §5: F(D_k; uploaded w_k) on the attacker's own data, not the trained model's
    from attack_harness import attack_config
    from fisherguard.engine import round as round_mod
    from fisherguard.engine.federation import local_fisher, prepare
    from fisherguard.engine.runner import run

    seen: list[tuple[torch.Tensor, list, list]] = []
    orig = round_mod.RoundInput.from_uploads

    def spy(global_weights, updates, *args, fisher=None, **kw):
        seen.append((global_weights.clone(), [u.clone() for u in updates],
                     [f.clone() for f in fisher]))
        return orig(global_weights, updates, *args, fisher=fisher, **kw)

    monkeypatch.setattr(round_mod.RoundInput, "from_uploads", staticmethod(spy))
    cfg = attack_config("sign-flip", {"kappa": 2.0}, defense="fdcr", **{"federation.rounds": 1})
    run(cfg, tmp_path / "at-upload", progress=None)
    monkeypatch.setattr(SignFlip, "fisher_at_upload", False)
    run(cfg, tmp_path / "as-trained", progress=None)
    (g, updates, at_upload), (_, _, as_trained) = seen
    fed = prepare(cfg)
    opts = cfg.build_defense().fisher_options()
    model = fed.model_factory()
    for k in range(cfg.federation.clients):
        if k in fed.attackers:
            want = local_fisher(fed, model, k, 0, g + updates[k], 0, opts)
            assert torch.allclose(at_upload[k], want, rtol=1e-4, atol=1e-9)
            assert not torch.allclose(at_upload[k], as_trained[k], rtol=1e-2)
        else:
            assert torch.equal(at_upload[k], as_trained[k])
