"""FDCR (docs/algorithms.md §3, docs/algorithms.md §4, docs/algorithms.md §8): worked examples A, A′, B, F and behavioural properties."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

from fisherguard.defenses import registry
from fisherguard.defenses.base import DefenseConfigError, RoundInput
from fisherguard.defenses.fdcr import (FDCR, ORACLE_LABEL, FDCROracle, discrepancy,
                                       fcdc_reweight, finch_level0, fisher_importance,
                                       fpra_rescale, importance_weighted_gradient,
                                       separation_silhouette, top_cluster)
from fisherguard.defenses.sdfc import SDFC

pytestmark = pytest.mark.unit

D = torch.float64
TOL = dict(atol=1e-6, rtol=0)

# Example A (clients 0–2) and the two planted clients of A′ (3, 4)
W = torch.tensor([[0.2, 0.1, 0, -0.1], [0.1, 0.2, 0.1, 0], [-0.3, 0.4, 0.2, 0.5],
                  [2, -2, 2, 2], [2, -1.8, 2, 2]], dtype=D)
F = torch.tensor([[4, 2, 1, 0], [1, 3, 5, 1], [2, 2, 6, 10], [1, 2, 2, 2], [3, 4, 4, 4]], dtype=D)
N = [2, 1, 1, 1, 1]
PAPER_A = torch.tensor([0.096212, 0.224492, 0.098799, 0.132765], dtype=D)
FEDAVG_A = torch.tensor([0.05, 0.2, 0.075, 0.075], dtype=D)


def round_input(k: int, lr: float = 0.1) -> RoundInput:
    return RoundInput(global_weights=torch.zeros(4, dtype=D), updates=W[:k].clone(),
                      num_samples=torch.tensor(N[:k], dtype=D), client_ids=list(range(k)), lr=lr,
                      fisher=F[:k].clone())


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


def partition(labels: list[int]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, set()).add(i)
    return {frozenset(g) for g in groups.values()}


# ------------------------------------------------------------------ Example A


def test_example_a_vector_maths() -> None:
    imp = fisher_importance(F[:3])
    torch.testing.assert_close(imp, t(1, .5, .25, 0, 0, .5, 1, 0, 0, 0, .5, 1).reshape(3, 4), **TOL)
    g = importance_weighted_gradient(W[:3], None, 0.1)
    torch.testing.assert_close(g, t(2, 1, 0, -1, 1, 2, 1, 0, -3, 4, 2, 5).reshape(3, 4), **TOL)
    gt = importance_weighted_gradient(W[:3], imp, 0.1)
    torch.testing.assert_close(gt, t(2, .5, 0, 0, 0, 1, 1, 0, 0, 0, 1, 5).reshape(3, 4), **TOL)
    alpha = t(0.5, 0.25, 0.25)
    v, ref = discrepancy(gt, alpha, "mse")
    torch.testing.assert_close(ref, t(1, 0.5, 0.5, 1.25), **TOL)
    torch.testing.assert_close(v, t(0.703125, 0.765625, 3.890625), **TOL)
    v2, _ = discrepancy(gt, alpha, "l2", l2_eps=0.0)
    torch.testing.assert_close(v2, t(1.677051, 1.75, 3.944933), **TOL)
    v3, _ = discrepancy(gt, alpha, "l2")  # the released 1e-6 offset moves V by < 1e-6 here
    torch.testing.assert_close(v3, v2, atol=1e-6, rtol=0)
    # the code's sign of g gives the same V
    v4, _ = discrepancy(-gt, alpha, "mse")
    torch.testing.assert_close(v4, v, **TOL)
    assert finch_level0(v) == [0, 0, 0]


def test_example_a_fpra() -> None:
    factors = fpra_rescale(torch.ones(4, dtype=D), t(0, 0.25, 0.5, 1))
    torch.testing.assert_close(factors, t(1, 1.124353, 1.244919, 1.462117), **TOL)
    what = fpra_rescale(W[:3], fisher_importance(F[:3]))
    torch.testing.assert_close(what, t(0.292423, 0.124492, 0, -0.1, 0.1, 0.248984, 0.146212, 0,
                                       -0.3, 0.4, 0.248984, 0.731059).reshape(3, 4), **TOL)


@pytest.mark.parametrize("hardening", ["on", "off"])
def test_example_a_paper_and_code(hardening: str) -> None:
    agg = FDCR(preset="paper", hardening=hardening).aggregate(round_input(3))
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)
    torch.testing.assert_close(agg.client_weights, t(0.5, 0.25, 0.25), **TOL)
    assert agg.reasons == [None, None, None] and not agg.flagged.any()
    assert agg.diagnostics["discrepancy"] == pytest.approx([0.703125, 0.765625, 3.890625], abs=1e-9)
    assert agg.diagnostics["importance_mass"] == pytest.approx([0.4375, 0.375, 0.375])
    assert agg.diagnostics["cluster"] == [0, 0, 0] and agg.diagnostics["num_removed"] == 0
    code = FDCR(preset="code", hardening=hardening).aggregate(round_input(3))
    torch.testing.assert_close(code.new_weights, FEDAVG_A, **TOL)
    assert code.diagnostics["fpra_applied"] is False


def test_example_a_invariances() -> None:
    base = FDCR().aggregate(round_input(5))
    # F → c·F keeps I; η and the sign of g keep V's labels and the gate
    ri = round_input(5)
    ri.fisher = ri.fisher * 7.5
    scaled = FDCR().aggregate(ri)
    torch.testing.assert_close(scaled.new_weights, base.new_weights, **TOL)
    for lr in (0.01, 3.0):
        other = FDCR().aggregate(round_input(5, lr=lr))
        assert other.reasons == base.reasons
        torch.testing.assert_close(other.new_weights, base.new_weights, **TOL)
    # permuting clients permutes every output
    perm = [3, 0, 4, 2, 1]
    ri = RoundInput(global_weights=torch.zeros(4, dtype=D), updates=W[perm], fisher=F[perm],
                    num_samples=torch.tensor([N[p] for p in perm], dtype=D),
                    client_ids=perm, lr=0.1)
    permuted = FDCR().aggregate(ri)
    torch.testing.assert_close(permuted.new_weights, base.new_weights, **TOL)
    torch.testing.assert_close(permuted.client_weights, base.client_weights[perm], **TOL)
    assert permuted.reasons == [base.reasons[p] for p in perm]


# ------------------------------------------------------------------ Example A′


def test_example_a_prime_mse() -> None:
    agg = FDCR().aggregate(round_input(5))
    assert agg.diagnostics["discrepancy"] == pytest.approx(
        [37.319444, 35.423611, 19.673611, 130.423611, 117.423611], abs=1e-6)
    assert agg.diagnostics["importance_mass"][3:] == pytest.approx([0.75, 0.75])
    assert partition(agg.diagnostics["cluster"]) == {frozenset({0, 1, 2}), frozenset({3, 4})}
    assert agg.diagnostics["silhouette"] == pytest.approx(0.869346, abs=1e-6)
    assert agg.diagnostics["gate_fired"] is False and agg.diagnostics["num_removed"] == 2
    torch.testing.assert_close(agg.client_weights, t(0.5, 0.25, 0.25, 0, 0), **TOL)
    assert agg.reasons == [None, None, None, "clustered_out", "clustered_out"]
    assert agg.flagged.tolist() == [False, False, False, True, True]
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)
    # reference ḡ
    imp = fisher_importance(F)
    torch.testing.assert_close(imp[3], t(0, 1, 1, 1), **TOL)
    torch.testing.assert_close(imp[4], t(0, 1, 1, 1), **TOL)
    _, ref = discrepancy(importance_weighted_gradient(W, imp, 0.1), t(*N) / 6, "mse")
    torch.testing.assert_close(ref, t(2 / 3, -6, 7, 7.5), **TOL)
    fedavg = (t(*N) / 6) @ W
    torch.testing.assert_close(fedavg, t(0.7, -0.5, 0.716667, 0.716667), **TOL)


def test_example_a_prime_l2() -> None:
    imp = fisher_importance(F)
    v, _ = discrepancy(importance_weighted_gradient(W, imp, 0.1), t(*N) / 6, "l2", l2_eps=0.0)
    torch.testing.assert_close(v, t(12.217929, 11.903548, 8.870989, 22.840631, 21.672435), **TOL)
    agg = FDCR(discrepancy="l2").aggregate(round_input(5))
    assert partition(agg.diagnostics["cluster"]) == {frozenset({0, 1, 2}), frozenset({3, 4})}
    assert agg.diagnostics["silhouette"] == pytest.approx(0.841925, abs=1e-6)
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)


# ------------------------------------------------------------------ Example B

EXAMPLE_B = [
    # V, level-0 partition, E, sil, gated drop, published drop
    ((10, 11.5, 14, 12.2, 15, 40, 42.5), [{0, 1, 3}, {2, 4}, {5, 6}], {5, 6}, 0.912571,
     {5, 6}, {5, 6}),
    ((10, 11.5, 12.2, 14, 15, 16.5, 18.5), [{0, 1, 2}, {3, 4, 5, 6}], {3, 4, 5, 6}, 0.533193,
     set(), {3, 4, 5, 6}),
    ((0.31, 0.52, 0.18, 0.77, 0.45, 0.93, 0.64, 0.05, 0.86, 0.27),
     [{0, 2, 7, 9}, {1, 4, 6}, {3, 5, 8}], {3, 5, 8}, 0.527783, set(), {3, 5, 8}),
    ((1, 2, 10, 11.5), [{0, 1}, {2, 3}], {2, 3}, 0.864170, {2, 3}, {2, 3}),
    ((1, 2, 10), [{0, 1, 2}], set(), None, set(), set()),
]


@pytest.mark.parametrize("v, parts, top, sil, gated, published", EXAMPLE_B)
def test_example_b(v, parts, top, sil, gated, published) -> None:
    vt = t(*v)
    labels = finch_level0(vt)
    assert partition(labels) == {frozenset(p) for p in parts}
    if top:
        assert set(top_cluster(vt, labels)) == top
        assert separation_silhouette(vt, [i in top for i in range(len(v))]) == pytest.approx(sil, abs=1e-6)
    drop, info = FDCR().select_flagged(vt)
    assert set(drop) == gated
    assert info["gate_fired"] == (bool(top) and not gated)
    if sil is not None:
        assert info["silhouette"] == pytest.approx(sil, abs=1e-6)
    drop_pub, info_pub = FDCR(min_silhouette=None).select_flagged(vt)
    assert set(drop_pub) == published and info_pub["gate_fired"] is False
    drop_off, _ = FDCR(hardening="off").select_flagged(vt)
    assert set(drop_off) == published


def test_example_b_constant_scores() -> None:
    drop, info = FDCR(min_silhouette=None).select_flagged(t(5, 5, 5, 5, 5))
    assert drop == [] and info["single_cluster"] and info["silhouette"] is None


def test_example_b_row1_weights() -> None:
    drop, _ = FDCR().select_flagged(t(10, 11.5, 14, 12.2, 15, 40, 42.5))
    n = t(100, 200, 100, 300, 100, 100, 100)
    torch.testing.assert_close(fcdc_reweight(n / n.sum(), drop),
                               t(0.125, 0.25, 0.125, 0.375, 0.125, 0, 0), **TOL)


def test_tie_for_largest_cluster_mean_is_united() -> None:
    # clusters {0,1}, {2,3}, {4,5} with means 1.5, 10.5, 10.5: E is the union of the last two.
    # (Level-0 clusters of 1-D scores are runs of sorted values, so FINCH itself cannot tie
    # except by rounding; the rule is exercised on given labels.)
    v = t(1, 2, 10, 11, 11, 10)
    assert sorted(top_cluster(v, [0, 0, 1, 1, 2, 2])) == [2, 3, 4, 5]
    assert sorted(top_cluster(v, [0, 0, 1, 2, 1, 2])) == [2, 3, 4, 5]


def test_finch_ties_go_to_lowest_index() -> None:
    # point 1 is equidistant from 0 and 2; it links to 0; 2 links to 1 (nearest) → one cluster
    assert finch_level0(t(0, 1, 2)) == [0, 0, 0]
    # 2 is equidistant from 1 and 3: links to 1; 0–1 and 3–4 pairs
    assert partition(finch_level0(t(0, 0.5, 2, 3.5, 4))) == {frozenset({0, 1, 2}), frozenset({3, 4})}


@pytest.mark.integration  # 200 finch-clust runs (~1 s)
def test_finch_matches_finch_clust() -> None:
    import finch  # finch-clust, a test dependency
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.random(10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c, _, _ = finch.FINCH(v.reshape(-1, 1), distance="euclidean", verbose=False)
        ours = finch_level0(torch.tensor(v))
        assert partition(ours) == partition(list(c[:, 0]))


# ------------------------------------------------------------------ Example F: validation


def test_example_f_non_finite_fisher() -> None:
    w = torch.cat([W[:3], t(5, 5, 5, 5).unsqueeze(0)])
    f = torch.cat([F[:3], t(1, math.nan, 0, 2).unsqueeze(0)])
    ri = RoundInput(global_weights=torch.zeros(4, dtype=D), updates=w, fisher=f,
                    num_samples=t(2, 1, 1, 1), client_ids=[0, 1, 2, 3], lr=0.1)
    agg = FDCR().aggregate(ri)
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)
    torch.testing.assert_close(agg.client_weights, t(0.5, 0.25, 0.25, 0), **TOL)
    assert agg.reasons == [None, None, None, "non_finite"]
    assert agg.flagged.tolist() == [False, False, False, True]


@pytest.mark.parametrize("row, reason", [((1, 1, 1, 1), "constant"), ((0, 0, 0, 0), "constant"),
                                         ((1, -1, 0, 2), "negative")])
def test_example_f_bad_fisher_values(row, reason: str) -> None:
    w = torch.cat([W[:3], t(5, 5, 5, 5).unsqueeze(0)])
    f = torch.cat([F[:3], t(*row).unsqueeze(0)])
    ri = RoundInput(global_weights=torch.zeros(4, dtype=D), updates=w, fisher=f,
                    num_samples=t(2, 1, 1, 1), client_ids=[0, 1, 2, 3], lr=0.1)
    agg = FDCR().aggregate(ri)
    assert agg.reasons[3] == reason and float(agg.client_weights[3]) == 0.0
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)


def test_example_f_shape_and_missing_via_from_uploads() -> None:
    ups = [W[0], W[1], W[2], t(5, 5, 5, 5), t(5, 5, 5, 5), t(1, 2, 3)]
    fis = [F[0], F[1], F[2], t(1, 2, 3), None, F[0]]
    ri = RoundInput.from_uploads(torch.zeros(4, dtype=D), ups, [2, 1, 1, 1, 1, 1],
                                 list(range(6)), fisher=fis, lr=0.1)
    agg = FDCR().aggregate(ri)
    assert agg.reasons[3:] == ["bad_shape", "missing", "bad_shape"]
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)
    assert bool(torch.isfinite(agg.new_weights).all())


def test_example_f_spiky() -> None:
    p = 1000
    ramp = (torch.arange(p, dtype=D) + 1) / 1000
    spike = torch.zeros(p, dtype=D)
    spike[999] = 1e6
    fis = torch.stack([ramp, ramp, ramp, spike])
    torch.manual_seed(0)
    upd = 0.01 * torch.randn(4, p, dtype=D)
    ri = RoundInput(global_weights=torch.zeros(p, dtype=D), updates=upd, fisher=fis,
                    num_samples=t(1, 1, 1, 1), client_ids=[0, 1, 2, 3])
    agg = FDCR().aggregate(ri)
    assert agg.reasons[3] == "spiky" and float(agg.client_weights[3]) == 0.0
    assert agg.diagnostics["importance_mass"][0] == pytest.approx(0.5)
    assert agg.diagnostics["importance_mass"][3] == pytest.approx(0.001)
    assert agg.diagnostics["num_rejected"] == 1
    for off in (FDCR(hardening="off"), FDCR(support_ratio=None)):
        assert off.aggregate(ri).reasons[3] != "spiky"


def test_non_finite_update_and_no_samples_never_crash() -> None:
    upd = W[:3].clone()
    upd = torch.cat([upd, t(math.inf, 0, 0, 0).unsqueeze(0), t(1, 1, 1, 1).unsqueeze(0)])
    fis = torch.cat([F[:3], F[:1], F[:1]])
    ri = RoundInput(global_weights=torch.zeros(4, dtype=D), updates=upd, fisher=fis,
                    num_samples=t(2, 1, 1, 1, 0), client_ids=list(range(5)), lr=0.1)
    agg = FDCR().aggregate(ri)
    assert agg.reasons[3:] == ["non_finite", "no_samples"]
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)


def test_overflowing_update_is_rejected() -> None:
    upd = torch.cat([W[:3], t(1e300, 0, 0, 0).unsqueeze(0)])
    fis = torch.cat([F[:3], t(5, 1, 1, 1).unsqueeze(0)])
    ri = RoundInput(global_weights=torch.zeros(4, dtype=D), updates=upd, fisher=fis,
                    num_samples=t(2, 1, 1, 1), client_ids=list(range(4)), lr=0.1)
    agg = FDCR().aggregate(ri)
    # V overflows float64: never clustered as NaN, never a NaN model
    assert agg.reasons == [None, None, None, "non_finite"]
    torch.testing.assert_close(agg.new_weights, PAPER_A, **TOL)


def test_no_valid_clients_returns_global() -> None:
    ri = round_input(3)
    ri.fisher = torch.full_like(ri.fisher, math.nan)
    agg = FDCR().aggregate(ri)
    assert agg.status == "no_valid_clients" and agg.reasons == ["missing"] * 3
    assert torch.equal(agg.new_weights, ri.global_weights)
    assert float(agg.client_weights.sum()) == 0.0


def test_missing_fisher_matrix() -> None:
    ri = round_input(3)
    ri.fisher = None
    agg = FDCR().aggregate(ri)
    assert agg.reasons == ["missing"] * 3 and agg.status == "no_valid_clients"


def test_single_valid_client() -> None:
    ri = round_input(3)
    ri.fisher[1:] = math.nan
    agg = FDCR().aggregate(ri)
    torch.testing.assert_close(agg.client_weights, t(1, 0, 0), **TOL)
    expected = fpra_rescale(W[0], fisher_importance(F[0]))
    torch.testing.assert_close(agg.new_weights, expected, **TOL)


# ------------------------------------------------------------------ behaviour on constructed federations


def synthetic(seed: int = 0, attackers: int = 3, p: int = 400, shift: float = 0.5,
              attacker_noise: float = 0.01):
    """7 benign clients: small noisy updates and similar Fishers; attackers share a large update."""
    g = torch.Generator().manual_seed(seed)
    k = 7 + attackers
    # heavy-tailed like a real Fisher: after min-max most coordinates are near 0
    base_f = torch.exp(2.0 * torch.randn(p, generator=g, dtype=D))
    fis = base_f * (1 + 0.05 * torch.rand(k, p, generator=g, dtype=D))
    upd = 0.01 * torch.randn(k, p, generator=g, dtype=D)
    direction = torch.randn(p, generator=g, dtype=D)
    for a in range(7, k):
        upd[a] = shift * direction + attacker_noise * torch.randn(p, generator=g, dtype=D)
    if attackers and attacker_noise == 0:
        fis[7:] = fis[7]  # identical attackers: identical V
    n = (torch.randint(50, 150, (k,), generator=g)).to(D)
    return RoundInput(global_weights=torch.randn(p, generator=g, dtype=D), updates=upd, fisher=fis,
                      num_samples=n, client_ids=list(range(k)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("clustering, noise", [("finch", 0.01), ("kmeans", 0.01), ("dbscan", 0.0)])
def test_flags_exactly_the_attackers(seed: int, clustering: str, noise: float) -> None:
    # DBSCAN's default eps (1.4826·MAD of all V) is set by the benign spread; attackers whose
    # own V spread exceeds it become singletons, so its case uses identical attackers
    agg = FDCR(clustering=clustering).aggregate(synthetic(seed, attacker_noise=noise))
    assert agg.flagged.tolist() == [False] * 7 + [True] * 3
    assert agg.reasons[7:] == ["clustered_out"] * 3
    assert float(agg.client_weights.sum()) == pytest.approx(1.0)
    assert bool((agg.client_weights >= 0).all())
    assert agg.diagnostics["num_removed"] == 3


def test_identical_clients_remove_nobody() -> None:
    ri = synthetic(0, attackers=0, p=300)
    ri.updates[:] = ri.updates[0]
    ri.fisher[:] = ri.fisher[0]
    for d in (FDCR(), FDCR(min_silhouette=None), FDCR(clustering="kmeans"), FDCR(clustering="dbscan")):
        agg = d.aggregate(ri)
        assert not agg.flagged.any() and agg.diagnostics["num_removed"] == 0
        torch.testing.assert_close(agg.client_weights, ri.num_samples / ri.num_samples.sum())


def test_gate_keeps_clean_rounds() -> None:
    # 10 benign clients, no attacker: the published rule drops a cluster almost every round
    # (docs/algorithms.md §3.3); the gate rarely does (docs/algorithms.md §3.4 calibration: a few per cent)
    gated = published = 0
    draws = 60
    for seed in range(draws):
        ri = synthetic(100 + seed, attackers=3, p=200, shift=0.0)
        gated += int(FDCR().aggregate(ri).flagged.any())
        published += int(FDCR(min_silhouette=None).aggregate(ri).flagged.any())
    assert published >= 0.9 * draws
    assert gated <= 0.25 * draws


def test_weights_properties_and_finite_model() -> None:
    for seed in range(6):
        for kw in ({}, {"preset": "code"}, {"discrepancy": "cosine"}, {"use_fpra": False},
                   {"use_fcdc": False}, {"weight_by_importance": False},
                   {"importance_scope": "layer", "layer_sizes": [100, 300]},
                   {"param_slice": [200, 400]}, {"max_drop_fraction": 0.2}):
            ri = synthetic(seed, attackers=seed % 4)
            agg = FDCR(**kw).aggregate(ri)
            w = agg.client_weights
            assert w.dtype == torch.float64 and bool((w >= 0).all())
            assert float(w.sum()) == pytest.approx(1.0)
            assert torch.equal(agg.flagged, w == 0)
            assert all((r is not None) == bool(f) for r, f in zip(agg.reasons, agg.flagged))
            assert bool(torch.isfinite(agg.new_weights).all())
            assert agg.new_weights.dtype == ri.global_weights.dtype


def test_ablation_switches() -> None:
    ri = synthetic(1)
    wt = ri.global_weights
    fcdc_only = FDCR(use_fpra=False).aggregate(ri)
    expected = wt + fcdc_only.client_weights @ ri.updates
    torch.testing.assert_close(fcdc_only.new_weights, expected)
    fpra_only = FDCR(use_fcdc=False).aggregate(ri)
    assert not fpra_only.flagged.any() and fpra_only.diagnostics["fpra_applied"]
    alpha = ri.num_samples / ri.num_samples.sum()
    imp = fisher_importance(ri.fisher)
    torch.testing.assert_close(fpra_only.new_weights, wt + alpha @ fpra_rescale(ri.updates, imp))
    capped = FDCR(max_drop_fraction=0.2).aggregate(ri)
    assert not capped.flagged.any() and capped.diagnostics["drop_capped"]


def test_layer_scope_normalises_each_tensor() -> None:
    f = t(1, 3, 10, 20, 30)
    torch.testing.assert_close(fisher_importance(f, [2, 3]), t(0, 1, 0, 0.5, 1), **TOL)
    torch.testing.assert_close(fisher_importance(t(2, 2, 1, 3), [2, 2]), t(0, 0, 0, 1), **TOL)


# ------------------------------------------------------------------ the oracle ablation


def test_oracle_refuses_without_ids() -> None:
    oracle = FDCROracle()
    with pytest.raises(RuntimeError, match="receive_attacker_ids"):
        oracle.aggregate(synthetic(0))


def test_oracle_warns_and_labels() -> None:
    oracle = FDCROracle(seed=1)
    with pytest.warns(UserWarning, match="ground truth"):
        oracle.receive_attacker_ids([7, 8, 9])
    agg = oracle.aggregate(synthetic(0, shift=0.0))
    assert agg.diagnostics["label"] == ORACLE_LABEL
    # noise Fisher makes the marked clients' g̃ large: the oracle removes them although they
    # trained like everyone else
    assert agg.flagged.tolist() == [False] * 7 + [True] * 3
    bad = synthetic(0)
    bad.fisher = torch.full_like(bad.fisher, math.nan)
    assert oracle.aggregate(bad).diagnostics["label"] == ORACLE_LABEL
    assert FDCROracle.needs_attacker_ids and not FDCR.needs_attacker_ids


def test_oracle_noise_is_seeded_and_resumable() -> None:
    def run(state=None):
        o = FDCROracle(seed=3)
        with pytest.warns(UserWarning):
            o.receive_attacker_ids([8])
        if state is not None:
            o.load_state_dict(state)
        return o

    a = run()
    a.aggregate(synthetic(2))
    st = a.state_dict()
    x = a.aggregate(synthetic(3))
    y = run(st).aggregate(synthetic(3))
    assert torch.equal(x.new_weights, y.new_weights)


@pytest.mark.parametrize("cls", [FDCR, SDFC])
def test_honest_defenses_take_no_attacker_ids(cls) -> None:
    params = inspect.signature(cls.__init__).parameters
    assert not any("attack" in p or "oracle" in p or "malicious" in p for p in params)
    for name, _ in inspect.getmembers(cls):
        if name == "needs_attacker_ids":  # the base class flag, False here
            continue
        assert "attacker" not in name.lower() and "oracle" not in name.lower(), name
    assert cls.needs_attacker_ids is False


# ------------------------------------------------------------------ registry and options


def test_registry_builds() -> None:
    d = registry.build("fdcr", {"preset": "code", "clustering": "kmeans", "seed": 4})
    assert isinstance(d, FDCR) and d.discrepancy == "l2" and d.fisher_estimator == "official_label_mixed"
    assert d.fisher_options() == {"estimator": "official_label_mixed", "label_source": "dataset"}
    assert d.get_params()["clustering"] == "kmeans"
    assert FDCR().fisher_options() == {"estimator": "per_sample", "label_source": "dataset"}
    assert isinstance(registry.build("fdcr-oracle", {}), FDCROracle)
    assert registry.get("fdcr").needs_fisher


@pytest.mark.parametrize("opts, name", [
    ({"preset": "pape"}, "preset"), ({"discrepancy": "l1"}, "discrepancy"),
    ({"clustering": "hdbscan"}, "clustering"), ({"min_silhouette": 1.5}, "min_silhouette"),
    ({"support_ratio": 0.5}, "support_ratio"), ({"spiky_ratio": 100.0}, "support_ratio"),
    ({"max_drop_fraction": 0}, "max_drop_fraction"),
    ({"hardening": True}, "hardening"), ({"use_fpra": "yes"}, "use_fpra"),
    ({"importance_scope": "layer"}, "layer_sizes"), ({"fisher_estimator": "minibatch"}, "fisher_estimator"),
    ({"seed": -1}, "seed"), ({"param_slice": [5, 2]}, "param_slice"),
    ({"label_source": "model"}, "label_source"), ({"attacker_ids": [1]}, "attacker_ids"),
])
def test_bad_hyperparameters_name_the_parameter(opts, name: str) -> None:
    with pytest.raises(DefenseConfigError, match=name):
        registry.build("fdcr", opts)


# ------------------------------------------------------------------ issue 21: candidate rules


def test_robust_z_by_hand() -> None:
    from fisherguard.defenses.fdcr import robust_z

    # median 3, |V − 3| = 2, 1, 0, 1, 97: MAD 1, σ̂ = 1.4826
    torch.testing.assert_close(robust_z(t(1, 2, 3, 4, 100)),
                               t(-2, -1, 0, 1, 97) / 1.4826, **TOL)
    # MAD 0: σ̂ = 1.253314 · mean |V − 1| = 1.253314 · 0.8
    torch.testing.assert_close(robust_z(t(1, 1, 1, 1, 5)), t(0, 0, 0, 0, 4) / (1.253314 * 0.8),
                               **TOL)
    assert robust_z(t(2, 2, 2)).tolist() == [0.0, 0.0, 0.0]  # no spread, nobody stands out


def test_rule_robust_z_removes_only_modified_z_above_3_5() -> None:
    d = FDCR(rule="robust-z")
    assert d.select_flagged(t(1, 2, 3, 4, 100))[0] == [4]
    assert d.select_flagged(t(1, 1, 1, 1, 5))[0] == [4]  # z = 3.99 by the mean-AD fallback
    assert d.select_flagged(t(1, 1, 1, 2, 3))[0] == []  # z = 2 / (1.253314 · 0.6) = 2.66
    assert d.select_flagged(t(-100, 1, 2, 3, 4))[0] == []  # one-sided: a low V is not suspect
    assert d.select_flagged(t(5, 9))[0] == []  # two scores: z = ±0.67
    # Example A′: V = 37.32, 35.42, 19.67, 130.42, 117.42; median 37.32, MAD 17.646:
    # z = 3.56 for client 3, 3.06 for client 4 (the second planted client widens the MAD)
    agg = d.aggregate(round_input(5))
    assert agg.diagnostics["robust_z"][3] == pytest.approx(
        (130.423611 - 37.319444) / (1.4826 * (37.319444 - 19.673611)), abs=1e-6)
    assert agg.reasons == [None, None, None, "high_discrepancy", None]
    assert agg.diagnostics["rule"] == "robust-z" and agg.diagnostics["silhouette"] is None
    assert agg.diagnostics["num_removed"] == 1 and agg.diagnostics["gate_fired"] is False
    w = torch.tensor(N[:5], dtype=D)
    w[3] = 0
    torch.testing.assert_close(agg.client_weights, w / w.sum(), **TOL)
    # the cap applies to every rule
    assert FDCR(rule="robust-z", max_drop_fraction=0.1).select_flagged(t(1, 2, 3, 4, 100))[0] == []


def test_rule_cumulative_accumulates_per_client_across_rounds() -> None:
    d = FDCR(rule="cumulative")  # threshold 3.5, clip ±3.5, at least 2 rounds
    ids = [10, 11, 12, 13, 14]
    # round 1: client 14's z = 65 is clipped to 3.5 and it has one round only: nobody removed
    top, info = d.select_flagged(t(1, 2, 3, 4, 100), ids)
    assert top == [] and info["observations"] == [1] * 5
    assert info["cumulative_z"][4] == pytest.approx(3.5)
    # round 2, the same: (3.5 + 3.5)/√2 = 4.95 > 3.5
    top, info = d.select_flagged(t(1, 2, 3, 4, 100), ids)
    assert top == [4] and info["cumulative_z"][4] == pytest.approx(7 / math.sqrt(2))
    assert info["cumulative_z"][3] == pytest.approx(2 / 1.4826 / math.sqrt(2))
    # round 3 without client 14: its history is kept; round 4 it looks ordinary (z = 0) and
    # its statistic is 7/√3 = 4.04: still removed
    d.select_flagged(t(1, 2, 3, 4), ids[:4])
    top, info = d.select_flagged(t(1, 2, 3, 4, 2.5), ids)
    assert top == [4] and info["observations"][4] == 3
    assert info["cumulative_z"][4] == pytest.approx(7 / math.sqrt(3))
    # a single extreme round of a new client, then ordinary ones: 3.5/√2 = 2.47, kept
    e = FDCR(rule="cumulative")
    e.select_flagged(t(1, 2, 3, 4, 1000), ids)
    assert e.select_flagged(t(1, 2, 3, 4, 3), ids)[0] == []
    # the clip makes one round alone never enough, whatever min_rounds: z/√1 ≤ 3.5
    assert FDCR(rule="cumulative", min_rounds=1).select_flagged(t(1, 2, 3, 4, 100), ids)[0] == []
    with pytest.raises(ValueError, match="client id"):
        FDCR(rule="cumulative").select_flagged(t(1, 2, 3))


def test_rule_cumulative_state_round_trips_and_default_keeps_none() -> None:
    d = FDCR(rule="cumulative")
    d.aggregate(round_input(5))
    st = d.state_dict()
    assert set(st) == {"cumulative"} and st["cumulative"][3][1] == 1
    e = FDCR(rule="cumulative")
    e.load_state_dict(st)
    a, b = d.aggregate(round_input(5)), e.aggregate(round_input(5))
    assert a.diagnostics["cumulative_z"] == b.diagnostics["cumulative_z"]
    # round 2: client 3 (z 3.56, clipped 3.5) and client 4 (z 3.06 twice: 4.33) are removed
    assert a.diagnostics["cumulative_z"][4] == pytest.approx(
        2 * a.diagnostics["robust_z"][4] / math.sqrt(2))
    assert a.reasons == b.reasons == [None, None, None, "high_discrepancy", "high_discrepancy"]
    assert FDCR().state_dict() == {} and FDCR(rule="robust-z").state_dict() == {}
    with pytest.raises(ValueError):
        FDCR().load_state_dict(st)


def test_rule_options_are_checked_and_default_is_finch() -> None:
    assert FDCR().get_params()["rule"] == "finch"
    for bad in ({"rule": "gap"}, {"z_threshold": 0}, {"z_threshold": math.inf},
                {"min_rounds": 0}):
        with pytest.raises(DefenseConfigError):
            FDCR(**bad)


@pytest.mark.parametrize("k", [3, 5])
def test_default_rule_is_the_published_path(k: int) -> None:
    # rule = finch leaves FINCH, the gate and the record as they were (plus the suspicion list)
    a = FDCR().aggregate(round_input(k))
    b = FDCR(rule="finch").aggregate(round_input(k))
    assert torch.equal(a.new_weights, b.new_weights) and torch.equal(a.client_weights,
                                                                        b.client_weights)
    assert a.diagnostics == b.diagnostics and a.reasons == b.reasons
    assert not {"rule", "robust_z", "cumulative_z", "observations"} & set(a.diagnostics)
    assert a.diagnostics["suspicion"] == a.diagnostics["discrepancy"]


def test_two_sided_z_rules_also_remove_a_discrepancy_far_below_the_rest() -> None:
    # V = (-100, 1, 2, 3, 4): median 2, MAD 1, z_0 = -102/1.4826 = -68.8; one-sided keeps it
    assert FDCR(rule="robust-z").select_flagged(t(-100, 1, 2, 3, 4))[0] == []
    top, info = FDCR(rule="robust-z", two_sided=True).select_flagged(t(-100, 1, 2, 3, 4))
    assert top == [0] and info["low"] == [0]
    top, info = FDCR(rule="robust-z", two_sided=True).select_flagged(t(1, 2, 3, 4, 100))
    assert top == [4] and info["low"] == []
    assert FDCR(rule="robust-z", two_sided=True).select_flagged(t(1, 1, 1, 2, 3))[0] == []
    # cumulative: −3.5 (clipped) twice → −7/√2 < −3.5 after two rounds
    d = FDCR(rule="cumulative", two_sided=True)
    ids = [0, 1, 2, 3, 4]
    assert d.select_flagged(t(-100, 1, 2, 3, 4), ids)[0] == []
    top, info = d.select_flagged(t(-100, 1, 2, 3, 4), ids)
    assert top == [0] and info["cumulative_z"][0] == pytest.approx(-7 / math.sqrt(2))
    # the reason says which side: Example A′ has z = (0, −0.07, −0.67, 3.56, 3.06)
    agg = FDCR(rule="robust-z", two_sided=True, z_threshold=0.6).aggregate(round_input(5))
    assert agg.reasons == [None, None, "low_discrepancy", "high_discrepancy", "high_discrepancy"]
    with pytest.raises(DefenseConfigError, match="two_sided"):
        FDCR(two_sided=True)
    with pytest.raises(DefenseConfigError, match="two_sided"):
        FDCR(rule="robust-z", two_sided="yes")
