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


# ------------------------------------------------------------ the cross-dataset tail (MNIST, USPS)


def _digits(n: int, size: int, seed: int):
    """Generated handwriting stand-ins: class-dependent brightness plus noise, uint8 (n, s, s)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.uint8)
    x = (y[:, None, None].astype(np.int64) * 20 + rng.integers(0, 60, (n, size, size)))
    return x.clip(0, 255).astype(np.uint8), y


def _fixture_root(tmp_path, *, mnist: bool = True, usps: bool = True):
    """A data root with small generated MNIST (IDX) and USPS (text) files, 60 sevens each."""
    import data_writers as writers

    root = tmp_path / "data"
    if mnist:
        d = root / "mnist"
        d.mkdir(parents=True)
        x, y = _digits(600, 28, 1)
        for stem, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                          ("t10k-images-idx3-ubyte", x[:20]), ("t10k-labels-idx1-ubyte", y[:20])):
            writers.write_idx(d / stem, arr, gz=True)
    if usps:
        d = root / "usps"
        d.mkdir(parents=True)
        x, y = _digits(600, 16, 2)
        writers.write_usps_text(d / "zip.train.gz", x, y)
        writers.write_usps_text(d / "zip.test.gz", x[:20], y[:20])
    return root


@pytest.fixture
def loose_load(monkeypatch):
    """The cross tail loads through the data room; generated files skip the real-count checks."""
    import functools

    import fisherguard.attacks.edgecase as edgecase
    from fisherguard.data import load_raw

    monkeypatch.setattr(edgecase, "load_raw", functools.partial(load_raw, strict=False))
    return functools.partial(load_raw, strict=False)


@pytest.mark.parametrize("task,other", [("mnist", "usps"), ("usps", "mnist")])
def test_cross_tail_is_the_other_datasets_sevens_relabelled_and_split(tmp_path, loose_load,
                                                                       task, other):
    from fisherguard.data.transforms import resize_to_32

    root = _fixture_root(tmp_path)
    images, labels, pool = _pool_data()  # the task's own (N, 1, 32, 32) pool, left untouched
    attack = EdgeCase(dataset=task, data_dir=str(root))
    assert (attack.tail_source, attack.tail_dataset) == ("cross", other)
    assert (attack.source_class, attack.target) == (7, 1)
    r = attack.reserve(images, labels, pool, seed=0)
    assert len(r.indices) == 0 and r.target == 1  # nothing leaves the client pool
    raw = loose_load(other, root)
    sevens = _bytes(resize_to_32(raw.train_x[raw.train_y == 7]))
    others = _bytes(resize_to_32(raw.train_x[raw.train_y != 7]))
    assert len(sevens) == 60
    att, test = _bytes(r.attacker_images), _bytes(r.test_images)
    assert att | test == sevens and not att & test and not (att | test) & others
    assert len(r.test_images) == 30 and len(r.attacker_labels) == 30
    assert bool((r.attacker_labels == 1).all()) and r.attacker_labels.dtype == torch.int64
    assert r.test_images.dtype == torch.uint8 and r.test_images.shape[1:] == images.shape[1:]
    assert not (att | test) & _bytes(images)
    again = attack.reserve(images, labels, pool, seed=0)
    assert torch.equal(again.test_images, r.test_images)
    assert torch.equal(again.attacker_images, r.attacker_images)
    other_seed = attack.reserve(images, labels, pool, seed=1)
    assert not torch.equal(other_seed.test_images, r.test_images)
    share = EdgeCase(dataset=task, data_dir=str(root), test_share=0.2)
    assert len(share.reserve(images, labels, pool, seed=0).test_images) == 12
    # a colour task gets the grey tail repeated to its channels; tail_max subsamples (seeded)
    capped = EdgeCase(dataset="cifar10", tail_dataset=other, source_class=7, data_dir=str(root),
                      tail_max=10)
    rc = capped.reserve(images.expand(-1, 3, -1, -1), labels, pool, seed=0)
    assert len(rc.attacker_images) + len(rc.test_images) == 10
    assert rc.test_images.shape[1] == 3 and _bytes(rc.test_images[:, :1]) <= sevens
    assert capped.target == 9  # the CIFAR-10 preset target


@pytest.mark.integration
def test_prepare_with_a_cross_tail_keeps_the_pool(tmp_path, loose_load, monkeypatch):
    import fisherguard.engine.federation as federation

    root = _fixture_root(tmp_path)
    monkeypatch.setattr(federation, "load_raw", loose_load)
    cfg = attack_config("edge-case").replace({"data.dataset": "usps", "data.data_dir": str(root),
                                              "attack.target": 1, "server.val_size": 16})
    fed = prepare(cfg)
    assert fed.partition_info["held_out"]["total"] == 0 and fed.tail_target == 1
    assert fed.partition_info["client_pool"] == sum(fed.partition_info["sizes"])
    assert fed.tail_test.shape[1:] == fed.test_x.shape[1:]
    for k in fed.attackers:
        d = fed.clients[k]
        assert int(d.poisoned.sum()) > 0 and bool((d.labels[d.poisoned] == 1).all())


@pytest.mark.parametrize("dataset,want", [
    ("mnist", ("cross", "usps", 7, 1)), ("usps", ("cross", "mnist", 7, 1)),
    ("fashion-mnist", ("held-out", None, 7, 2)), ("synthetic", ("held-out", None, 7, 2)),
    ("cifar10", ("held-out", None, 0, 9))])
def test_presets_by_dataset_through_the_config(dataset, want):
    from fisherguard import config

    cfg = config.resolve({"data": {"dataset": dataset}, "attack": {"name": "edge-case"}})
    stage = cfg.build_attack().stages[0]
    assert (stage.tail_source, stage.tail_dataset, stage.source_class, stage.target) == want
    assert cfg.attack.target == want[3]  # the run's target follows the preset when unset
    assert EdgeCase.options()["tail"] is None and EdgeCase.options()["target"] is None


def test_user_values_win_over_the_presets():
    from fisherguard import config

    def stage(attack):
        cfg = config.resolve({"data": {"dataset": "mnist"}, "attack": attack})
        return cfg, cfg.build_attack().stages[0]

    cfg, s = stage({"name": "edge-case", "target": 2})  # explicit attack.target, even the default
    assert cfg.attack.target == 2 and s.target == 2
    cfg, s = stage({"name": "edge-case", "target": 3, "options": {"target": 4}})
    assert cfg.attack.target == 3 and s.target == 4  # the stage's own option wins
    _, s = stage({"name": "edge-case", "options": {"tail": "held-out", "source_class": 3}})
    assert (s.tail_source, s.tail_dataset, s.source_class, s.target) == ("held-out", None, 3, 1)
    cfg, _ = stage({"name": "badnets"})
    assert cfg.attack.target == 2  # other attacks keep the config default
    s = config.resolve({"data": {"dataset": "fashion-mnist"},
                        "attack": {"name": "edge-case",
                                   "options": {"tail_dataset": "mnist"}}}).build_attack().stages[0]
    assert (s.tail_source, s.tail_dataset, s.target) == ("cross", "mnist", 2)


@pytest.mark.parametrize("options,message", [
    ({"dataset": "fashion-mnist", "tail": "cross"}, "no default tail_dataset on fashion-mnist"),
    ({"dataset": "cifar10", "tail": "cross"}, "no default tail_dataset on cifar10"),
    ({"dataset": "synthetic", "tail": "cross"}, "no default tail_dataset on synthetic"),
    ({"dataset": "mnist", "tail_dataset": "mnist"}, "another dataset than the task's .mnist."),
    ({"dataset": "usps", "tail": "cross", "tail_dataset": "usps"}, "another dataset"),
    ({"dataset": "mnist", "tail_dataset": "cifar10"}, "is colour"),
    ({"dataset": "mnist", "tail": "held-out", "tail_dataset": "usps"}, "tail 'cross' only"),
    ({"dataset": "mnist", "tail_dataset": "synthetic"}, "tail_dataset must be one of"),
    ({"dataset": "mnist", "tail_max": 1}, "tail_max")])
def test_cross_tail_option_errors(options, message):
    with pytest.raises(AttackConfigError, match=message):
        EdgeCase(**options)


def test_cross_tail_missing_files_raise_the_fetch_hint(tmp_path, capsys, loose_load,
                                                      monkeypatch):
    import fisherguard.engine.federation as federation
    from fisherguard.cli import main
    from fisherguard.data import DatasetMissingError

    monkeypatch.setattr(federation, "load_raw", loose_load)  # the generated USPS task files

    images, labels, pool = _pool_data()
    root = _fixture_root(tmp_path, mnist=False)  # USPS task, MNIST absent from the root
    with pytest.raises(DatasetMissingError, match="fisherguard data fetch mnist"):
        EdgeCase(dataset="usps", data_dir=str(root)).reserve(images, labels, pool, seed=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{dataset: usps, data_dir: {root}}}\nattack: {{name: edge-case}}\n"
                   "federation: {clients: 3, rounds: 1}\nserver: {val_size: 16}\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "fisherguard data fetch mnist" in err and "Traceback" not in err
