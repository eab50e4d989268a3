"""The `code` preset's client Fisher over the augmented training loader (issue 20; protocol §8)."""

import pytest
import torch

from fisherguard import config
from fisherguard.clients.training import ClientDataset, FisherRequest, client_fisher
from fisherguard.data.transforms import Pipeline
from fisherguard.engine.federation import client_fisher_options
from fisherguard.fisher import diagonal_fisher
from fisherguard.models import build_model, flatten

pytestmark = pytest.mark.unit

OPTS = {"estimator": "official_label_mixed", "label_source": "dataset", "batch_size": 16}


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 32, 32), dtype=torch.uint8, generator=g)
    data = ClientDataset(labels=torch.randint(0, 10, (40,), generator=g),
                         pipeline=Pipeline(grey=True, out_channels=3), images=images)
    torch.manual_seed(1)
    model = build_model("simplecnn", 3)
    return data, model, flatten(model).clone()


def test_train_loader_fisher_is_the_fisher_of_augmented_samples(setup):
    data, model, w = setup
    got = client_fisher(model, data, w, FisherRequest({**OPTS, "data": "train_loader"},
                                                      torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)
    x, y = data.batch(torch.arange(len(data)), g)  # the training transform, then the estimator
    want = diagonal_fisher(model, w, x, y, generator=g, **OPTS)
    assert torch.equal(got, want)
    plain = client_fisher(model, data, w, FisherRequest(dict(OPTS), torch.Generator().manual_seed(7)))
    assert not torch.equal(got, plain)  # the paper's data: every sample without augmentation
    x0, y0 = data.fisher_data()
    assert torch.equal(plain, diagonal_fisher(model, w, x0, y0,
                                              generator=torch.Generator().manual_seed(7), **OPTS))


def test_code_preset_asks_the_clients_for_the_loader_fisher():
    for defense in ("fdcr", "sdfc"):
        code = config.resolve({"experiment": {"preset": "code"}, "defense": defense})
        assert code.federation.fisher_data == "train_loader"
        assert client_fisher_options(code, code.build_defense())["data"] == "train_loader"
        paper = config.resolve({"defense": defense})
        assert paper.federation.fisher_data == "plain"
        assert "data" not in client_fisher_options(paper, paper.build_defense())


def test_unknown_fisher_data_is_refused(setup):
    data, model, w = setup
    with pytest.raises(ValueError, match="Fisher data must be one of"):
        client_fisher(model, data, w, FisherRequest({**OPTS, "data": "u"}, torch.Generator()))
