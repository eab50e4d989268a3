"""Baseline defenses (docs/baselines.md §3): contract tests and one property test per rule."""

from __future__ import annotations

import inspect
import io
import math
import re

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from fisherguard.clients.l1pull import L1Pull
from fisherguard.defenses import registry
from fisherguard.defenses._robust import (closest_to_centre_mean, coordinate_median,
                                          pairwise_sq_dists)
from fisherguard.defenses.base import DefenseConfigError, PlanInput, RoundInput
from fisherguard.defenses.foolsgold import FoolsGold
from fisherguard.defenses.mma import mahalanobis_scores, multi_metric_features

pytestmark = pytest.mark.unit

BASELINES = ["krum", "multi-krum", "foolsgold", "rlr", "dnc", "mma", "median", "trimmed-mean",
             "bulyan", "rfa", "rsa", "fltrust", "sageflow", "finetuning", "crfl"]
CODE_PRESETS = ["krum", "multi-krum", "foolsgold", "rlr", "dnc", "trimmed-mean", "bulyan",
                "sageflow", "crfl"]
VARIANTS = [(n, "paper") for n in BASELINES] + [(n, "code") for n in CODE_PRESETS]


# ---------------------------------------------------------------------------------------------
# A tiny stand-in for the engine's ServerData: softmax regression on a fixed random set U.


class SoftmaxServerData:
    """Softmax regression (flat weights = W (C×D) row-major, then b (C)) on separable data."""

    def __init__(self, d: int = 20, c: int = 10, size: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d, self.c, self.size = d, c, size
        means = torch.randn(c, d, generator=g) * 3.0
        self.y = torch.randint(0, c, (size,), generator=g)
        self.x = means[self.y] + torch.randn(size, d, generator=g)
        self.calls: list[tuple] = []

    @property
    def num_params(self) -> int:
        return self.c * self.d + self.c

    def _logits(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cd = self.c * self.d
        return x @ w[:cd].view(self.c, self.d).T + w[cd:]

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("baselines never ask for a Fisher")

    def train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:
        self.calls.append(("train", weights.clone(), epochs))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a 210-parameter model: thread hand-offs cost more than math
        try:
            return self._train(weights, epochs)
        finally:
            torch.set_num_threads(threads)

    def _train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:
        w = weights.detach().clone().float().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.01, momentum=0.9, weight_decay=1e-5)
        g = torch.Generator().manual_seed(1234)  # the server's seeded batch order
        for _ in range(epochs):
            perm = torch.randperm(self.size, generator=g)
            for s in range(0, self.size, 64):
                idx = perm[s:s + 64]
                loss = F.cross_entropy(self._logits(w, self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return w.detach().to(weights.dtype)

    def loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:
        self.calls.append(("eval", weights.clone()))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._loss_and_entropy(weights)
        finally:
            torch.set_num_threads(threads)

    def _loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            logits = self._logits(weights.float(), self.x)
            logp = F.log_softmax(logits, dim=1)
            return (float(F.cross_entropy(logits, self.y)),
                    float(-(logp.exp() * logp).sum(1).mean()))


SD = SoftmaxServerData()
P = SD.num_params
GLOBAL = SD.train(torch.zeros(P), 3)  # a partly trained model: confident, finite loss
DRIFT = SD.train(GLOBAL, 1) - GLOBAL  # roughly the direction the server data pulls in


def client_updates(k: int = 10, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(k, P, generator=g) * 0.3 * float(DRIFT.norm()) / math.sqrt(P)
    return (DRIFT + noise).to(dtype)


def make_ri(updates: torch.Tensor, *, ids: list[int] | None = None, counts=None,
            global_weights: torch.Tensor | None = None, **kw) -> RoundInput:
    k = updates.shape[0]
    ids = list(range(k)) if ids is None else ids
    counts = torch.tensor([50.0 + 10 * i for i in ids]) if counts is None else \
        torch.as_tensor(counts, dtype=torch.float64)
    gw = GLOBAL.clone() if global_weights is None else global_weights
    kw.setdefault("server_data", SD)
    return RoundInput(global_weights=gw, updates=updates, num_samples=counts, client_ids=ids,
                      **kw)


def build(name: str, preset: str = "paper", **options):
    """A defense as the engine would build it: assumed_attackers filled in when accepted."""
    params = inspect.signature(registry.get(name).__init__).parameters
    if "assumed_attackers" in params:
        options.setdefault("assumed_attackers", 2)
    if preset != "paper":
        options["preset"] = preset
    if name in ("fltrust", "finetuning"):
        options.setdefault("server_epochs" if name == "fltrust" else "epochs", 2)
    return registry.build(name, options)


def seeded(seed: int):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Contract tests, parametrised over every baseline (and its `code` preset where it has one)


@pytest.mark.parametrize("name", BASELINES)
def test_registered_with_descriptions(name):
    cls = registry.get(name)
    assert cls.name == name and cls.paper and cls.summary
    assert "\n" not in cls.summary
    assert (cls.needs_server_data is True) == (name in ("fltrust", "sageflow", "finetuning"))
    assert cls.needs_fisher is False
    with pytest.raises(DefenseConfigError, match="no option"):
        registry.build(name, {"not_an_option": 1})


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_weights_flags_and_output(name, preset):
    d = build(name, preset)
    ri = make_ri(client_updates())
    out = d.aggregate(ri)
    w = out.client_weights
    assert w.dtype == torch.float64 and w.shape == (10,)
    assert bool((w >= 0).all())
    assert abs(float(w.sum()) - 1.0) < 1e-9, out.status
    assert torch.equal(out.flagged, w == 0)
    assert all((r is not None) == bool(f) for r, f in zip(out.reasons, out.flagged))
    assert out.new_weights.shape == (P,) and out.new_weights.dtype == GLOBAL.dtype
    assert bool(torch.isfinite(out.new_weights).all())
    if out.eval_weights is not None:
        assert bool(torch.isfinite(out.eval_weights).all())
    assert out.status == "ok"


def _hostile_round(variant: int) -> RoundInput:
    """Rows 2, 5, 7, 8 are malformed; the two variants differ only in how."""
    base = client_updates()
    rows: list = [base[i].clone() for i in range(10)]
    if variant == 0:
        rows[2][0] = float("nan")
        rows[5] = torch.full((P,), float("inf"))
        rows[7] = torch.zeros(P + 3)
        rows[8] = None
    else:
        rows[2] = torch.full((P,), float("nan"))
        rows[5][17] = float("-inf")
        rows[7] = torch.zeros(P, 1)
        rows[8] = torch.ones(P, dtype=torch.int64)
    return RoundInput.from_uploads(GLOBAL.clone(), rows, [50.0 + 10 * i for i in range(10)],
                                   list(range(10)), server_data=SD)


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_hostile_rows_are_flagged_and_never_used(name, preset):
    outs = [build(name, preset).aggregate(_hostile_round(v)) for v in (0, 1)]
    for out in outs:
        for i, reason in ((2, "non_finite"), (5, "non_finite"), (7, "bad_shape"),
                          (8, "bad_shape")):
            assert bool(out.flagged[i]) and float(out.client_weights[i]) == 0.0
            assert out.reasons[i] == reason
        assert bool(torch.isfinite(out.new_weights).all())
        assert abs(float(out.client_weights.sum()) - 1.0) < 1e-9
    # What a hostile row contains cannot matter: it never enters any statistic.
    assert torch.equal(outs[0].new_weights, outs[1].new_weights)
    assert torch.equal(outs[0].client_weights, outs[1].client_weights)


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_no_valid_client_returns_global(name, preset):
    rows = [torch.full((P,), float("nan"))] * 4
    ri = RoundInput.from_uploads(GLOBAL.clone(), rows, [10] * 4, [0, 1, 2, 3], server_data=SD)
    out = build(name, preset).aggregate(ri)
    assert out.status == "no_valid_clients"
    assert torch.equal(out.new_weights, GLOBAL)
    assert bool(out.flagged.all()) and float(out.client_weights.sum()) == 0.0


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_permutation_invariance(name, preset):
    upd = client_updates()
    perm = torch.randperm(10, generator=seeded(5))
    ids = list(range(10))
    a = build(name, preset).aggregate(make_ri(upd, ids=ids))
    b = build(name, preset).aggregate(make_ri(upd[perm], ids=[ids[i] for i in perm]))
    assert torch.equal(a.new_weights, b.new_weights)
    assert torch.equal(a.client_weights[perm], b.client_weights)
    assert [a.reasons[i] for i in perm] == b.reasons


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_state_dict_round_trip(name, preset):
    first, second = make_ri(client_updates(seed=1)), make_ri(client_updates(seed=2), round_idx=1)
    a = build(name, preset)
    a.aggregate(first)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build(name, preset)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a.aggregate(second).new_weights, b.aggregate(second).new_weights)


BAD_OPTIONS = [
    ("krum", {"f": -1}, "f"), ("krum", {"f": 1.5}, "f"), ("krum", {"on_violation": "warn"},
                                                          "on_violation"),
    ("krum", {"assumed_attackers": -1}, "assumed_attackers"), ("krum", {"preset": "x"}, "preset"),
    ("multi-krum", {"m": 0}, "m"), ("multi-krum", {"weighted": "yes"}, "weighted"),
    ("foolsgold", {"kappa": 0}, "kappa"), ("foolsgold", {"epsilon": -1}, "epsilon"),
    ("foolsgold", {"clip_norm": 0}, "clip_norm"), ("rlr", {"theta": -1}, "theta"),
    ("rlr", {"server_lr": 0}, "server_lr"), ("dnc", {"b": 0}, "b"), ("dnc", {"niters": 0},
                                                                       "niters"),
    ("dnc", {"c": -0.5}, "c"), ("dnc", {"seed": -1}, "seed"), ("mma", {"p": 0}, "p"),
    ("mma", {"p": 1.5}, "p"), ("mma", {"vectors": "x"}, "vectors"),
    ("trimmed-mean", {"beta": 0.5}, "beta"), ("trimmed-mean", {"beta": -0.1}, "beta"),
    ("bulyan", {"f": -1}, "f"), ("rfa", {"nu": 0}, "nu"), ("rfa", {"max_iter": -1}, "max_iter"),
    ("rfa", {"ftol": -1}, "ftol"), ("rfa", {"weights": "x"}, "weights"),
    ("rsa", {"lam": -1}, "lam"), ("rsa", {"c": 0}, "c"), ("rsa", {"client_init": "x"},
                                                           "client_init"),
    ("rsa", {"mu": float("inf")}, "mu"), ("fltrust", {"server_epochs": 0}, "server_epochs"),
    ("sageflow", {"entropy_threshold": 0}, "entropy_threshold"),
    ("sageflow", {"delta": -1}, "delta"), ("finetuning", {"epochs": -1}, "epochs"),
    ("crfl", {"offset": 0}, "offset"), ("crfl", {"rho_max": 0}, "rho_max"),
    ("crfl", {"sigma": -1}, "sigma"), ("crfl", {"slope": -1}, "slope"),
]


@pytest.mark.parametrize("name,options,param", BAD_OPTIONS)
def test_hyperparameter_errors_name_the_parameter(name, options, param):
    with pytest.raises(DefenseConfigError, match=rf"\b{param}\b"):
        registry.build(name, options)


@pytest.mark.parametrize("name,k,f,precondition", [
    ("krum", 10, 4, "K >= 2f+3"), ("multi-krum", 10, 4, "K >= 2f+3"),
    ("bulyan", 10, 2, "K >= 4f+3"), ("trimmed-mean", 10, 5, "2f < K"),
    ("dnc", 10, 10, "floor(c*f) < K")])
def test_assumed_attacker_count_policy(name, k, f, precondition):
    ri = make_ri(client_updates(k))
    # An explicit f violating the precondition is a configuration error ...
    with pytest.raises(DefenseConfigError, match=re.escape(precondition)):
        registry.build(name, {"f": f}).aggregate(ri)
    with pytest.raises(DefenseConfigError, match=re.escape(precondition)):
        registry.build(name, {"f": f}).check_clients(k)  # the same check, before round 0
    registry.build(name, {"f": 1}).check_clients(k)
    # ... the run's default f is capped and the violation reported, or refused on request.
    out = registry.build(name, {"assumed_attackers": f}).aggregate(ri)
    assert out.diagnostics["assumption_violated"] is True and out.diagnostics["f"] < f
    with pytest.raises(DefenseConfigError, match="on_violation"):
        registry.build(name, {"assumed_attackers": f, "on_violation": "raise"}).aggregate(ri)
    # An explicit legal f wins over the engine's count.
    out = registry.build(name, {"f": 1, "assumed_attackers": f}).aggregate(ri)
    assert out.diagnostics["f"] == 1 and out.diagnostics["assumption_violated"] is False


def test_multi_krum_m_larger_than_k_is_an_error():
    with pytest.raises(DefenseConfigError, match="m=11"):
        registry.build("multi-krum", {"m": 11}).aggregate(make_ri(client_updates()))
    with pytest.raises(DefenseConfigError, match="m=11"):
        registry.build("multi-krum", {"m": 11}).check_clients(10)


# ---------------------------------------------------------------------------------------------
# Property tests, one block per rule (baselines.md "Property test" lines)


def outlier_setting(k: int = 10, f: int = 3, d: int = 50, r: float = 1.0, seed: int = 0):
    """K−f points in a ball of radius r around c, f points at distance >= 100 r."""
    g = seeded(seed)
    centre = torch.randn(d, generator=g, dtype=torch.float64)
    dirs = torch.randn(k, d, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    radii = torch.rand(k, generator=g, dtype=torch.float64) * r
    x = centre + dirs * radii[:, None]
    far = 100 * r + 10 * r * torch.rand(f, generator=g, dtype=torch.float64)
    x[k - f:] = centre + dirs[k - f:] * far[:, None]
    return x


def ri64(x: torch.Tensor, ids=None, counts=None, global_weights=None, **kw) -> RoundInput:
    k, d = x.shape
    gw = torch.zeros(d, dtype=torch.float64) if global_weights is None else global_weights
    return RoundInput(global_weights=gw, updates=x, client_ids=list(range(k)) if ids is None
                      else ids, num_samples=torch.ones(k, dtype=torch.float64) * 10
                      if counts is None else torch.as_tensor(counts, dtype=torch.float64), **kw)


# 3.2 Krum
def test_krum_outputs_a_benign_input_and_is_translation_equivariant():
    x = outlier_setting()
    out = registry.build("krum", {"f": 3}).aggregate(ri64(x))
    matches = [i for i in range(7) if torch.equal(out.new_weights, x[i])]
    assert len(matches) == 1 and out.diagnostics["selected"] == matches
    v = torch.randn(x.shape[1], generator=seeded(1), dtype=torch.float64) * 50
    shifted = registry.build("krum", {"f": 3}).aggregate(ri64(x + v))
    assert torch.allclose(shifted.new_weights, out.new_weights + v, atol=1e-9)


def test_krum_neighbour_count_and_duplicates():
    # Exact duplicates: the point itself is excluded by index, so a duplicate still counts.
    x = torch.tensor([[0.0], [0.0], [1.0], [5.0]], dtype=torch.float64)
    d = pairwise_sq_dists(x)
    from fisherguard.defenses._robust import krum_scores
    assert krum_scores(d, 0).tolist() == [1.0, 1.0, 2.0, 41.0]  # n−f−2 = 2 neighbours


# 3.3 Multi-Krum
def test_multi_krum_properties():
    x = outlier_setting()
    out = registry.build("multi-krum", {"f": 3}).aggregate(ri64(x))
    assert torch.allclose(out.new_weights, x[:7].mean(0), atol=1e-12, rtol=0)
    assert out.diagnostics["selected"] == list(range(7))
    for f in range(4):
        full = registry.build("multi-krum", {"f": f, "m": 10}).aggregate(ri64(x))
        assert torch.allclose(full.new_weights, x.mean(0), atol=1e-12, rtol=0)
    one = registry.build("multi-krum", {"f": 3, "m": 1}).aggregate(ri64(x))
    krum = registry.build("krum", {"f": 3}).aggregate(ri64(x))
    assert torch.equal(one.new_weights, krum.new_weights)
    counts = torch.arange(1, 11, dtype=torch.float64)
    weighted = registry.build("multi-krum", {"f": 3, "weighted": True}).aggregate(
        ri64(x, counts=counts))
    alpha = counts[:7] / counts[:7].sum()
    assert torch.allclose(weighted.new_weights, (alpha[:, None] * x[:7]).sum(0), atol=1e-12)


# 3.4 FoolsGold
def test_foolsgold_zeroes_sybils_and_keys_history_by_id():
    d = 10_000
    g = seeded(0)
    honest = torch.randn(7, d, generator=g, dtype=torch.float64)
    sybil = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.cat([sybil.expand(3, d), honest])
    fg = FoolsGold()
    out = fg.aggregate(ri64(x))
    a = out.diagnostics["foolsgold_weights"]
    assert a[:3] == [0.0, 0.0, 0.0] and a[3:] == [1.0] * 7
    clipped = honest / honest.norm(dim=1, keepdim=True).clamp_min(1.0)
    assert torch.allclose(out.new_weights, clipped.mean(0), atol=1e-12)
    # Round 2 in a different client order: the history follows the client ids.
    x2 = torch.cat([sybil.expand(3, d), torch.randn(7, d, generator=g, dtype=torch.float64)])
    fg_other = FoolsGold()
    fg_other.aggregate(ri64(x))
    perm = torch.randperm(10, generator=seeded(3))
    ref = fg.aggregate(ri64(x2, round_idx=1))
    shuffled = fg_other.aggregate(ri64(x2[perm], ids=perm.tolist(), round_idx=1))
    assert torch.equal(ref.client_weights[perm], shuffled.client_weights)
    assert torch.allclose(ref.new_weights, shuffled.new_weights, atol=1e-12)


def test_foolsgold_all_sybils_leave_model_unchanged():
    x = torch.ones(4, 30, dtype=torch.float64)
    out = FoolsGold().aggregate(ri64(x))
    assert out.status == "all_weights_zero"
    assert torch.equal(out.new_weights, torch.zeros(30, dtype=torch.float64))


# 3.5 RLR
def test_rlr_properties():
    x = torch.randn(10, 200, generator=seeded(0), dtype=torch.float64)
    counts = torch.arange(1, 11, dtype=torch.float64)
    fedavg = registry.build("fedavg").aggregate(ri64(x, counts=counts)).new_weights
    zero = registry.build("rlr", {"theta": 0}).aggregate(ri64(x, counts=counts)).new_weights
    assert torch.equal(zero, fedavg)
    big = registry.build("rlr", {"theta": 11}).aggregate(ri64(x, counts=counts)).new_weights
    assert torch.allclose(big, -fedavg, atol=1e-15, rtol=0)
    x[:, 0] = x[:, 0].abs() + 0.1  # every client pushes coordinate 0 up
    for theta in range(0, 11):
        out = registry.build("rlr", {"theta": theta}).aggregate(ri64(x, counts=counts))
        assert float(out.new_weights[0]) > 0
    code = registry.build("rlr", {"preset": "code"})
    assert code.theta == 0.5


# 3.6 DnC
def test_dnc_removes_shifted_attackers():
    d, sigma = 5_000, 1.0
    for seed in range(5):
        g = seeded(100 + seed)
        x = torch.randn(10, d, generator=g, dtype=torch.float64) * sigma
        u = torch.randn(d, generator=g, dtype=torch.float64)
        x[7:] += 50 * sigma * u / u.norm()
        out = registry.build("dnc", {"f": 3, "seed": seed}).aggregate(ri64(x))
        assert out.flagged.tolist() == [False] * 7 + [True] * 3
        assert torch.allclose(out.new_weights, x[:7].mean(0), atol=1e-12)
    plain = registry.build("dnc", {"f": 3, "c": 0.0}).aggregate(ri64(x))
    assert torch.allclose(plain.new_weights, x.mean(0), atol=1e-12)
    perm = torch.randperm(10, generator=seeded(9))
    a = registry.build("dnc", {"f": 3, "seed": 4}).aggregate(ri64(x))
    b = registry.build("dnc", {"f": 3, "seed": 4}).aggregate(ri64(x[perm], ids=perm.tolist()))
    assert torch.equal(a.new_weights, b.new_weights)


# 3.7 MMA
def test_mma_properties():
    g = seeded(0)
    gw = torch.randn(100, generator=g, dtype=torch.float64)
    x = torch.randn(10, 100, generator=g, dtype=torch.float64)
    counts = torch.arange(1, 11, dtype=torch.float64)
    full = registry.build("mma", {"p": 1.0}).aggregate(ri64(x, counts=counts, global_weights=gw))
    fedavg = registry.build("fedavg").aggregate(ri64(x, counts=counts, global_weights=gw))
    assert torch.allclose(full.new_weights, fedavg.new_weights, atol=1e-12)
    base = registry.build("mma").aggregate(ri64(x, global_weights=gw)).diagnostics["mma_scores"]
    scaled = registry.build("mma").aggregate(ri64(7.5 * x, global_weights=7.5 * gw))
    assert np.allclose(scaled.diagnostics["mma_scores"], base, rtol=1e-8)
    perm = torch.randperm(10, generator=g)
    shuffled = registry.build("mma").aggregate(ri64(x[perm], ids=perm.tolist(), global_weights=gw))
    assert np.allclose(np.array(shuffled.diagnostics["mma_scores"]),
                       np.array(base)[perm.numpy()], rtol=1e-12)
    t = multi_metric_features(x + gw)
    scores, singular = mahalanobis_scores(t)
    assert not singular
    assert torch.allclose(scores, ((t @ torch.linalg.pinv(torch.cov(t.T))) * t).sum(1),
                          rtol=1e-8)
    same = registry.build("mma").aggregate(ri64(torch.ones(5, 10, dtype=torch.float64)))
    assert same.diagnostics["singular_covariance"] and bool(torch.isfinite(same.new_weights).all())


def test_mma_excludes_a_scaled_client_statistically():
    excluded = 0
    for seed in range(100):
        g = seeded(seed)
        gw = torch.randn(100, generator=g, dtype=torch.float64)
        x = torch.randn(10, 100, generator=g, dtype=torch.float64)
        x[0] *= 10
        excluded += bool(registry.build("mma").aggregate(ri64(x, global_weights=gw)).flagged[0])
    assert excluded >= 95


# 3.8 Median
def test_median_matches_numpy_bit_for_bit_and_resists_outliers():
    for k in (9, 10):
        x = torch.randn(k, 300, generator=seeded(k), dtype=torch.float64)
        out = registry.build("median").aggregate(ri64(x))
        assert np.array_equal(out.new_weights.numpy(), np.median(x.numpy(), axis=0))
        moved = x.clone()
        bad = (k - 1) // 2
        moved[:bad] = torch.where(torch.rand(bad, 300, generator=seeded(1)) < 0.5, -1e9, 1e9
                                  ).to(torch.float64)
        res = registry.build("median").aggregate(ri64(moved)).new_weights
        assert bool((res >= x[bad:].min(0).values).all() and (res <= x[bad:].max(0).values).all())


# 3.9 Trimmed mean
def test_trimmed_mean_properties():
    x = torch.randn(10, 300, generator=seeded(0), dtype=torch.float64)
    mean = registry.build("trimmed-mean", {"beta": 0.0}).aggregate(ri64(x)).new_weights
    assert torch.allclose(mean, x.mean(0), atol=1e-15, rtol=0)
    for beta in (0.1, 0.2, 0.3, 0.4):
        out = registry.build("trimmed-mean", {"beta": beta}).aggregate(ri64(x)).new_weights
        ref = scipy.stats.trim_mean(x.numpy(), proportiontocut=beta, axis=0)
        assert np.allclose(out.numpy(), ref, atol=1e-12, rtol=0)
    for f in (1, 2, 3, 4):
        out = registry.build("trimmed-mean", {"f": f}).aggregate(ri64(x)).new_weights
        ref = scipy.stats.trim_mean(x.numpy(), proportiontocut=f / 10, axis=0)
        assert np.allclose(out.numpy(), ref, atol=1e-12, rtol=0)
        moved = x.clone()
        moved[:f] = torch.where(torch.rand(f, 300, generator=seeded(f)) < 0.5, -1e9, 1e9
                                ).to(torch.float64)
        res = registry.build("trimmed-mean", {"f": f}).aggregate(ri64(moved)).new_weights
        assert bool((res >= x[f:].min(0).values).all() and (res <= x[f:].max(0).values).all())


def meamed(x: np.ndarray, f: int) -> np.ndarray:
    """ByzFL's Meamed: per coordinate, the mean of the n − f values closest to the median."""
    med = np.median(x, axis=0)
    idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[: x.shape[0] - f]
    return np.take_along_axis(x, idx, axis=0).mean(0)


def test_trimmed_mean_code_preset_is_meamed_with_momentum():
    x1 = torch.randn(10, 300, generator=seeded(0), dtype=torch.float64)
    x2 = torch.randn(10, 300, generator=seeded(1), dtype=torch.float64)
    d = registry.build("trimmed-mean", {"preset": "code"})
    out1 = d.aggregate(ri64(x1))
    assert np.allclose(out1.new_weights.numpy(), meamed(x1.numpy(), 5), atol=1e-12)
    w1 = out1.new_weights
    out2 = d.aggregate(ri64(x2, global_weights=w1))
    expected = w1.numpy() + 0.9 * meamed(x1.numpy(), 5) + meamed(x2.numpy(), 5)
    assert np.allclose(out2.new_weights.numpy(), expected, atol=1e-12)


# 3.10 Bulyan
def test_bulyan_properties():
    x = outlier_setting(k=11, f=2)
    out = registry.build("bulyan", {"f": 2}).aggregate(ri64(x))
    assert set(out.diagnostics["selected"]) <= set(range(9))
    assert out.diagnostics["theta"] == 7 and out.diagnostics["beta"] == 3
    lo, hi = x[:9].min(0).values, x[:9].max(0).values
    assert bool((out.new_weights >= lo).all() and (out.new_weights <= hi).all())
    assert float(out.client_weights[9:].sum()) == 0.0
    with pytest.raises(DefenseConfigError, match="4f\\+3"):
        registry.build("bulyan", {"f": 3}).aggregate(ri64(x))
    capped = registry.build("bulyan", {"assumed_attackers": 3}).aggregate(ri64(x))
    assert capped.diagnostics["assumption_violated"] and capped.diagnostics["f"] == 2
    same = x[0].expand(7, -1).clone()
    assert torch.equal(registry.build("bulyan", {"f": 1}).aggregate(ri64(same)).new_weights, x[0])


# 3.11 RFA
def test_rfa_properties():
    same = torch.randn(50, generator=seeded(0), dtype=torch.float64).expand(6, -1).clone()
    assert torch.allclose(registry.build("rfa").aggregate(ri64(same)).new_weights, same[0],
                          atol=1e-12)
    g = seeded(1)
    x = torch.randn(10, 100, generator=g, dtype=torch.float64)
    u = torch.randn(100, generator=g, dtype=torch.float64)
    x[7:] += 1e3 * u / u.norm()
    benign = x[:7].mean(0)
    plain = (x.mean(0) - benign).norm()
    out3 = registry.build("rfa", {"max_iter": 3}).aggregate(ri64(x))
    obj = out3.diagnostics["objective"]
    assert all(b <= a + 1e-12 for a, b in zip(obj, obj[1:]))
    assert float((out3.new_weights - benign).norm()) <= 0.15 * float(plain)
    out100 = registry.build("rfa", {"max_iter": 100, "ftol": 0.0}).aggregate(ri64(x))
    spread = (x[:7] - benign).norm(dim=1).max()
    assert float((out100.new_weights - benign).norm()) <= float(spread)
    obj = out100.diagnostics["objective"]
    assert all(b <= a + 1e-9 for a, b in zip(obj, obj[1:]))
    v = torch.randn(100, generator=g, dtype=torch.float64) * 10
    moved = registry.build("rfa").aggregate(ri64(x + v)).new_weights
    assert torch.allclose(moved, out3.new_weights + v, atol=1e-9)


# 3.12 RSA
def test_rsa_server_step_properties():
    g = seeded(0)
    w = torch.randn(200, generator=g, dtype=torch.float64)
    x = torch.randn(10, 200, generator=g, dtype=torch.float64)
    rsa = registry.build("rsa")
    t = 4
    alpha = 0.01 / math.sqrt(t + 1)
    step = rsa.aggregate(ri64(x, global_weights=w, round_idx=t)).new_weights - w
    assert bool((step.abs() <= alpha * (0.07 * 10 + 0.01 * w.abs()) + 1e-15).all())
    hostile = x.clone()
    hostile[3] = 1e6 * torch.randn(200, generator=g, dtype=torch.float64)
    step2 = registry.build("rsa").aggregate(ri64(hostile, global_weights=w, round_idx=t)
                                           ).new_weights - w
    assert bool(((step2 - step).abs() <= 2 * alpha * 0.07 + 1e-15).all())
    still = registry.build("rsa", {"mu": 0.0}).aggregate(
        ri64(torch.zeros(10, 200, dtype=torch.float64), global_weights=w))
    assert torch.equal(still.new_weights, w)


def test_rsa_client_plan_and_l1_pull():
    w = torch.randn(30, generator=seeded(0))
    rsa = registry.build("rsa")
    assert rsa.client_regulariser == "l1pull"
    plan_in = PlanInput(round_idx=0, global_weights=w, client_ids=[3, 7])
    plans = rsa.plan_clients(plan_in)
    assert set(plans) == {3, 7} and plans[3].start_weights is None
    reg = plans[3].regulariser
    assert reg.kind == "l1pull"
    x = torch.randn(30, generator=seeded(1))
    params = [x[:10].clone().view(2, 5).requires_grad_(True), x[10:].clone().requires_grad_(True)]
    pen = reg.penalty(params)
    assert math.isclose(float(pen.detach()), 0.07 * float((x - w).abs().sum()), rel_tol=1e-6)
    pen.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    assert torch.allclose(grad, 0.07 * torch.sign(x - w))
    upd = torch.randn(2, 30, generator=seeded(2))
    rsa.aggregate(RoundInput(global_weights=w, updates=upd, num_samples=torch.tensor([5., 5.]),
                             client_ids=[3, 7]))
    plans = rsa.plan_clients(PlanInput(round_idx=1, global_weights=w * 0, client_ids=[3, 7, 9]))
    assert torch.allclose(plans[7].start_weights, w + upd[1])
    assert plans[9].start_weights is None
    assert torch.equal(plans[3].regulariser.anchor, w * 0)
    fresh = registry.build("rsa", {"client_init": "global"})
    fresh.aggregate(RoundInput(global_weights=w, updates=upd, num_samples=torch.tensor([5., 5.]),
                               client_ids=[3, 7]))
    assert fresh.plan_clients(plan_in)[3].start_weights is None
    assert isinstance(reg, L1Pull)


# 3.13 FLTrust
def test_fltrust_properties():
    sd = SoftmaxServerData(seed=3)
    w = GLOBAL.double()
    g0 = (sd.train(w.clone(), 2) - w)
    g = seeded(0)
    x = g0 + 0.5 * g0.norm() * torch.randn(6, P, generator=g, dtype=torch.float64) / math.sqrt(P)
    x[5] = -g0
    ft = registry.build("fltrust", {"server_epochs": 2})
    out = ft.aggregate(ri64(x, global_weights=w.clone(), server_data=sd))
    assert out.diagnostics["trust_scores"][5] == 0.0 and bool(out.flagged[5])
    y = x.clone()
    y[2] *= 100
    out_scaled = ft.aggregate(ri64(y, global_weights=w.clone(), server_data=sd))
    assert torch.allclose(out_scaled.new_weights, out.new_weights, atol=1e-12)
    same = ft.aggregate(ri64(g0.expand(4, -1).clone(), global_weights=w.clone(), server_data=sd))
    assert torch.allclose(same.new_weights - w, g0, atol=1e-12)
    opposed = ft.aggregate(ri64(-x[:5], global_weights=w.clone(), server_data=sd))
    assert opposed.status == "all_weights_zero" and torch.equal(opposed.new_weights, w)


# 3.14 Sageflow
def test_sageflow_properties():
    sd = SoftmaxServerData(seed=4)
    w = sd.train(torch.zeros(P, dtype=torch.float64), 3)
    x = 0.01 * torch.randn(5, P, generator=seeded(0), dtype=torch.float64)
    x[2] = -w  # the uploaded model is all zeros: uniform predictions, entropy ln C
    out = registry.build("sageflow").aggregate(ri64(x, global_weights=w, server_data=sd))
    assert out.diagnostics["entropy"][2] == pytest.approx(math.log(10), abs=1e-6)
    assert float(out.client_weights[2]) == 0.0 and out.reasons[2] == "high_entropy"
    assert bool((out.client_weights[[0, 1, 3, 4]] > 0).all())
    # MarsFL evaluates the global model for every client, so the zeroed model keeps its share.
    code = registry.build("sageflow", {"preset": "code"}).aggregate(
        ri64(x, global_weights=w, server_data=sd))
    assert torch.allclose(code.client_weights, torch.full((5,), 0.2, dtype=torch.float64))
    same = registry.build("sageflow").aggregate(
        ri64(x[0].expand(4, -1).clone(), global_weights=w, server_data=sd))
    assert torch.allclose(same.client_weights, torch.full((4,), 0.25, dtype=torch.float64))
    uniform = registry.build("sageflow", {"delta": 0, "entropy_threshold": float("inf")}
                             ).aggregate(ri64(x, global_weights=w, server_data=sd))
    assert torch.allclose(uniform.new_weights, w + x.mean(0), atol=1e-12)


# 3.15 Finetuning
def test_finetuning_properties():
    x = torch.randn(5, P, generator=seeded(0), dtype=torch.float64) * 0.01
    counts = torch.arange(1, 6, dtype=torch.float64)
    w = GLOBAL.double()
    none = registry.build("finetuning", {"epochs": 0}).aggregate(
        ri64(x, counts=counts, global_weights=w, server_data=None))
    fedavg = registry.build("fedavg").aggregate(ri64(x, counts=counts, global_weights=w))
    assert torch.equal(none.new_weights, fedavg.new_weights)
    spy = SoftmaxServerData(seed=5)
    tuned = registry.build("finetuning", {"epochs": 3}).aggregate(
        ri64(x, counts=counts, global_weights=w, server_data=spy))
    # The only data the rule touches is U, once, starting from the FedAvg model.
    assert [c[0] for c in spy.calls] == ["train"] and spy.calls[0][2] == 3
    assert torch.allclose(spy.calls[0][1], fedavg.new_weights)
    again = registry.build("finetuning", {"epochs": 3}).aggregate(
        ri64(x, counts=counts, global_weights=w, server_data=SoftmaxServerData(seed=5)))
    assert torch.equal(tuned.new_weights, again.new_weights)
    assert not torch.equal(tuned.new_weights, fedavg.new_weights)


# 3.16 CRFL
def test_crfl_properties():
    d = registry.build("crfl")
    w = torch.randn(2000, generator=seeded(0), dtype=torch.float64)  # ‖w‖ ≈ 45 > ρ_0 = 10
    for t in range(5):
        x = torch.randn(4, 2000, generator=seeded(t + 1), dtype=torch.float64) * 0.1
        out = d.aggregate(ri64(x, global_weights=w, round_idx=t, num_rounds=5))
        assert float(out.eval_weights.norm()) <= min(2 * t + 10, 15) + 1e-6
        if t == 4:
            assert torch.equal(out.new_weights, out.eval_weights)  # the last round adds no noise
            assert out.diagnostics["noise_added"] is False
        else:
            assert out.diagnostics["noise_added"] is True
        w = out.new_weights
    small = torch.randn(300, generator=seeded(9), dtype=torch.float64) * 0.01
    x = torch.randn(4, 300, generator=seeded(8), dtype=torch.float64) * 0.01
    counts = [1, 2, 3, 4]
    plain = registry.build("crfl", {"sigma": 0.0, "rho_max": float("inf")}).aggregate(
        ri64(x, global_weights=small, counts=counts))
    fedavg = registry.build("fedavg").aggregate(ri64(x, global_weights=small, counts=counts))
    assert torch.allclose(plain.new_weights, fedavg.new_weights, atol=1e-15)
    big = torch.zeros(200_000, dtype=torch.float64)
    noisy = registry.build("crfl", {"sigma": 0.01}).aggregate(
        ri64(torch.zeros(2, 200_000, dtype=torch.float64), global_weights=big, num_rounds=10))
    std = float((noisy.new_weights - noisy.eval_weights).std())
    assert abs(std - 0.01) <= 0.01 * 0.01
    zeros = torch.zeros(100, dtype=torch.float64)
    code = registry.build("crfl", {"preset": "code"}).aggregate(
        ri64(torch.zeros(2, 100, dtype=torch.float64), global_weights=zeros))
    assert code.eval_weights is None  # MarsFL evaluates the noisy model


# `code` presets: MarsFL transcriptions (docs/baselines.md §2, C1/C3)


def marsfl_krum_index(grads: np.ndarray, corrupted: int) -> int:
    """MarsFL ``Sever/utils/utils.py::krum`` (return_index) with its Euclidean distances."""
    n = len(grads)
    best, best_i = 1e20, -1
    for i in range(n):
        errors = sorted(np.linalg.norm(grads[i] - grads[j]) for j in range(n) if j != i)
        err = sum(errors[: n - corrupted])
        if err < best:
            best, best_i = err, i
    return best_i


def marsfl_bulyan(grads: np.ndarray, corrupted: int) -> np.ndarray:
    """MarsFL ``bulyan``: iterated Krum over the remaining clients, then its median-centred mean
    of θ − 2f − 1 values."""
    remaining = list(range(len(grads)))
    selected = []
    for _ in range(len(grads) - 2 * corrupted):
        sub = grads[remaining]
        n = len(sub)
        best, best_i = 1e20, -1
        for a in range(n):
            errors = sorted(np.linalg.norm(sub[a] - sub[b]) for b in range(n) if b != a)
            err = sum(errors[: n - corrupted])
            if err < best:
                best, best_i = err, a
        selected.append(remaining.pop(best_i))
    s = grads[selected]
    keep = len(s) - 2 * corrupted - 1
    med = np.median(s, axis=0)
    idx = np.argsort(np.abs(s - med), axis=0, kind="stable")[:keep]
    return np.take_along_axis(s, idx, axis=0).mean(0)


def test_code_presets_match_marsfl_transcriptions():
    g = seeded(0)
    x1 = torch.randn(10, 80, generator=g, dtype=torch.float64)
    x2 = torch.randn(10, 80, generator=g, dtype=torch.float64)
    krum = registry.build("krum", {"preset": "code"})
    out1 = krum.aggregate(ri64(x1))
    i1 = marsfl_krum_index(x1.numpy(), 1)
    assert torch.equal(out1.new_weights, x1[i1])
    out2 = krum.aggregate(ri64(x2, global_weights=out1.new_weights))
    i2 = marsfl_krum_index(x2.numpy(), 1)
    assert torch.allclose(out2.new_weights, x1[i1] + 0.9 * x1[i1] + x2[i2], atol=1e-12)
    mk = registry.build("multi-krum", {"preset": "code"}).aggregate(ri64(x1))
    assert mk.diagnostics["m"] == 5
    bul = registry.build("bulyan", {"preset": "code"}).aggregate(ri64(x1))
    assert np.allclose(bul.new_weights.numpy(), marsfl_bulyan(x1.numpy(), 1), atol=1e-12)
    assert bul.diagnostics["beta"] == 5


def test_dnc_code_preset_normalises_the_step():
    x = torch.randn(10, 500, generator=seeded(0), dtype=torch.float64) * 30
    out = registry.build("dnc", {"f": 3, "preset": "code"}).aggregate(ri64(x))
    assert float(out.new_weights.norm()) <= 1.0


def test_coordinate_helpers():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [10.0, 5.0]], dtype=torch.float64)
    med, share = coordinate_median(x)
    assert med.tolist() == [2.5, 5.0] and share.sum(0).tolist() == [1.0, 1.0]
    mean, used = closest_to_centre_mean(x, med, 2)
    assert mean.tolist() == [2.5, 5.0] and used[:, 1].tolist() == [1.0, 1.0, 0.0, 0.0]
