"""The attack room: who attacks, poisoning, and what the after-training stage may see."""

import numpy as np
import pytest
import torch

from fisherguard import config
from fisherguard.attacks.badnets import BadNets, trigger_mask
from fisherguard.attacks.base import Attack, NoAttack, choose_attackers, num_attackers
from fisherguard.clients.training import ClientDataset, Upload
from fisherguard.data.transforms import Pipeline

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("k,frac,n", [(10, 0.3, 3), (10, 0.2, 2), (10, 0.5, 5), (7, 0.3, 2),
                                      (10, 0.0, 0), (10, 0.29, 2)])
def test_attacker_count_is_the_floor_of_k_times_upsilon(k, frac, n):
    assert num_attackers(k, frac) == n
    assert choose_attackers(k, frac) == list(range(k - n, k))


def test_random_attackers_are_seeded_and_named_errors():
    a = choose_attackers(10, 0.3, mode="random", rng=np.random.default_rng(3))
    assert a == choose_attackers(10, 0.3, mode="random", rng=np.random.default_rng(3))
    with pytest.raises(ValueError, match="random stream"):
        choose_attackers(10, 0.3, mode="random")
    with pytest.raises(ValueError, match="last, random"):
        choose_attackers(10, 0.3, mode="first")


def _uploads(ids):
    return {k: Upload(k, torch.full((4,), float(k)), num_samples=10) for k in ids}


class Omniscient(Attack):
    name = "test-omniscient"
    knowledge = "omniscient"


@pytest.mark.parametrize("cls,sees_benign", [(BadNets, False), (NoAttack, False),
                                             (Omniscient, True)])
def test_the_after_training_stage_sees_benign_uploads_only_when_omniscient(cls, sees_benign):
    view = cls().round_view(0, torch.zeros(4), _uploads(range(5)), attackers=[3, 4])
    assert sorted(view.own) == [3, 4]
    assert (view.benign is not None) == sees_benign
    if sees_benign:
        assert sorted(view.benign) == [0, 1, 2]


def test_badnets_poisons_a_seeded_share_and_relabels_to_the_target():
    imgs = torch.randint(0, 255, (400, 1, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (400,))
    attack = BadNets(channels=3, target=2, poison_prob=0.5, augmentation="per_epoch")
    clean = ClientDataset(labels=labels, pipeline=Pipeline(grey=True, out_channels=3), images=imgs)
    data = attack.poison(7, clean, seed=0)
    again = attack.poison(7, clean, seed=0)
    assert torch.equal(data.poisoned, again.poisoned)
    share = float(data.poisoned.float().mean())
    assert 0.4 < share < 0.6
    assert bool((data.labels[data.poisoned] == 2).all())
    assert torch.equal(data.labels[~data.poisoned], labels[~data.poisoned])
    x, _ = data.batch(torch.arange(400), torch.Generator().manual_seed(0))
    mask = trigger_mask(3, "fdcr")
    assert bool((x[data.poisoned][:, mask] == 1.0).all())


def test_the_metrics_trigger_comes_from_the_attack():
    cfg = config.resolve({"data": {"dataset": "synthetic"}, "experiment": {"family": "sdfc"}})
    x = torch.zeros(2, 3, 32, 32)
    stamped = cfg.build_attack().test_trigger()(x)
    assert torch.equal(stamped[0] == 1.0, trigger_mask(3, "sdfc"))
    # no attacker: the control trigger still measures the backdoor's base rate
    control = cfg.replace({"attack.name": "none"}).build_attack()
    assert isinstance(control.stages[0], NoAttack) and not control.active(0)
    assert torch.equal(control.test_trigger()(x), stamped)
