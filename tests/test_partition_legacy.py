"""The `code` preset's partition: the released code's call order on NumPy's legacy global
generator (docs/protocol.md §3, issue 20); the `paper` partition stays as it was."""

import hashlib

import numpy as np
import pytest

from fisherguard import config
from fisherguard.data.partition import dirichlet, legacy_global_generator
from fisherguard.engine.federation import prepare

pytestmark = pytest.mark.unit


def release_order(labels, n_train, k, beta, seed, min_size):
    """The released routine as protocol.md §3 describes it, on the global np.random (a reference
    written from the text: seed, shuffle [N_tr, N), then per attempt and class shuffle + Dirichlet
    with the cap, then one shuffle per client list)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        np.random.shuffle(list(range(int(0.9 * n_train), n_train)))
        n, cap = len(labels), len(labels) / k
        while True:
            lists = [[] for _ in range(k)]
            for c in range(10):
                idx = [i for i in range(n) if labels[i] == c]
                np.random.shuffle(idx)
                p = np.random.dirichlet([beta] * k)
                p = np.array([pj * (len(lists[j]) < cap) for j, pj in enumerate(p)])
                p = p / p.sum()
                cuts = [int(x) for x in np.cumsum(p) * len(idx)][:-1]
                bounds = [0, *cuts, len(idx)]
                for j in range(k):
                    lists[j] += idx[bounds[j]:bounds[j + 1]]
            if min(len(x) for x in lists) >= min_size:
                break
        for x in lists:
            np.random.shuffle(x)
        return lists
    finally:
        np.random.set_state(state)


LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 1, 2])  # N_tr = 18 of N = 20

# Pinned: seed 0, K = 3, β = 0.5, m = 2 under the legacy call order.
PINNED = [[7, 8, 16, 10, 13], [4, 11, 6, 14, 9, 3, 0], [2, 1, 17, 12, 15, 5]]


def test_small_known_partition_is_pinned():
    part = dirichlet(LABELS, 3, 0.5, legacy_global_generator(0, 20), min_size=2)
    assert [ix.tolist() for ix in part.client_indices] == PINNED
    assert release_order(LABELS, 20, 3, 0.5, 0, 2) == PINNED
    # the named stream (paper) gives another partition for the same seed
    named = dirichlet(LABELS, 3, 0.5, np.random.default_rng(0), min_size=2)
    assert [ix.tolist() for ix in named.client_indices] != PINNED


@pytest.mark.parametrize("seed,beta", [(0, 0.5), (1, 0.3), (7, 1.0)])
def test_legacy_order_is_the_release_order(seed, beta):
    y = np.repeat(np.arange(10), 30)[np.random.default_rng(5).permutation(300)]
    part = dirichlet(y, 5, beta, legacy_global_generator(seed, 334), min_size=10)
    assert [ix.tolist() for ix in part.client_indices] == release_order(y, 334, 5, beta, seed, 10)


def test_the_global_generator_is_left_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    dirichlet(LABELS, 3, 0.5, legacy_global_generator(0, 20), min_size=2)
    assert np.array_equal(np.random.get_state()[1], before)


SYNTHETIC = {"experiment": {"seed": 3},
             "data": {"dataset": "synthetic", "synthetic_train": 1200, "synthetic_test": 200},
             "federation": {"clients": 5, "rounds": 2, "local_epochs": 1, "batch_size": 32},
             "attack": {"fraction": 0.4}, "server": {"val_size": 64}}


def data_digest(fed) -> str:
    h = hashlib.sha256()
    for c in fed.clients:
        h.update(c.labels.numpy().tobytes())
        h.update((c.images if c.images is not None else c.frozen).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def test_paper_partition_is_unchanged():
    """Pinned before issue 20's partition work: the paper preset's clients hold the same data."""
    cfg = config.resolve(SYNTHETIC)
    assert cfg.partition.stream == "named"
    fed = prepare(cfg)
    assert fed.partition_info["sizes"] == [231, 257, 251, 118, 223]
    assert data_digest(fed) == "2540be89aa3be78f"


def test_code_preset_partitions_in_the_release_order():
    raw = config.apply_overrides(SYNTHETIC, {"experiment.preset": "code"})
    cfg = config.resolve(raw)
    assert cfg.partition.stream == "legacy-global"
    fed = prepare(cfg)
    from fisherguard.data.datasets import load_raw

    n_train = 1200
    y = np.asarray(load_raw("synthetic", n_train=n_train, n_test=200).train_y,
                   dtype=np.int64)[:int(0.9 * n_train)]
    ref = release_order(y, n_train, 5, 0.5, 3, 10)
    assert fed.partition_info["sizes"] == [len(x) for x in ref]
    for k in (0, 1, 2):  # benign clients hold exactly the reference's samples, in its order
        assert fed.clients[k].labels.tolist() == y[ref[k]].tolist()
    assert fed.partition_info["sizes"] != [231, 257, 251, 118, 223]
