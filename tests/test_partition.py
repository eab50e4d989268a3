import numpy as np
import pytest

from fisherguard.data.partition import (PartitionError, dirichlet,
                                        train_validation_split)

pytestmark = pytest.mark.unit


def labels(n_per_class=300, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


def test_every_index_exactly_once_and_min_size():
    y = labels()
    part = dirichlet(y, 10, 0.5, np.random.default_rng(0), min_size=10)
    allix = np.concatenate(part.client_indices)
    assert sorted(allix.tolist()) == list(range(len(y)))
    assert min(part.sizes) >= 10
    assert part.class_counts(y).sum() == len(y)


def test_seed_reproducible_and_different_seeds_differ():
    y = labels()
    a = dirichlet(y, 10, 0.5, np.random.default_rng(1))
    b = dirichlet(y, 10, 0.5, np.random.default_rng(1))
    c = dirichlet(y, 10, 0.5, np.random.default_rng(2))
    assert all(np.array_equal(x, z) for x, z in zip(a.client_indices, b.client_indices))
    assert not all(np.array_equal(x, z) for x, z in zip(a.client_indices, c.client_indices))


def _skew(y, beta, seed):
    counts = dirichlet(y, 10, beta, np.random.default_rng(seed)).class_counts(y).astype(float)
    share = counts / counts.sum(1, keepdims=True)
    return float(share.max(1).mean())  # mean dominant-class share per client


def test_smaller_beta_gives_more_label_skew():
    y = labels(600)
    low = np.mean([_skew(y, 0.1, s) for s in range(5)])
    high = np.mean([_skew(y, 10.0, s) for s in range(5)])
    iid = _skew(y, 0.0, 0)
    assert low > high > iid - 1e-9
    assert iid == pytest.approx(0.1, abs=0.01)


def test_iid_is_nearly_equal():
    y = labels()
    part = dirichlet(y, 10, 0.0, np.random.default_rng(0))
    assert max(part.sizes) - min(part.sizes) <= 10


def test_impossible_partition_is_a_clear_error():
    with pytest.raises(PartitionError, match="cannot give"):
        dirichlet(labels(1), 10, 0.5, np.random.default_rng(0), min_size=10)
    with pytest.raises(PartitionError, match="beta"):
        dirichlet(labels(), 10, -1.0, np.random.default_rng(0))


def test_validation_split_is_file_tail_and_u_inside_it():
    s = train_validation_split(60000, val_size=256, rng=np.random.default_rng(0))
    assert len(s.client_pool) == 54000 and s.client_pool[-1] == 53999
    assert s.validation_pool[0] == 54000 and len(s.validation_pool) == 6000
    assert len(s.server_set) == 256 == len(set(s.server_set.tolist()))
    assert set(s.server_set.tolist()) <= set(s.validation_pool.tolist())
    whole = train_validation_split(7291, val_size=None, rng=np.random.default_rng(0))
    assert len(whole.client_pool) == 6561 and len(whole.server_set) == 730
    with pytest.raises(PartitionError):
        train_validation_split(100, val_size=50, rng=np.random.default_rng(0))
