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


# How a defense's own randomness is seeded (config ``experiment.streams``, docs/protocol.md §7.5):
# ``named`` derives one stream per consumer from (run seed, "defense", consumer name), so two
# defenses (or two consumers in one) never draw the same sequence; ``shared`` is the behaviour
# before issue 20, where every defense seeded its generator with the bare run seed. Kept only so
# that runs started before the change can be resumed and committed results re-run as they were.
STREAMS = ("named", "shared")

# The consumers that draw randomness inside a defense, one stream name each.
DEFENSE_STREAMS = {
    "dnc": "dnc-coordinates",
    "crfl": "crfl-noise",
    "foolsgold": "foolsgold-order",
    "rlr": "rlr-order",
    "fdcr-kmeans": "fdcr-kmeans-init",
    "fdcr-oracle": "fdcr-oracle-noise",
}


def defense_seed(seed: int, consumer: str, streams: str = "named") -> int:
    """The seed of a defense consumer's stream: derived from (seed, consumer) unless ``shared``."""
    if streams not in STREAMS:
        raise ValueError(f"streams must be one of {', '.join(STREAMS)}, got {streams!r}")
    if streams == "shared":
        return int(seed)
    return derive_seed(seed, "defense", DEFENSE_STREAMS[consumer])


def defense_generator(seed: int, consumer: str, streams: str = "named") -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(defense_seed(seed, consumer, streams))
    return g
