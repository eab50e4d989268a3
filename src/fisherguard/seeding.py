"""Named random streams derived from the run seed (docs/protocol.md §7.5).

Every consumer (partition, U sampling, poisoning, model init, each client's batches in each round,
a defense's own randomness) gets an independent stream from (seed, name, ...), so the order in
which they are used cannot change results and a resumed run needs no saved generator state.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(part: object) -> int:
    return zlib.crc32(str(part).encode()) if not isinstance(part, int) else part


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for the stream ``names`` of run ``seed``."""
    ss = np.random.SeedSequence([int(seed), *(_key(n) for n in names)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_stream(seed: int, *names: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(seed, *names)))


def torch_stream(seed: int, *names: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *names))
    return g
