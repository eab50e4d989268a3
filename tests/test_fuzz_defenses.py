"""Hostile rounds never break a defense's ``aggregate`` (issue 19; strategy in fuzz_defenses.py).

``make test`` runs a small sample (``FUZZ_EXAMPLES``, default 10 per defense, derandomized so CI
sees the same cases every time); ``make fuzz`` runs >= 1,000 per defense with a table.
"""

from __future__ import annotations

import pytest
import torch

import fuzz_defenses as fz
from fisherguard.defenses import registry
from fisherguard.defenses.base import RoundInput
from fisherguard.defenses.mma import mahalanobis_scores

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", fz.NAMES)
def test_hostile_rounds(name: str) -> None:
    stats = fz.fuzz(name, fz.default_examples())
    assert stats.cases >= fz.default_examples() and stats.failures == 0


# ------------------------------------------------------------------ what the fuzzing found


def test_counts_shorter_than_the_round_are_no_samples() -> None:
    """A count vector with fewer entries than clients (found by fuzzing: FedAvg indexed it by
    client and crashed); the clients without a count get ``no_samples``."""
    ri = RoundInput(global_weights=torch.zeros(3), updates=torch.ones(4, 3) * 0.1,
                    num_samples=torch.tensor([10.0, 30.0], dtype=torch.float64),
                    client_ids=[0, 1, 2, 3])
    for name in ("fedavg", "median", "krum"):
        out = registry.build(name, {}).aggregate(ri)
        assert out.reasons[2:] == ["no_samples", "no_samples"], name
        assert out.client_weights[2:].tolist() == [0.0, 0.0], name
    out = registry.build("fedavg", {}).aggregate(ri)
    assert out.client_weights.tolist() == [0.25, 0.75, 0.0, 0.0]


def test_mma_survives_finite_but_huge_uploads() -> None:
    """Found by fuzzing: one finite upload of 1e300 overflowed MMA's norm and L1 features, and
    ``svdvals`` raised on the non-finite covariance."""
    x = torch.zeros(3, 10, dtype=torch.float64)
    x[2, 0] = 1e300
    ri = RoundInput(global_weights=torch.zeros(10, dtype=torch.float64), updates=x,
                    num_samples=torch.ones(3, dtype=torch.float64), client_ids=[0, 1, 2])
    out = registry.build("mma", {}).aggregate(ri)
    assert bool(torch.isfinite(out.new_weights).all())
    assert float(out.client_weights.sum()) == 1.0
    # a non-finite covariance is singular, not an exception
    scores, singular = mahalanobis_scores(torch.tensor([[1.0, float("inf"), 0.0],
                                                        [2.0, 1.0, 0.0],
                                                        [0.0, 3.0, 1.0]], dtype=torch.float64))
    assert singular and scores.shape == (3,)


def test_a_result_beyond_the_models_dtype_keeps_the_global_model() -> None:
    """Found by fuzzing: FDCR scales a lone, valid float32 update of 3e38 by an importance above
    1; the float64 result was finite, the float32 model inf. ``finish`` checks after the cast."""
    upd = torch.zeros(1, 6)
    upd[0, 1] = 3.0e38
    ri = RoundInput(global_weights=torch.zeros(6), updates=upd,
                    num_samples=torch.ones(1, dtype=torch.float64), client_ids=[0],
                    fisher=torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0, 1.0]]))
    out = registry.build("fdcr", {"preset": "paper"}).aggregate(ri)
    assert bool(torch.isfinite(out.new_weights).all()) and out.new_weights.dtype == torch.float32
    assert out.status == "non_finite_result" and torch.equal(out.new_weights, ri.global_weights)


def test_rfa_measures_distances_of_huge_uploads() -> None:
    """Found by fuzzing: one finite upload of 1e300 made every ‖x_k − z‖ overflow to inf and the
    Weiszfeld weights 0/0 = NaN."""
    x = torch.zeros(5, 10, dtype=torch.float64)
    x[0, 9], x[1, 9], x[3, 9], x[4, 9] = 1.0, -1.0, 1.0, 1e300
    ri = RoundInput(global_weights=torch.zeros(10, dtype=torch.float64), updates=x,
                    num_samples=torch.ones(5, dtype=torch.float64), client_ids=list(range(5)))
    out = registry.build("rfa", {}).aggregate(ri)
    assert bool(torch.isfinite(out.client_weights).all())
    assert abs(float(out.client_weights.sum()) - 1.0) < 1e-12
    assert bool(torch.isfinite(out.new_weights).all())
    # the huge upload weighs least: the geometric median moves towards the other four
    assert float(out.client_weights[4]) == float(out.client_weights.min())
