"""Client sampling: which of the K clients take part in a round (issue 18).

``federation.fraction`` (or ``federation.clients_per_round``) sets how many clients m the server
samples each round; the default, every client every round, draws nothing and is the behaviour of
every run made before sampling existed. A sampled round's clients are drawn without replacement
from the named stream ``("client-sampling", round)`` of the run seed, so the sequence does not
depend on anything else the run draws, and a resumed run draws the same clients with no saved
generator state. Attackers are sampled like everyone else unless ``federation.attackers_always``
keeps the worst case: every attacker in every round, the rest of the m places drawn from the
benign clients.

Rules that need an attacker count f are given the count expected among the m sampled clients:
round(m · A / K) for A attackers among K (the hypergeometric mean; A itself when m = K), or
A when every attacker is present (the config refuses ``attackers_always`` with A ≥ m).
"""

from __future__ import annotations

from typing import Sequence

from fisherguard.seeding import numpy_stream

STREAM = "client-sampling"


def sampled_count(clients: int, fraction: float = 1.0, clients_per_round: int | None = None) -> int:
    """m, the number of clients a round samples: ``clients_per_round`` when set, else
    round(fraction · K), at least 2 (no fewer than the two a federation needs) and at most K."""
    if clients_per_round is not None:
        m = int(clients_per_round)
    else:
        m = int(round(float(fraction) * clients))
    return max(min(2, clients), min(m, clients))


def expected_attackers(clients: int, attackers: int, sampled: int, *,
                       attackers_always: bool = False) -> int:
    """f for the rules that need one: the attackers expected among ``sampled`` of ``clients``."""
    if attackers_always:
        return min(attackers, sampled)
    if sampled >= clients:
        return attackers
    return int(round(sampled * attackers / clients))


def sample_clients(seed: int, round_idx: int, clients: int, sampled: int,
                   attackers: Sequence[int] = (), *, attackers_always: bool = False) -> list[int]:
    """The sorted ids of round ``round_idx``'s clients (all K, without a draw, when m = K)."""
    if sampled >= clients:
        return list(range(clients))
    rng = numpy_stream(seed, STREAM, round_idx)
    if attackers_always:
        fixed = sorted(set(int(a) for a in attackers))
        pool = [k for k in range(clients) if k not in set(fixed)]
        rest = sampled - len(fixed)
        if rest <= 0:
            raise ValueError(f"attackers_always: {len(fixed)} attackers fill the {sampled} places")
        drawn = rng.choice(len(pool), size=rest, replace=False)
        return sorted(fixed + [pool[int(i)] for i in drawn])
    return sorted(int(i) for i in rng.choice(clients, size=sampled, replace=False))
