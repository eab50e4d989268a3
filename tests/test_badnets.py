import numpy as np
import pytest
import torch

from fisherguard.attacks.badnets import poison_draw, stamp, trigger_mask

pytestmark = pytest.mark.unit


def test_trigger_pixels_are_exact_fdcr_family():
    m = trigger_mask(3, "fdcr")
    assert m.sum() == 36
    for c in range(3):
        rows, cols = torch.nonzero(m[c], as_tuple=True)
        assert sorted(set(rows.tolist())) == [0, 2]
        assert sorted(set(cols.tolist())) == [0, 1, 2, 4, 5, 6]
    assert not m[:, 1, :].any() and not m[:, :, 3].any() and not m[:, 3:, :].any()


def test_sdfc_family_stamps_channel_zero_only():
    m = trigger_mask(3, "sdfc")
    assert m.sum() == 12 and m[0].sum() == 12 and not m[1:].any()


def test_stamp_overwrites_with_one_after_normalisation_and_leaves_rest():
    x = torch.randn(4, 3, 32, 32)
    m = trigger_mask(3, "fdcr")
    y = stamp(x, m)
    assert torch.all(y[:, m] == 1.0)
    assert torch.equal(y[:, ~m], x[:, ~m])
    assert y[0, 0, 0, 3] == x[0, 0, 0, 3]  # the gap column stays


def test_poison_draw_about_half_and_seeded():
    a = poison_draw(10000, np.random.default_rng(0))
    b = poison_draw(10000, np.random.default_rng(0))
    assert np.array_equal(a, b)
    assert 0.47 < a.mean() < 0.53
