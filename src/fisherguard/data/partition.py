"""Client pool / validation split and the Dirichlet label-skew partition (docs/protocol.md §2–§3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PartitionError(ValueError):
    """The partition cannot be built with these settings."""


@dataclass
class Split:
    """Indices into the official training set."""

    client_pool: np.ndarray  # [0, N_tr) in file order
    validation_pool: np.ndarray  # [N_tr, N)
    server_set: np.ndarray  # U, a subset of the validation pool


def train_validation_split(n_train: int, *, val_size: int | None, rng: np.random.Generator) -> Split:
    """Tail 10 % of the training file is the validation pool P; U = ``val_size`` drawn from P.

    ``val_size=None`` takes all of P (the release's behaviour, docs/protocol.md §2 `code`).
    """
    n_tr = int(0.9 * n_train)
    pool = np.arange(n_tr)
    val = np.arange(n_tr, n_train)
    if val_size is None:
        u = val.copy()
    else:
        if val_size > len(val):
            raise PartitionError(f"val_size {val_size} exceeds the validation pool ({len(val)} images)")
        u = np.sort(rng.choice(val, size=val_size, replace=False))
    return Split(pool, val, u)


@dataclass
class Partition:
    client_indices: list[np.ndarray]  # per client, indices into the labels given to ``dirichlet``
    attempts: int

    def class_counts(self, labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
        """K×C matrix of per-client class counts."""
        return np.stack([np.bincount(labels[ix], minlength=num_classes) for ix in self.client_indices])

    @property
    def sizes(self) -> list[int]:
        return [len(ix) for ix in self.client_indices]


def legacy_global_generator(seed: int, n_train: int) -> np.random.RandomState:
    """NumPy's legacy generator as the released code leaves it for the partition
    (docs/protocol.md §3, `code`): seeded with the run seed, then one shuffle of the index list
    [N_tr, …, N−1].

    A ``RandomState(seed)`` draws exactly what the global ``np.random`` does after
    ``np.random.seed(seed)``, without touching the process's global state.
    """
    rs = np.random.RandomState(int(seed))
    rs.shuffle(np.arange(int(0.9 * n_train), n_train))
    return rs


def dirichlet(labels: np.ndarray, num_clients: int, beta: float,
              rng: np.random.Generator | np.random.RandomState, *,
              min_size: int = 10, num_classes: int = 10, max_attempts: int = 1000) -> Partition:
    """Dirichlet(β) label skew with the releases' retry rule and per-client cap (docs/protocol.md §3).

    ``beta == 0`` means IID: each shuffled class split into K nearly equal parts. ``rng`` is the
    partition's named stream, or (``code``) the legacy generator of ``legacy_global_generator``:
    both are used in the releases' call order (per attempt and class a shuffle, then the Dirichlet
    draw; then one shuffle per client list).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise PartitionError(f"clients must be >= 1, got {num_clients}")
    if beta < 0:
        raise PartitionError(f"beta must be >= 0 (0 = iid), got {beta}")
    if n < num_clients * min_size:
        raise PartitionError(f"{n} samples cannot give {num_clients} clients {min_size} samples each")
    cap = n / num_clients
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for attempt in range(1, max_attempts + 1):
        lists: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in range(num_classes):
            idx = by_class[c].copy()
            rng.shuffle(idx)
            if beta == 0:
                pieces = np.array_split(idx, num_clients)
            else:
                p = rng.dirichlet(np.full(num_clients, beta))
                p = np.where(sizes < cap, p, 0.0)
                if p.sum() == 0:  # every client is at the cap: share this class evenly
                    p = np.full(num_clients, 1.0 / num_clients)
                p = p / p.sum()
                cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
                pieces = np.split(idx, cuts)
            for k, piece in enumerate(pieces):
                lists[k].append(piece)
                sizes[k] += len(piece)
        if sizes.min() >= min_size:
            out = []
            for k in range(num_clients):
                ix = np.concatenate(lists[k]) if lists[k] else np.empty(0, dtype=np.int64)
                rng.shuffle(ix)
                out.append(ix.astype(np.int64))
            return Partition(out, attempt)
    raise PartitionError(f"no Dirichlet(β={beta}) partition gave every one of {num_clients} clients "
                         f"{min_size} samples in {max_attempts} attempts; raise beta or lower clients")
