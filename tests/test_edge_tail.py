"""The edge-case held-out tail (docs/attacks.md §3.6): reserved before the partition, held by no
client, the attackers' part poisons their data, the test part is scored as ASR_edge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attack_harness import attack_config, run_attack
from fisherguard import metrics
from fisherguard.attacks.base import AttackConfigError, AttackContext
from fisherguard.attacks.edgecase import EdgeCase, reference_confidence
from fisherguard.attacks.plan import AttackPlan
from fisherguard.clients.training import ClientDataset
from fisherguard.data.transforms import Pipeline
from fisherguard.engine.federation import prepare

pytestmark = pytest.mark.unit


def _pool_data(n: int = 1200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    # class-dependent brightness plus noise, so the reference model has something to learn
    base = (labels.float() * 20).view(-1, 1, 1, 1)
    noise = torch.randint(0, 60, (n, 1, 32, 32), generator=g).float()
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    pool = np.random.default_rng(seed).permutation(n)[: n - 100]  # 100 images are the server's
    return images, labels.numpy(), pool


def _bytes(images: torch.Tensor) -> set[bytes]:
    return {bytes(t.numpy().tobytes()) for t in images}


@pytest.mark.parametrize("selection", ["confidence", "random"])
def test_reserve_takes_the_source_tail_of_the_pool_seeded_and_split(selection):
    images, labels, pool = _pool_data()
    attack = EdgeCase(source_class=7, target=2, tail_fraction=0.1, selection=selection)
    r = attack.reserve(images, labels, pool, seed=0)
    src = pool[labels[pool] == 7]
    k = round(0.1 * len(src))
    assert len(r.indices) == k and set(r.indices) <= set(src.tolist())
    assert len(r.attacker_labels) + len(r.test_images) == k
    assert len(r.test_images) == round(0.5 * k) and r.target == 2
    assert bool((r.attacker_labels == 2).all())
    # the two parts are the tail, disjoint
    tail = _bytes(images[torch.from_numpy(r.indices)])
    att, test = _bytes(r.attacker_images), _bytes(r.test_images)
    assert att | test == tail and not att & test
    again = attack.reserve(images, labels, pool, seed=0)  # seeded
    assert np.array_equal(again.indices, r.indices)
    assert torch.equal(again.test_images, r.test_images)
    assert torch.equal(again.attacker_images, r.attacker_images)
    other = attack.reserve(images, labels, pool, seed=1)
    assert np.array_equal(other.indices, r.indices) == (selection == "confidence")
    if selection == "confidence":  # the least confident source images under the reference model
        score = reference_confidence(images[torch.from_numpy(pool)], torch.from_numpy(labels[pool]))
        pos = {int(i): j for j, i in enumerate(pool)}
        chosen = score[[pos[int(i)] for i in r.indices]]
        rest = score[[pos[int(i)] for i in src if i not in set(r.indices.tolist())]]
        assert float(chosen.max()) <= float(rest.min())


def test_reference_model_learns_and_is_deterministic():
    images, labels, pool = _pool_data()
    x, y = images[torch.from_numpy(pool)], torch.from_numpy(labels[pool])
    score = reference_confidence(x, y)
    assert torch.equal(score, reference_confidence(x, y))
    assert float(score.mean()) > 0.3  # far above chance (0.1) on the separable toy data


def test_own_tail_reserves_nothing_and_one_stage_may_reserve():
    images, labels, pool = _pool_data()
    assert EdgeCase(tail="own").reserve(images, labels, pool, seed=0) is None
    plan = AttackPlan([EdgeCase(), EdgeCase(tail="own")])
    assert plan.reserve(images, labels, pool, seed=0) is not None
    with pytest.raises(AttackConfigError, match="only one attack stage may reserve"):
        AttackPlan([EdgeCase(), EdgeCase()]).reserve(images, labels, pool, seed=0)


def test_poison_mixes_p_edge_reserved_tail_with_own_clean_data():
    images, labels, pool = _pool_data()
    attack = EdgeCase(source_class=7, target=2, p_edge=0.5)
    r = attack.reserve(images, labels, pool, seed=0)
    pipe = Pipeline(grey=True, out_channels=3)
    extra = ClientDataset(labels=r.attacker_labels, pipeline=pipe, images=r.attacker_images)
    attack.bind(AttackContext(num_clients=10, attackers=[9], seed=0, target=2, extra_data=extra))
    own = ClientDataset(labels=torch.from_numpy(labels[pool[:300]]), pipeline=pipe,
                        images=images[torch.from_numpy(pool[:300])])
    data = attack.poison(9, own, seed=0)
    assert len(data) == 300 and int(data.poisoned.sum()) == 150
    assert bool((data.labels[data.poisoned] == 2).all())
    assert _bytes(data.images[data.poisoned]) <= _bytes(r.attacker_images)
    assert _bytes(data.images[~data.poisoned]) <= _bytes(own.images)
    again = attack.poison(9, own, seed=0)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    # no reserved tail (e.g. no source images in the pool): the attacker trains on clean data
    attack.bind(AttackContext(num_clients=10, attackers=[9], seed=0, target=2))
    assert attack.poison(9, own, seed=0) is own


def test_summary_has_no_edge_asr_without_a_tail():
    rec = {"metrics": {"A": 1.0, "R": 1.0, "ASR": 1.0, "V": 1.0, "ASR_all": 1.0, "q_max": 0.1,
                       "entropy": 1.0, "collapsed": False},
           "detection": {"TPR": None, "FPR": 0.0, "removed": 0}}
    assert metrics.summarize([rec])["ASR_edge"] is None
    tail = {**rec, "metrics": {**rec["metrics"], "ASR_edge": 40.0}}
    assert metrics.summarize([rec, tail, tail])["ASR_edge"] == 40.0
    assert metrics.edge_asr(np.array([2, 2, 1, 0]), 2) == 50.0


@pytest.mark.integration
def test_prepare_holds_the_tail_out_of_every_client():
    fed = prepare(attack_config("edge-case"))
    info = fed.partition_info["held_out"]
    assert fed.tail_test is not None and len(fed.tail_test) == info["test"] > 0
    assert fed.tail_target == 2 and fed.tail_test.dtype == torch.uint8
    assert fed.tail_test.shape[1:] == fed.test_x.shape[1:]
    test = _bytes(fed.tail_test)
    att = _bytes(fed.attack.ctx.extra_data.images)
    assert len(att) == info["attackers"] and not att & test
    for k, d in enumerate(fed.clients):
        own = fed.clean.get(k, d)  # an attacker's own (unpoisoned) data
        assert not _bytes(own.images) & (test | att), f"client {k} holds a tail image"
        if k not in fed.attackers:
            assert not _bytes(d.images) & (test | att)
    for k in fed.attackers:
        d = fed.clients[k]
        assert int(d.poisoned.sum()) > 0 and bool((d.labels[d.poisoned] == 2).all())
        assert _bytes(d.images[d.poisoned]) <= att
    assert sum(fed.partition_info["sizes"]) == fed.partition_info["client_pool"]


@pytest.mark.integration
def test_badnets_run_has_no_edge_asr(tmp_path):
    summary, rounds, _ = run_attack(tmp_path, "badnets", None, **{"federation.rounds": 1})
    assert all("ASR_edge" not in r["metrics"] for r in rounds)
    assert summary["ASR_edge"] is None
