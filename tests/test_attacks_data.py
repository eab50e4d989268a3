"""Data-poisoning attacks: DBA's trigger pieces (docs/attacks.md §3.1) and the edge-case proxy (§3.6)."""

from __future__ import annotations

import pytest
import torch

from attack_harness import grouped_equals_per_client, run_attack
from fisherguard.attacks import registry
from fisherguard.attacks.badnets import trigger_mask
from fisherguard.attacks.base import AttackConfigError, AttackContext
from fisherguard.attacks.dba import DBA, piece_masks
from fisherguard.attacks.edgecase import EdgeCase
from fisherguard.clients.training import ClientDataset
from fisherguard.data.transforms import Pipeline

pytestmark = pytest.mark.unit


def _ctx(attackers=(7, 8, 9)):
    return AttackContext(num_clients=10, attackers=list(attackers), seed=0, target=2)


@pytest.mark.parametrize("family,channels,pieces,split", [
    ("fdcr", 3, 4, "spatial"), ("sdfc", 3, 4, "spatial"), ("fdcr", 3, 5, "spatial"),
    ("fdcr", 3, 12, "spatial"), ("fdcr", 3, 1, "spatial"), ("fdcr", 3, 3, "channel"),
    ("fdcr", 3, 7, "channel"), ("sdfc", 1, 4, "spatial"),
])
def test_dba_pieces_partition_the_trigger(family, channels, pieces, split):
    masks = piece_masks(channels, family, pieces, split)
    full = trigger_mask(channels, family)
    assert len(masks) == pieces
    total = torch.stack(masks).sum(0)
    assert int(total.max()) == 1  # disjoint
    assert torch.equal(total.bool(), full)  # union = the full trigger
    sizes = [int(m.sum()) for m in masks]
    assert max(sizes) - min(sizes) <= (len(trigger_mask(channels, family).nonzero()) // 12
                                       if split == "spatial" else 1)


def test_dba_default_pieces_are_the_four_spatial_1x3_runs():
    masks = piece_masks(3, "fdcr", 4, "spatial")
    expect = [(0, (0, 1, 2)), (0, (4, 5, 6)), (2, (0, 1, 2)), (2, (4, 5, 6))]
    for m, (row, cols) in zip(masks, expect):
        want = torch.zeros(3, 32, 32, dtype=torch.bool)
        want[:, row, list(cols)] = True
        assert torch.equal(m, want)


def test_dba_channel_split_gives_one_colour_channel_per_piece():
    masks = piece_masks(3, "fdcr", 3, "channel")
    full = trigger_mask(3, "fdcr")
    for c, m in enumerate(masks):
        assert torch.equal(m[c], full[c]) and int(m.sum()) == 12


def test_dba_attackers_stamp_their_piece_round_robin_and_the_test_uses_the_full_trigger():
    attack = DBA(augmentation="per_epoch")
    attack.bind(_ctx(attackers=(2, 5, 7, 8, 9)))
    assert [attack.piece_of(k) for k in (2, 5, 7, 8, 9)] == [0, 1, 2, 3, 0]
    imgs = torch.randint(0, 255, (200, 1, 32, 32), dtype=torch.uint8)
    clean = ClientDataset(labels=torch.randint(0, 10, (200,)),
                          pipeline=Pipeline(grey=True, out_channels=3), images=imgs)
    data = attack.poison(5, clean, seed=0)
    assert bool((data.labels[data.poisoned] == 2).all()) and 0.3 < float(data.poisoned.float().mean()) < 0.7
    x, _ = data.batch(torch.arange(200), torch.Generator().manual_seed(0))
    piece = attack.masks[1]
    assert bool((x[data.poisoned][:, piece] == 1.0).all())
    stamped = attack.test_trigger()(torch.zeros(1, 3, 32, 32))
    assert torch.equal(stamped[0] == 1.0, trigger_mask(3, "fdcr"))


@pytest.mark.parametrize("opts,needle", [
    ({"pieces": 0}, "dba pieces must be an integer in 1..12"),
    ({"pieces": 37, "split": "channel"}, "dba pieces must be an integer in 1..36"),
    ({"split": "diagonal"}, "dba split must be one of spatial, channel"),
    ({"family": "x"}, "dba family"),
])
def test_dba_options_are_validated_by_name(opts, needle):
    with pytest.raises(AttackConfigError, match=needle):
        DBA(**opts)


def _client(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClientDataset(labels=torch.randint(0, 10, (n,), generator=g),
                         pipeline=Pipeline(grey=True, out_channels=3),
                         images=torch.randint(0, 255, (n, 1, 32, 32), dtype=torch.uint8,
                                              generator=g))


def test_edge_case_proxy_mixes_p_edge_relabelled_tail_with_clean_samples():
    attack = EdgeCase(source_class=7, target=2, p_edge=0.5, tail_fraction=0.25, selection="random",
                      tail="own")
    attack.bind(_ctx())
    clean = _client()
    data = attack.poison(8, clean, seed=0)
    assert len(data) == len(clean)
    assert int(data.poisoned.sum()) == 200
    assert bool((data.labels[data.poisoned] == 2).all())
    # the tail samples are source-class images of the attacker's own data
    src_imgs = clean.images[clean.labels == 7]
    tail_imgs = data.images[data.poisoned]
    tail_set = {bytes(t.numpy().tobytes()) for t in tail_imgs}
    assert tail_set <= {bytes(t.numpy().tobytes()) for t in src_imgs}
    assert len(tail_set) == max(1, round(0.25 * len(src_imgs)))
    # the clean part keeps its true labels and is never one of the tail images
    rest = data.images[~data.poisoned]
    assert not ({bytes(t.numpy().tobytes()) for t in rest} & tail_set)
    again = attack.poison(8, clean, seed=0)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert attack.test_trigger() is None


def test_edge_case_confidence_selection_takes_the_least_confident_source_images():
    from fisherguard.clients.plan import TrainPlan
    from fisherguard.models import build_model

    ctx = _ctx()
    ctx.model_factory = lambda: build_model("simplecnn", 3)
    ctx.plan = TrainPlan(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-5)
    attack = EdgeCase(source_class=7, tail_fraction=0.25, tail="own")
    attack.bind(ctx)
    clean = _client(n=96)
    score = attack.confidence(8, clean, seed=0)
    assert score.shape == (96,) and bool(((score >= 0) & (score <= 1)).all())
    assert torch.equal(score, attack.confidence(8, clean, seed=0))  # seeded
    src = torch.nonzero(clean.labels == 7).flatten()
    tail = attack.tail(clean.labels, None, score)
    assert len(tail) == max(1, round(0.25 * len(src)))
    assert float(score[tail].max()) <= float(score[src[~torch.isin(src, tail)]].min())
    data = attack.poison(8, clean, seed=0)
    tail_set = {bytes(t.numpy().tobytes()) for t in clean.images[tail]}
    assert {bytes(t.numpy().tobytes()) for t in data.images[data.poisoned]} == tail_set


def test_edge_case_without_source_images_trains_clean():
    attack = EdgeCase(source_class=7, tail="own")
    attack.bind(_ctx())  # no model needed: there is nothing to score
    clean = _client()
    only = ClientDataset(labels=torch.zeros(10, dtype=torch.int64), pipeline=clean.pipeline,
                         images=clean.images[:10])
    assert attack.poison(8, only, seed=0) is only


@pytest.mark.parametrize("opts,needle", [
    ({"p_edge": 0}, "edge-case p_edge"), ({"tail_fraction": 1.5}, "edge-case tail_fraction"),
    ({"source_class": 2, "target": 2}, "edge-case source_class must differ"),
    ({"source_class": -1}, "edge-case source_class"),
    ({"selection": "best"}, "edge-case selection must be one of confidence, random"),
    ({"tail": "mine"}, "edge-case tail must be one of held-out, own"),
    ({"test_share": 1.0}, "edge-case test_share"),
])
def test_edge_case_options_are_validated_by_name(opts, needle):
    with pytest.raises(AttackConfigError, match=needle):
        EdgeCase(**opts)


def test_edge_case_is_reported_as_a_proxy_and_options_are_stored():
    assert "PROXY" in EdgeCase.summary
    cls = registry.get("dba")
    assert cls().get_params() == cls.options()
    # edge-case: the None defaults are the dataset's preset; the record holds the resolved values
    params = EdgeCase().get_params()
    unset = {k for k, v in EdgeCase.options().items() if v is None}
    assert unset == {"source_class", "target", "tail", "tail_dataset", "dataset", "data_dir"}
    assert {k: v for k, v in params.items() if k not in unset} == \
        {k: v for k, v in EdgeCase.options().items() if k not in unset}
    assert (params["tail"], params["source_class"], params["target"]) == ("held-out", 7, 2)
    for ds in ("mnist", "cifar10"):
        p = EdgeCase(dataset=ds).get_params()
        assert EdgeCase(**p).get_params() == p


@pytest.mark.integration
@pytest.mark.parametrize("name,opts", [("dba", None), ("dba", {"split": "channel", "pieces": 3}),
                                       ("edge-case", None),
                                       ("edge-case", {"selection": "random", "tail": "own"})])
def test_two_rounds_end_to_end(tmp_path, name, opts):
    summary, rounds, w = run_attack(tmp_path, name, opts)
    assert len(rounds) == 2 and bool(torch.isfinite(w).all())
    assert all(r["attack"] == {"name": name, "active": True} for r in rounds)
    held_out = name == "edge-case" and not opts  # the default tail is held out and measured
    assert all(("ASR_edge" in r["metrics"]) == held_out for r in rounds)
    if held_out:
        asr = [r["metrics"]["ASR_edge"] for r in rounds]
        assert all(0.0 <= a <= 100.0 for a in asr)
        assert summary["ASR_edge"] == pytest.approx(sum(asr) / len(asr))
    else:
        assert summary["ASR_edge"] is None


@pytest.mark.integration
def test_dba_grouped_equals_per_client(tmp_path):
    grouped_equals_per_client(tmp_path, "dba")
