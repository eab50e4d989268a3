"""Per-client rows kept across rounds (SDFC's H_k and anchors, FoolsGold's history, RSA's models).

One tensor per client per round fragments the heap under client sampling: every round frees
the sampled clients' rows and allocates new ones between the round's short-lived buffers, and
the freed holes rarely fit again. In a churn of 100 of 1000 clients a round (P = 92 500, two
rows each), per-client tensors left the process at 1.59 GiB resident for 0.66 GiB of state after
30 rounds; the same state in fixed slots stayed at 0.96 GiB (``benchmarks/state_churn.py``,
docs/sampling.md §7). Rows therefore live in fixed-size chunks allocated once; a client keeps
its slot while it is held, a dropped client's slot is reused, and memory follows the number of
clients held, never K.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

CHUNK_BYTES = 8 * 2**20  # one allocation holds this much of rows (at least one row)
MAX_CHUNK_ROWS = 256


class ClientRows:
    """Rows of one width and dtype, one per client id, stored in chunks of fixed slots.

    The width and dtype are fixed by the first row stored. ``row(cid)`` is a view into the
    store: it changes when the client's row is replaced and must not be kept past that.
    """

    def __init__(self) -> None:
        self._chunks: list[Tensor] = []
        self._slot: dict[int, int] = {}
        self._free: list[int] = []
        self._chunk_rows = 0

    def __contains__(self, cid: object) -> bool:
        return cid in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._slot))

    @property
    def width(self) -> int | None:
        return self._chunks[0].shape[1] if self._chunks else None

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (not of the free slots)."""
        if not self._chunks:
            return 0
        c = self._chunks[0]
        return len(self._slot) * c.shape[1] * c.element_size()

    def row(self, cid: int) -> Tensor:
        """The stored row of ``cid`` (a view); KeyError when the client has none."""
        s = self._slot[cid]
        return self._chunks[s // self._chunk_rows][s % self._chunk_rows]

    def get(self, cid: int) -> Tensor | None:
        return self.row(cid) if cid in self._slot else None

    def set(self, cid: int, value: Tensor) -> Tensor:
        """Store a copy of the 1-D ``value`` as the row of ``cid`` (cast to the store's dtype)."""
        if value.dim() != 1:
            raise ValueError(f"a client row must be 1-D, got shape {tuple(value.shape)}")
        if self._chunks and value.numel() != self.width:
            raise ValueError(f"client {cid}: row of {value.numel()} values, the store holds "
                             f"rows of {self.width}")
        s = self._slot.get(cid)
        if s is None:
            s = self._slot[cid] = self._take_slot(value)
        out = self._chunks[s // self._chunk_rows][s % self._chunk_rows]
        out.copy_(value)
        return out

    def pop(self, cid: int) -> None:
        """Forget ``cid``'s row (nothing when it has none); its slot serves the next client."""
        s = self._slot.pop(cid, None)
        if s is not None:
            self._free.append(s)

    def _take_slot(self, like: Tensor) -> int:
        if not self._free:
            if not self._chunks:
                row_bytes = max(1, like.numel() * like.element_size())
                self._chunk_rows = max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // row_bytes))
                dtype = like.dtype
            else:
                dtype = self._chunks[0].dtype
            start = len(self._chunks) * self._chunk_rows
            self._chunks.append(torch.zeros(self._chunk_rows, like.numel(), dtype=dtype))
            # lowest slot first, so a short run fills one chunk before the next
            self._free.extend(range(start + self._chunk_rows - 1, start - 1, -1))
        return self._free.pop()
