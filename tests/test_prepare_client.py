"""A deployment node's data: ``prepare(cfg, only=k)`` gives client k exactly the data the whole
federation's ``prepare(cfg)`` gives it (docs/flower.md §3.2), benign clients and attackers alike."""

from __future__ import annotations

import pytest
import torch

from attack_harness import attack_config
from fisherguard.engine.federation import prepare

pytestmark = pytest.mark.unit


def _same(a, b) -> None:
    """Two ClientDatasets hold the same tensors (labels, images, frozen, poisoned, trigger)."""
    assert a is not None and b is not None
    for name in ("labels", "images", "frozen", "poisoned"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.trigger is None) == (b.trigger is None)
    if a.trigger is not None:
        probe = torch.rand(2, a.frozen.shape[1] if a.frozen is not None else 3, 32, 32,
                           generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.trigger.apply(probe.clone()), b.trigger.apply(probe.clone()))


@pytest.mark.parametrize("attack, options", [
    ("badnets", None),  # frozen augmentation: the attacker's data is built once, stamped
    ("dba", None),  # the piece an attacker stamps depends on its rank among all attackers
    ("edge-case", {"tail": "held-out"}),  # images reserved before the partition
    ("label-flip", None),
])
def test_one_clients_prepare_equals_its_part_of_the_whole(attack, options):
    cfg = attack_config(attack, options, **{"data.synthetic_train": 900,
                                            "data.synthetic_test": 50})
    full = prepare(cfg)
    assert full.only is None and len(full.attackers) == 2
    benign = next(k for k in range(cfg.federation.clients) if k not in full.attackers)
    for k in [*full.attackers, benign]:
        one = prepare(cfg, only=k)
        assert one.only == k and one.attackers == full.attackers
        assert one.partition_info == full.partition_info
        _same(one.clients[k], full.clients[k])
        assert all(d is None for j, d in enumerate(one.clients) if j != k)
        assert sorted(one.clean) == ([k] if k in full.attackers else [])
        if k in full.attackers:
            _same(one.clean[k], full.clean[k])
        assert len(one.test_x) == 0 and len(one.server_images) == 0  # a node evaluates nothing
    with pytest.raises(ValueError, match="holds only its data"):
        one.datasets()
    with pytest.raises(ValueError, match="not among"):
        prepare(cfg, only=cfg.federation.clients)
