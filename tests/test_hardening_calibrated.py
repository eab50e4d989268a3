"""Hardening rules calibrated on real client Fisher statistics (docs/algorithms.md §8.2, §8.3).

``fixtures/fisher_real.npz`` (built by ``fixtures/make_fisher_fixture.py``, never recomputed
here) holds honest uploads of the demo setting: per client and round, statistics of the full
P = 92 626 vectors, and for one round a seeded subsample of 1 500 coordinates of F_k, Δ_k,
M_k(D_k) and M_k(U). Every rule must fire on its forgery and never on these honest uploads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fisherguard.data.partition import dirichlet
from fisherguard.defenses import registry
from fisherguard.defenses.base import COUNT_CAP, DefenseConfigError, RoundInput, bound_counts
from fisherguard.defenses.fdcr import (FDCR, SUPPORT_RATIO, fisher_importance,
                                       importance_support, spiky_rows)
from fisherguard.defenses.sdfc import ECHO_RTOL, SDFC, echo_ratio

pytestmark = pytest.mark.unit

D = torch.float64
FIXTURE = Path(__file__).parent / "fixtures" / "fisher_real.npz"


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def fdcr_round(real: dict[str, np.ndarray], fisher: torch.Tensor | None = None,
               counts: list[float] | None = None) -> RoundInput:
    """The fixture's FDCR round on its 1 500 stored coordinates (honest unless overridden)."""
    upd = torch.tensor(real["fdcr_updates"], dtype=D)
    fis = torch.tensor(real["fdcr_fisher"], dtype=D) if fisher is None else fisher
    n = torch.tensor(real["fdcr_counts"][-1] if counts is None else counts, dtype=D)
    return RoundInput(global_weights=torch.zeros(upd.shape[1], dtype=D), updates=upd,
                      num_samples=n, client_ids=list(range(upd.shape[0])), fisher=fis, lr=0.01)


def test_fixture_is_small_and_holds_real_uploads(real) -> None:
    assert FIXTURE.stat().st_size <= 300_000
    assert int(real["num_params"]) == 92_626 and real["coords"].shape == (1500,)
    assert real["fdcr_fisher"].shape == real["sdfc_val"].shape == (10, 1500)
    assert real["fdcr_stats"].shape == real["sdfc_stats"].shape == (3, 10, 3)
    assert (real["fdcr_fisher"] >= 0).all() and (real["fdcr_updates"] != 0).any()


# ------------------------------------------------------------------ sample-count bound (§8.3)


def test_inflated_count_no_longer_dominates_fedavg_and_fdcr(real) -> None:
    counts = [float(c) for c in real["fdcr_counts"][-1]]
    counts[9] = float(2 ** 53)
    ri = fdcr_round(real, counts=counts)
    lower_median = sorted(counts)[4]
    bound = np.floor(COUNT_CAP * lower_median)
    for name in ("fedavg", "fdcr"):
        agg = registry.build(name).aggregate(ri)
        assert agg.diagnostics["count_clipped"] == [9]
        assert agg.diagnostics["count_bound"] == bound
        assert float(agg.client_weights[9]) < 0.5
        assert int((agg.client_weights[:9] > 0).sum()) >= 5  # the honest majority is kept
    fedavg = registry.build("fedavg").aggregate(ri)
    assert float(fedavg.client_weights[9]) == pytest.approx(bound / (sum(counts[:9]) + bound))
    # without the bound the liar takes everything (the finding)
    ri.count_cap = None
    assert float(registry.build("fedavg").aggregate(ri).client_weights[9]) > 0.999


@pytest.mark.parametrize("name, options", [
    ("sdfc", {"use_fdagg": False}), ("rfa", {}), ("rlr", {"theta": 0}),
    ("multi-krum", {"weighted": True, "m": 5}), ("mma", {"p": 1.0}),
])
def test_every_count_weighted_rule_sees_the_bound(name, options) -> None:
    p, k = 6, 5
    g = torch.Generator().manual_seed(1)
    upd = 0.01 * torch.randn(k, p, generator=g, dtype=D)
    fis = torch.rand(k, p, generator=g, dtype=D) + 0.1
    server = _Server({}, p) if name == "sdfc" else None
    n = [100.0, 120.0, 90.0, 110.0, float(2 ** 50)]
    ri = RoundInput(global_weights=torch.zeros(p, dtype=D), updates=upd,
                    num_samples=torch.tensor(n, dtype=D), client_ids=list(range(k)),
                    fisher=fis, server_data=server)
    if name == "sdfc":
        options = {**options, "hardening": "off"}
    agg = registry.build(name, options).aggregate(ri)
    assert agg.diagnostics["count_clipped"] == [4]
    # the rule saw the clipped count: the same round with n_4 = cap × lower median, unbounded
    n[4] = float(np.floor(COUNT_CAP * 110))
    same = RoundInput(global_weights=ri.global_weights, updates=upd,
                      num_samples=torch.tensor(n, dtype=D), client_ids=list(range(k)),
                      fisher=fis, server_data=server, count_cap=None)
    ref = registry.build(name, options).aggregate(same)
    torch.testing.assert_close(agg.client_weights, ref.client_weights, rtol=0, atol=0)
    torch.testing.assert_close(agg.new_weights, ref.new_weights, rtol=0, atol=0)
    n[4] = float(2 ** 50)
    unbounded = registry.build(name, options).aggregate(
        RoundInput(global_weights=ri.global_weights, updates=upd,
                   num_samples=torch.tensor(n, dtype=D), client_ids=list(range(k)),
                   fisher=fis, server_data=server, count_cap=None))
    assert not torch.equal(unbounded.new_weights, agg.new_weights)


def test_honest_counts_are_never_clipped(real) -> None:
    # the fixture's real partition, and 200 seeded Dirichlet(0.5) partitions of a balanced
    # 20 000-image pool over K = 10 (the demo's setting): false-rejection rate 0 / 201
    rows = [real["fdcr_counts"][-1].tolist()]
    labels = np.repeat(np.arange(10), 2000)
    for seed in range(200):
        part = dirichlet(labels, 10, 0.5, np.random.default_rng(seed))
        rows.append([float(len(ix)) for ix in part.client_indices])
    worst = 0.0
    for counts in rows:
        ri = RoundInput(global_weights=torch.zeros(2, dtype=D), updates=torch.zeros(10, 2, dtype=D),
                        num_samples=torch.tensor(counts, dtype=D), client_ids=list(range(10)))
        out, clipped = bound_counts(ri, [None] * 10)
        assert clipped == {} and out is ri
        worst = max(worst, max(counts) / sorted(counts)[4])
    assert worst < COUNT_CAP / 2  # measured 2.15 over these partitions


def test_count_cap_is_an_option_and_checked() -> None:
    ri = RoundInput(global_weights=torch.zeros(2, dtype=D), updates=torch.zeros(3, 2, dtype=D),
                    num_samples=torch.tensor([10.0, 10.0, 1000.0], dtype=D),
                    client_ids=[0, 1, 2], count_cap=200.0)
    assert bound_counts(ri, [None] * 3)[1] == {}
    ri.count_cap = 2.0
    out, diag = bound_counts(ri, [None] * 3)
    assert out.num_samples.tolist() == [10.0, 10.0, 20.0] and diag["count_clipped"] == [2]
    assert ri.num_samples.tolist() == [10.0, 10.0, 1000.0]  # the caller's input is not changed
    ri.count_cap = 0.5
    with pytest.raises(DefenseConfigError, match="count_cap"):
        bound_counts(ri, [None] * 3)


# ------------------------------------------------------------------ spikiness (§8.2)


def test_honest_real_uploads_are_never_spiky(real) -> None:
    # full-vector statistics of 60 honest uploads (2 runs × 3 rounds × 10 clients)
    for tag in ("fdcr", "sdfc"):
        for stats in real[f"{tag}_stats"]:
            support = torch.tensor(stats[:, 2], dtype=D)
            level = torch.tensor(stats[:, 0] / stats[:, 2], dtype=D)
            assert spiky_rows(support, level, SUPPORT_RATIO) == []
            # and with a margin: half the default ratio still rejects nobody
            assert spiky_rows(support, level, SUPPORT_RATIO / 2) == []
    agg = FDCR().aggregate(fdcr_round(real))
    assert "spiky" not in agg.reasons


def test_support_and_level_do_not_depend_on_p(real) -> None:
    f = torch.tensor(real["fdcr_fisher"], dtype=D)
    s1, l1 = importance_support(fisher_importance(f))
    s2, l2 = importance_support(fisher_importance(f.repeat(1, 60)))
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(l1, l2)


@pytest.mark.parametrize("p", [100, 200, 1500, 90_000])
def test_one_coordinate_spike_is_spiky_at_every_size(real, p) -> None:
    f = torch.tensor(real["fdcr_fisher"], dtype=D).repeat(1, 60)[:, :p].clone()
    f[9] = 0.0
    f[9, 0] = 1e6
    agg = FDCR().aggregate(_sized(real, f))
    assert agg.reasons[9] == "spiky" and float(agg.client_weights[9]) == 0.0
    assert "spiky" not in agg.reasons[:9]


def test_floor_trick_is_spiky_below_the_honest_median_mass(real) -> None:
    # spike + constant floor c (min 0 kept so min-max leaves I = c): every floor whose mean
    # importance is below half the honest median is caught at the real model's size
    f = torch.tensor(real["fdcr_fisher"], dtype=D).repeat(1, 62)  # P = 93 000
    imp = fisher_importance(f)
    median_mass = float(imp.mean(1).median())
    old_threshold = median_mass / 100  # the replaced rule: mean(I) < median / 100
    floors = [old_threshold * 1.01, *np.geomspace(1e-7, 0.5 * median_mass, 25)]
    for c in floors:
        g = f.clone()
        g[9] = float(c)
        g[9, 0], g[9, 1] = 0.0, 1.0
        forged = fisher_importance(g)
        support, level = importance_support(forged)
        assert 9 in spiky_rows(support, level, SUPPORT_RATIO), c
        assert spiky_rows(support[:9], level[:9], SUPPORT_RATIO) == []
        if c == floors[0]:  # the replaced rule let this floor through
            assert float(forged[9].mean()) >= float(forged.mean(1).median()) / 100


def test_spiky_ratio_is_refused_with_its_replacement_named() -> None:
    with pytest.raises(DefenseConfigError, match="support_ratio"):
        FDCR(spiky_ratio=100.0)
    with pytest.raises(DefenseConfigError, match="support_ratio"):
        registry.build("fdcr", {"spiky_ratio": 100.0})
    assert FDCR(spiky_ratio=None).support_ratio == SUPPORT_RATIO


# ------------------------------------------------------------------ SDFC echo (§8.2)


class _Server:
    """ServerData stand-in: M(U) of the uploaded model looked up by its weights."""

    size = 256

    def __init__(self, table: dict[bytes, torch.Tensor], p: int) -> None:
        self.table, self.p = table, p

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        key = weights.to(D).numpy().tobytes()
        return self.table.get(key, torch.ones(self.p, dtype=D))

    def train(self, weights, epochs):  # pragma: no cover
        raise NotImplementedError

    def loss_and_entropy(self, weights):  # pragma: no cover
        raise NotImplementedError


def sdfc_round(real: dict[str, np.ndarray], local: torch.Tensor) -> RoundInput:
    val = torch.tensor(real["sdfc_val"], dtype=D)
    upd = 0.01 * torch.arange(1, 11, dtype=D).unsqueeze(1) * torch.ones(10, val.shape[1], dtype=D)
    wt = torch.zeros(val.shape[1], dtype=D)
    table = {(wt + upd[k]).numpy().tobytes(): val[k] for k in range(10)}
    return RoundInput(global_weights=wt, updates=upd, num_samples=torch.full((10,), 100.0, dtype=D),
                      client_ids=list(range(10)), fisher=local,
                      server_data=_Server(table, val.shape[1]))


def test_honest_real_echo_ratios_pass_with_margin(real) -> None:
    rho = real["sdfc_echo"]  # 30 honest uploads, full vectors
    assert rho.min() > 5 * ECHO_RTOL  # measured minimum 0.324
    agg = SDFC().aggregate(sdfc_round(real, torch.tensor(real["sdfc_local"], dtype=D)))
    assert "echo" not in agg.reasons and bool((agg.client_weights > 0).all())
    assert min(agg.diagnostics["echo_ratio"]) > ECHO_RTOL


@pytest.mark.parametrize("forgery", ["x1.0021", "x1.01", "noise1%", "exact"])
def test_near_echo_forgeries_are_rejected(real, forgery) -> None:
    local = torch.tensor(real["sdfc_local"], dtype=D)
    val = torch.tensor(real["sdfc_val"], dtype=D)
    g = torch.Generator().manual_seed(5)
    for k in (7, 8, 9):
        if forgery == "exact":
            local[k] = val[k]
        elif forgery.startswith("x"):
            local[k] = val[k] * float(forgery[1:])
        else:
            local[k] = val[k] * (1 + 0.01 * torch.randn(val.shape[1], generator=g, dtype=D)).abs()
        assert echo_ratio(local[k], val[k]) < ECHO_RTOL
    for preset in ("paper", "code"):
        agg = SDFC(preset=preset).aggregate(sdfc_round(real, local))
        assert agg.reasons[7:] == ["echo"] * 3 and float(agg.client_weights[7:].sum()) == 0.0
        assert agg.reasons[:7] == [None] * 7
    # the replaced threshold (1e-3) let the rescaled echoes through
    if forgery in ("x1.0021", "x1.01", "noise1%"):
        old = SDFC(echo_rtol=1e-3).aggregate(sdfc_round(real, local))
        assert old.reasons[7:] == [None] * 3


def _sized(real: dict[str, np.ndarray], fisher: torch.Tensor) -> RoundInput:
    """A round of the fixture's clients at the Fisher's size P (updates tiled to match)."""
    p = fisher.shape[1]
    upd = torch.tensor(real["fdcr_updates"], dtype=D).repeat(1, p // 1500 + 1)[:, :p]
    return RoundInput(global_weights=torch.zeros(p, dtype=D), updates=upd.contiguous(),
                      num_samples=torch.tensor(real["fdcr_counts"][-1], dtype=D),
                      client_ids=list(range(10)), fisher=fisher, lr=0.01)


# ------------------------------------------------------------------ duplicate uploads (§8.2)


def test_duplicate_rows_by_the_relative_distance_of_update_and_fisher() -> None:
    from fisherguard.defenses.fdcr import duplicate_rows

    upd = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0 + 1e-3], [0.0, 1.0]], dtype=D)
    fis = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=D)
    assert duplicate_rows(upd, fis, 0.0) == [0, 1]  # bit-identical only
    # rows 0/2: ‖ΔΔ‖ = 1e-3 against a mean norm of ≈ 5: a copy at rtol 1e-3, not at 1e-4
    assert duplicate_rows(upd, fis, 1e-3) == [0, 1, 2]
    assert duplicate_rows(upd, fis, 1e-4) == [0, 1]
    fis[1, 1] = 0.5  # same update, another Fisher: not a copy
    assert duplicate_rows(upd, fis, 0.0) == []


def test_copied_uploads_are_refused_and_honest_ones_never(real) -> None:
    honest = fdcr_round(real)
    # 10 real honest uploads: no pair is a copy, even at a tolerance 10 000× the default
    assert "duplicate" not in FDCR(reject_duplicates=True, duplicate_rtol=1e-2).aggregate(honest).reasons
    # clients 7-9 upload client 7's (Δ, F), as the fdcr-steer colluders do
    upd, fis = honest.updates.clone(), honest.fisher.clone()
    upd[8:] = upd[7]
    fis[8:] = fis[7]
    steered = RoundInput(global_weights=honest.global_weights, updates=upd,
                         num_samples=honest.num_samples, client_ids=honest.client_ids,
                         fisher=fis, lr=honest.lr)
    agg = FDCR(reject_duplicates=True).aggregate(steered)
    assert agg.reasons[7:] == ["duplicate"] * 3 and float(agg.client_weights[7:].sum()) == 0.0
    assert "duplicate" not in agg.reasons[:7]
    assert "duplicate" not in FDCR().aggregate(steered).reasons  # off by default


# ------------------------------------------------------------------ Fisher/update consistency (§8.2)


def test_update_consistency_is_spearman_with_mean_ranks_for_ties() -> None:
    from fisherguard.defenses.fdcr import average_ranks, update_consistency

    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [3, 0, 3, 1, 3]
    # I ranks [0, 1.5, 1.5, 3], |Δ| ranks [1, 3, 2, 0]: centred dot −1.5 over √4.5·√5 = −1/√10
    imp = torch.tensor([[0.1, 0.4, 0.4, 0.9], [0.0, 0.5, 0.5, 1.0]], dtype=D)
    upd = torch.tensor([[-1.0, 3.0, 2.0, 0.5], [7.0, 7.0, -7.0, 7.0]], dtype=D)
    rho = update_consistency(imp, upd)
    assert float(rho[0]) == pytest.approx(-1 / 10 ** 0.5, abs=1e-15)
    assert float(rho[1]) == 0.0  # |Δ| ranks nothing: no evidence either way


def test_consistency_rule_refuses_a_fisher_unrelated_to_the_update_never_an_honest_one(real):
    from fisherguard.attacks.val_echo import probe

    honest = fdcr_round(real)
    agg = FDCR(fisher_update_consistency=0.35).aggregate(honest)
    assert "inconsistent" not in agg.reasons
    # the fixture's ten honest uploads: ρ from 0.70 to 0.78 (docs/algorithms.md §8.2)
    assert min(agg.diagnostics["update_consistency"]) > 0.7
    # what f-val-echo uploads when no H comes back (under FDCR): the probe ramp
    fis = honest.fisher.clone()
    fis[7:] = probe(fis[0])
    forged = RoundInput(global_weights=honest.global_weights, updates=honest.updates,
                        num_samples=honest.num_samples, client_ids=honest.client_ids,
                        fisher=fis, lr=honest.lr)
    agg = FDCR(fisher_update_consistency=0.35).aggregate(forged)
    assert agg.reasons[7:] == ["inconsistent"] * 3 and float(agg.client_weights[7:].sum()) == 0.0
    assert "inconsistent" not in agg.reasons[:7]
    assert all(r < 0.35 for r in agg.diagnostics["update_consistency"][7:])
    # off by default (no ρ computed); −1 records ρ and refuses nobody
    assert "update_consistency" not in FDCR().aggregate(forged).diagnostics
    assert "inconsistent" not in FDCR(fisher_update_consistency=-1.0).aggregate(forged).reasons
    with pytest.raises(DefenseConfigError, match="fisher_update_consistency"):
        FDCR(fisher_update_consistency=1.5)


# ------------------------------------------------------------------ norm bound (§8.2)


def test_clip_to_median_norm_by_hand() -> None:
    from fisherguard.defenses.fdcr import clip_to_median_norm

    upd = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0], [0.0, 0.0]], dtype=D)
    clipped, mask, med = clip_to_median_norm(upd)
    assert med == 3.0  # median of the norms 5, 1, 50, 0
    assert mask.tolist() == [True, False, True, False]
    assert torch.allclose(clipped, torch.tensor([[1.8, 2.4], [0.0, 1.0], [1.8, 2.4], [0.0, 0.0]],
                                                dtype=D), rtol=0, atol=1e-15)


def test_norm_bound_caps_a_scaled_update_in_the_aggregate(real) -> None:
    honest = fdcr_round(real)
    upd = honest.updates.clone()
    upd[9] = upd[9] * 1000.0  # model replacement: one client's update scaled up
    ri = RoundInput(global_weights=honest.global_weights, updates=upd,
                    num_samples=honest.num_samples, client_ids=honest.client_ids,
                    fisher=honest.fisher, lr=honest.lr)
    plain, bounded = FDCR().aggregate(ri), FDCR(norm_bound=True).aggregate(ri)
    assert "norm_bound" not in plain.diagnostics  # off by default
    med = bounded.diagnostics["norm_bound"]
    assert 9 in bounded.diagnostics["norm_clipped"]
    # no kept update can move the model further than the median length (FPRA's 2σ(I) ≤ 2)
    assert float(bounded.new_weights.norm()) <= 2.0 * med * 1.0000001
    assert float(plain.new_weights.norm()) > 10 * float(bounded.new_weights.norm())
