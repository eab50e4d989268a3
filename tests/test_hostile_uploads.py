"""Hostile uploads never crash a defense and never produce a non-finite model (docs/algorithms.md §8.1)."""

import pytest
import torch

from fisherguard.defenses import registry
from fisherguard.defenses.base import RoundInput, validate_uploads

pytestmark = pytest.mark.unit


def _ri(**kw):
    base = dict(global_weights=torch.zeros(4), updates=torch.randn(4, 4) * 0.01,
                num_samples=torch.tensor([10.0, 20.0, 30.0, 40.0]), client_ids=[0, 1, 2, 3])
    base.update(kw)
    return RoundInput(**base)


def test_absurd_sample_counts_are_rejected_not_overflowed():
    ri = _ri(num_samples=torch.tensor([1e308, 1e308, 5.0, 5.0], dtype=torch.float64))
    assert validate_uploads(ri) == ["no_samples", "no_samples", None, None]
    out = registry.build("fedavg").aggregate(ri)
    assert torch.isfinite(out.new_weights).all() and out.client_weights.tolist() == [0, 0, 0.5, 0.5]


def test_update_that_overflows_the_models_dtype_is_non_finite():
    upd = torch.zeros(4, 4, dtype=torch.float64)
    upd[1, 0] = 1e300  # finite in float64, inf once added to float32 weights
    ri = _ri(updates=upd)
    assert validate_uploads(ri)[1] == "non_finite"
    out = registry.build("fedavg").aggregate(ri)
    assert torch.isfinite(out.new_weights).all() and out.reasons[1] == "non_finite"


def test_from_uploads_marks_malformed_rows():
    rows = [torch.zeros(4), "abc", [[1.0, 2.0], [3.0]], {"a": 1}, torch.zeros(3)]
    ri = RoundInput.from_uploads(torch.zeros(4), rows, [1, 1, 1, 1, 10 ** 400], list(range(5)))
    assert validate_uploads(ri) == [None, "bad_shape", "bad_shape", "bad_shape", "bad_shape"]
    ri = RoundInput.from_uploads(torch.zeros(4), [torch.zeros(4)] * 2, [1, 10 ** 400], [0, 1])
    assert validate_uploads(ri) == [None, "no_samples"]


def test_every_defense_survives_the_overflow_cases():
    for name, cls in registry.available().items():
        if cls.needs_server_data or cls.needs_attacker_ids:
            continue  # covered with a fake server set in their own tests
        d = registry.build(name, {})
        fisher = torch.rand(4, 4) + 0.1 if cls.needs_fisher else None
        for ri in (_ri(num_samples=torch.tensor([1e308, 1e308, 5.0, 5.0], dtype=torch.float64), fisher=fisher),
                   _ri(updates=torch.full((4, 4), 1e300, dtype=torch.float64), fisher=fisher)):
            out = d.aggregate(ri)
            assert torch.isfinite(out.new_weights).all(), name


def test_a_diverged_client_without_fisher_is_non_finite_not_missing():
    """A client whose training diverged replies with NaN weights and no Fisher (SDFC clean runs
    showed it): a failure of that client, named non_finite, never a missing reply."""
    from fisherguard.defenses.base import RoundInput

    w = torch.zeros(4)
    rows = [torch.ones(4), torch.full((4,), float("nan")), None]
    ri = RoundInput.from_uploads(w, rows, [10, 10, 10], [0, 1, 2],
                                 fisher=[torch.ones(4), None, None])
    assert ri.pre_reasons == [None, "non_finite", "bad_shape"]
