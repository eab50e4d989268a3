"""Per-client rows across rounds: fixed slots, reused when a client is dropped, bytes = rows held."""

import pytest
import torch

from fisherguard.defenses import client_rows
from fisherguard.defenses.client_rows import ClientRows

pytestmark = pytest.mark.unit


def test_a_row_is_a_copy_and_replacing_it_keeps_the_slot():
    store = ClientRows()
    x = torch.arange(4.0)
    store.set(7, x)
    x += 100  # the caller's tensor is not the stored row
    assert torch.equal(store.row(7), torch.arange(4.0))
    view = store.row(7)
    store.set(7, torch.ones(4))
    assert torch.equal(view, torch.ones(4))  # same slot, overwritten in place
    assert len(store) == 1 and store.nbytes == 4 * 4


def test_the_first_row_fixes_dtype_and_width():
    store = ClientRows()
    store.set(0, torch.zeros(3, dtype=torch.float64))
    store.set(1, torch.ones(3, dtype=torch.float32))
    assert store.row(1).dtype == torch.float64 and store.nbytes == 2 * 3 * 8
    with pytest.raises(ValueError, match="rows of 3"):
        store.set(2, torch.zeros(5))
    with pytest.raises(ValueError, match="1-D"):
        store.set(2, torch.zeros(1, 3))


def test_dropped_clients_free_their_slots_for_new_ones(monkeypatch):
    monkeypatch.setattr(client_rows, "CHUNK_BYTES", 4 * 10 * 4)  # four rows of ten floats a chunk
    store = ClientRows()
    for cid in range(8):
        store.set(cid, torch.full((10,), float(cid)))
    assert len(store._chunks) == 2
    for cid in range(0, 8, 2):
        store.pop(cid)
    store.pop(99)  # a client without a row: nothing happens
    for cid in range(100, 104):  # new clients take the freed slots: no new chunk
        store.set(cid, torch.full((10,), float(cid)))
    assert len(store._chunks) == 2 and len(store) == 8
    assert list(store) == [1, 3, 5, 7, 100, 101, 102, 103]
    assert all(float(store.row(c)[0]) == c for c in store)
    assert store.get(0) is None and 0 not in store


def test_memory_follows_the_clients_held_not_the_ids():
    store = ClientRows()
    for r in range(50):  # 50 rounds, two clients each with ids up to 10**6, one dropped a round
        store.set(r * 20_000, torch.zeros(1000))
        store.set(r * 20_000 + 1, torch.zeros(1000))
        store.pop(r * 20_000)
    assert len(store) == 50 and store.nbytes == 50 * 1000 * 4
    assert sum(c.numel() for c in store._chunks) * 4 <= store.nbytes + client_rows.CHUNK_BYTES
