"""Refactoring guard: fixed-seed runs give the stored final weights, bit for bit (in-process).

The digests were taken before the engine's round was unified (``regression_digests.py``); a
change that claims not to change results must leave them as they are. They hold for one torch
thread on the x86-64 machines of this project (another CPU's kernels may round differently:
regenerate with ``python tests/regression_digests.py`` there and compare with a second run).
"""

import pytest

from regression_digests import SYNTHETIC, digest, final_weights

pytestmark = pytest.mark.integration

STORED = {
    "fedavg": "f344bc17d5d46ed6",
    "fdcr": "d480b3d1cc338397",
    "sdfc": "485a8a22d9a65816",
    "multi-krum": "5b1a095cb1d91f06",
}


@pytest.mark.parametrize("defense", sorted(STORED))
def test_final_weights_are_the_stored_ones(tmp_path, defense):
    assert digest(final_weights(SYNTHETIC, defense, tmp_path)) == STORED[defense]
