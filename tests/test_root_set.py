"""FLTrust's and Sageflow's MNIST root set under `code` (docs/baselines.md C5, issue 20)."""

import pytest
import torch

from fisherguard import config
from fisherguard.data.datasets import load_raw
from fisherguard.engine import federation

pytestmark = pytest.mark.unit

RAW = {"experiment": {"seed": 1},
       "data": {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 100},
       "federation": {"clients": 3, "rounds": 1, "local_epochs": 1, "batch_size": 32},
       "attack": {"name": "none"}, "server": {"val_size": 16}}


@pytest.fixture
def fake_mnist(monkeypatch):
    asked = []

    def load(name, root=None, **kw):
        asked.append(name)
        return load_raw("synthetic", n_train=300, n_test=10) if name == "mnist" \
            else load_raw(name, root, **kw)

    monkeypatch.setattr(federation, "load_raw", load)
    monkeypatch.setattr(federation, "ROOT_SET_SIZE", 50)
    return asked


def server_set(defense, preset, **extra):
    raw = config.apply_overrides(RAW, {"experiment.preset": preset, "defense": defense, **extra})
    cfg = config.resolve(raw)
    fed = federation.prepare(cfg)
    d = cfg.build_defense()
    return cfg, federation.server_data(fed, d, federation.train_plan(cfg))


@pytest.mark.parametrize("defense", ["fltrust", "sageflow"])
def test_code_preset_gives_fltrust_and_sageflow_the_mnist_root_set(fake_mnist, defense):
    cfg, u = server_set(defense, "code")
    assert cfg.server.root_set == "mnist-5000"
    assert "mnist" in fake_mnist and u.size == 50
    assert u._pipeline.grey
    again = server_set(defense, "code")[1]
    assert torch.equal(u._images, again._images)  # the named stream: the same draw


def test_paper_and_other_readers_of_u_keep_u(fake_mnist):
    cfg, u = server_set("fltrust", "paper")
    assert cfg.server.root_set == "U" and u.size == 16
    _, u = server_set("finetuning", "code", **{"server.val_size": 16})
    assert u.size == 16 and "mnist" not in fake_mnist
