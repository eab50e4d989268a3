"""Issue 21: every defense's per-client suspicion score and its per-round detection AUC / AP."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fisherguard.defenses import registry
from fisherguard.defenses.base import SUSPICION, RoundInput
from fisherguard.metrics import (average_precision, detection, roc_auc, score_detection,
                                 summarize)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- AUC and AP by hand


def test_auc_counts_pairs_and_ties_half():
    # pairs (pos, neg): (.9,.8) win, (.9,.6) win, (.7,.8) loss, (.7,.6) win
    assert roc_auc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == 0.75
    # (1 vs 1) tie = 1/2, (1 vs 0) win: 1.5 / 2
    assert roc_auc([1.0, 1.0, 0.0], [True, False, False]) == 0.75
    assert roc_auc([2.0, 2.0, 2.0], [True, False, True]) == 0.5  # all tied
    assert roc_auc([0.0, 1.0], [True, False]) == 0.0  # the attacker has the lowest score
    assert roc_auc([float("inf"), 3.0, 1.0], [True, False, False]) == 1.0


def test_auc_and_ap_are_undefined_without_both_classes():
    for pos in ([True, True], [False, False], []):
        assert roc_auc([1.0, 2.0][:len(pos)], pos) is None
        assert average_precision([1.0, 2.0][:len(pos)], pos) is None


def test_average_precision_by_hand():
    # .9 (pos): R=.5, P=1; .8 (neg); .7 (pos): R=1, P=2/3  ->  .5·1 + .5·2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == \
        pytest.approx(0.5 + 1 / 3)
    # a tie enters as one threshold: R=1 at P=1/2
    assert average_precision([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.5)
    assert average_precision([3.0, 2.0, 1.0], [True, True, False]) == pytest.approx(1.0)
    assert average_precision([1.0, 2.0, 3.0], [True, False, False]) == pytest.approx(1 / 3)


def test_auc_and_ap_match_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, size=9).astype(float)  # many ties
        y = rng.random(9) < 0.4
        if y.all() or not y.any():
            continue
        assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


# --------------------------------------------------------------------------- the round's record


def test_score_detection_leaves_out_failed_clients_and_ranks_unscored_removals_first():
    ids, att = [0, 1, 2, 3, 4], [3, 4]
    flagged = [True, False, False, True, True]
    failed = [True, False, False, False, False]  # client 0 did not upload: out
    # attacker 3 was refused before scoring (None, flagged): ranked above everyone
    d = score_detection([None, 0.5, 2.0, None, 1.0], flagged, ids, att, failed)
    # judged: 1 (0.5), 2 (2.0), 3 (inf), 4 (1.0); pairs 3>1, 3>2, 4>1, 4<2 -> 3/4
    assert d["AUC"] == 0.75
    # inf (pos) P=1 R=.5; 2.0 (neg); 1.0 (pos) R=1 P=2/3
    assert d["AP"] == pytest.approx(0.5 + 1 / 3)
    # a kept client without a score: no ranking of the round
    assert score_detection([0.1, None, 2.0, 3.0, 1.0], flagged, ids, att, failed) == \
        {"AUC": None, "AP": None}
    # no score at all, or no attacker among the judged clients
    assert score_detection(None, flagged, ids, att, failed) == {"AUC": None, "AP": None}
    assert score_detection([1.0] * 5, flagged, ids, [0], failed) == {"AUC": None, "AP": None}


def test_detection_carries_auc_beside_tpr_and_summary_means_defined_rounds():
    d = detection([False, False, True], [0, 1, 2], attackers=[2], suspicion=[0.1, 0.2, 0.9])
    assert d["AUC"] == 1.0 and d["AP"] == 1.0 and d["TPR"] == 100.0
    assert detection([False, True], [0, 1], attackers=[1])["AUC"] is None  # no score given

    def rec(auc, ap):
        return {"metrics": {m: 1.0 for m in ("A", "R", "ASR", "V", "ASR_all", "q_max",
                                             "entropy")} | {"collapsed": False},
                "detection": {"TPR": None, "FPR": 0.0, "removed": 0, "AUC": auc, "AP": ap}}

    s = summarize([rec(1.0, 1.0), rec(None, None), rec(0.5, 0.25)])
    assert s["AUC"] == 0.75 and s["AP"] == 0.625 and s["AUC_rounds"] == 2
    old = rec(None, None)
    del old["detection"]["AUC"], old["detection"]["AP"]  # records from before issue 21
    s = summarize([old])
    assert s["AUC"] is None and s["AP"] is None and s["AUC_rounds"] == 0


# --------------------------------------------------------------------------- every defense


class _ServerData:
    """Deterministic stand-ins: a positive Fisher, a small training step, loss from the weights."""

    size = 32

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        return (torch.rand(weights.numel(), generator=g, dtype=torch.float64) + 0.1).to(weights.dtype)

    def train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:
        return weights + 0.01

    def loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:
        w = weights.to(torch.float64)
        return float(1.0 + w.abs().mean()), float(0.5 + 0.1 * w.abs().mean())


def _round(k: int = 6, p: int = 24) -> RoundInput:
    g = torch.Generator().manual_seed(0)
    upd = 0.1 * torch.randn(k, p, generator=g, dtype=torch.float64) + 0.1
    upd[-1] = -3.0 * upd[-1]  # one outlying upload
    fisher = torch.rand(k, p, generator=g, dtype=torch.float64) + 0.05
    return RoundInput(global_weights=torch.zeros(p, dtype=torch.float64), updates=upd,
                      num_samples=torch.full((k,), 50.0, dtype=torch.float64),
                      client_ids=list(range(k)), fisher=fisher, server_data=_ServerData(),
                      num_rounds=3)


@pytest.mark.parametrize("name", sorted(registry.available()))
def test_every_defense_reports_a_suspicion_list_or_says_it_has_none(name):
    cls = registry.get(name)
    d = registry.build(name)
    if cls.needs_attacker_ids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d.receive_attacker_ids([5])
    ri = _round()
    out = d.aggregate(ri)
    if cls.suspicion_score is None:
        assert SUSPICION not in out.diagnostics
        return
    assert isinstance(cls.suspicion_score, str) and cls.suspicion_score
    s = out.diagnostics[SUSPICION]
    assert isinstance(s, list) and len(s) == ri.num_clients
    assert all(v is None or isinstance(v, float) for v in s)
    assert any(v is not None for v in s)
    # a number per client that the defense did not remove before scoring
    for v, f in zip(s, out.flagged.tolist()):
        assert v is not None or f


def test_suspicion_signs_follow_each_defense_own_ranking():
    ri = _round()
    # FoolsGold and FLTrust report negated weight / cosine; SDFC its Fisher difference, whose
    # FDAgg weight falls as it grows; Krum and RFA distances as they are
    fg = registry.build("foolsgold").aggregate(ri).diagnostics
    assert fg[SUSPICION] == pytest.approx([-a for a in fg["foolsgold_weights"]])
    ft = registry.build("fltrust").aggregate(ri).diagnostics
    assert ft[SUSPICION] == pytest.approx([-c for c in ft["cosine"]])
    sd = registry.build("sdfc").aggregate(ri).diagnostics
    assert sd[SUSPICION] == sd["fisher_difference"]
    order_t = np.argsort(sd["fisher_difference"])
    assert np.all(np.diff(np.asarray(sd["weight"])[order_t]) <= 1e-15)
    kr = registry.build("krum").aggregate(ri).diagnostics
    assert kr[SUSPICION] == kr["krum_scores"] and int(np.argmax(kr[SUSPICION])) == 5
    fd = registry.build("fdcr").aggregate(ri).diagnostics
    assert fd[SUSPICION] == fd["discrepancy"]


def test_table_shows_auc_when_summaries_carry_it():
    from fisherguard.results import aggregate_seeds, format_table, pivot

    base = {"label": "m", "defense": "fdcr", "attack": "badnets", "R": 0.0, "ASR": 1.0,
            "V": 1.0, "TPR": None, "FPR": 0.0, "collapsed": False, "wall_time_s": 1.0}
    runs = [{**base, "seed": s, "A": 1.0, "AUC": a} for s, a in ((0, 0.5), (1, 1.0), (2, None))]
    rows = aggregate_seeds(runs)
    assert rows[0]["AUC"] == "0.75 ± 0.35"
    assert " AUC " in format_table(rows).splitlines()[0]
    old = aggregate_seeds([{**base, "seed": 0, "A": 1.0}])  # a summary from before issue 21
    assert "AUC" not in old[0] and "AUC" not in format_table(old)
    text = pivot(runs, metrics=("A", "AUC"))
    assert "fdcr AUC" in text.splitlines()[0] and "0.75" in text.splitlines()[2]
