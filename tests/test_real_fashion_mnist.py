"""Smoke test on the real Fashion-MNIST that `make test` fetches before the suite starts."""

import numpy as np
import pytest

from fisherguard import config
from fisherguard.data.datasets import load_raw
from fisherguard.data.errors import DatasetMissingError
from fisherguard.engine.federation import prepare
from fisherguard.engine.runner import run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fmnist():
    try:
        return load_raw("fashion-mnist")
    except DatasetMissingError as e:
        pytest.fail(f"real Fashion-MNIST is missing; `make test` fetches it first "
                    f"(or run `fisherguard data fetch fashion-mnist`): {e}")


def test_real_files_have_the_published_shape_and_counts(fmnist):
    assert fmnist.train_x.shape == (60000, 28, 28) and fmnist.test_x.shape == (10000, 28, 28)
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert np.bincount(fmnist.test_y).tolist() == [1000] * 10
    assert abs(fmnist.train_x.mean() / 255 - 0.2860) < 1e-3


def test_protocol_split_and_short_federation_on_real_data(fmnist, tmp_path):
    cfg = config.resolve({"data": {"dataset": "fashion-mnist", "train_subset": 3000, "test_subset": 1000},
                          "federation": {"clients": 4, "rounds": 1, "local_epochs": 1}})
    fed = prepare(cfg)
    assert sum(len(c) for c in fed.clients) == 3000
    assert fed.attackers == [3]
    assert fed.partition_info["server_set_size"] == 256
    assert fed.test_x.shape == (1000, 1, 32, 32)
    x, y = fed.clients[0].fisher_data()
    assert x.shape[1:] == (3, 32, 32)
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)  # background after normalisation
    s = run(cfg, tmp_path / "run", progress=None)
    assert s["complete"] and 0 <= s["A"] <= 100
