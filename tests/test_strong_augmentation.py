"""The `code` preset's strong augmentation of U for CIFAR-10 in the sdfc family (protocol §1.3)."""

import pytest
import torch

from fisherguard import config
from fisherguard.data import transforms as T
from fisherguard.data.transforms import Pipeline, StrongPipeline
from fisherguard.engine.server_data import ValidationSet

pytestmark = pytest.mark.unit


def images(n=256, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,dataset,want", [
    ("sdfc", "cifar10", "strong"), ("sdfc", "fashion-mnist", "train"), ("fdcr", "cifar10", "train")])
def test_code_preset_picks_the_release_transform_on_u(family, dataset, want):
    raw = {"experiment": {"family": family, "preset": "code"}, "data": {"dataset": dataset}}
    assert config.resolve(raw).server.transform == want
    raw["experiment"]["preset"] = "paper"
    assert config.resolve(raw).server.transform == "test"


def test_crop_boxes_follow_scale_and_ratio():
    b = T.resized_crop_boxes(4000, torch.Generator().manual_seed(1))
    top, left, h, w = b.T
    assert bool(((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32)).all())
    share = (h * w).double() / 1024
    assert float(share.min()) > 0.17 and float(share.max()) <= 1.0
    ratio = w.double() / h.double()
    assert float(ratio.min()) > 0.6 and float(ratio.max()) < 1.6
    assert 0.5 < float(share.mean()) < 0.7  # uniform area share in [0.2, 1] (rounding aside)


def test_a_full_box_is_the_identity():
    x = images(4).float() / 255
    full = torch.tensor([[0, 0, 32, 32]] * 4)
    assert torch.allclose(T._crop_resize(x, full), x, atol=1e-5)


def test_strong_augmentation_draws_jitter_and_greyscale_at_their_rates():
    g = torch.Generator().manual_seed(2)
    x = T.strong_augment(images(600, 3), g)
    assert x.shape == (600, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    grey = (x[:, 0] == x[:, 1]).flatten(1).all(1) & (x[:, 1] == x[:, 2]).flatten(1).all(1)
    assert 0.13 < float(grey.double().mean()) < 0.27  # p = 0.2
    again = T.strong_augment(images(600, 3), torch.Generator().manual_seed(2))
    assert torch.equal(x, again)


def test_hue_shift_matches_colorsys():
    import colorsys

    x = torch.rand(20, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    shift = torch.linspace(-0.1, 0.1, 20)
    y = T._shift_hue(x, shift)
    for i in range(20):
        for a in range(2):
            for b in range(2):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, a, b].tolist())
                want = colorsys.hsv_to_rgb((h + float(shift[i])) % 1.0, s, v)
                assert y[i, :, a, b].tolist() == pytest.approx(want, abs=1e-5)


def test_u_uses_the_strong_pipeline_under_code():
    pipe = Pipeline(grey=False)
    x, y = images(64), torch.randint(0, 10, (64,))
    from fisherguard.clients.training import TrainPlan

    plan = TrainPlan(epochs=1, batch_size=16, lr=0.01, momentum=0.9, weight_decay=0.0)
    u = ValidationSet(lambda: torch.nn.Linear(1, 1), x, y, pipe, transform="strong", plan=plan,
                      fisher_options={}, seed=0)
    assert isinstance(u._pipeline, StrongPipeline) and u._augment
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(u._inputs(g), pipe.train(x, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="CIFAR-10"):
        ValidationSet(lambda: torch.nn.Linear(1, 1), x[:, :1], y, Pipeline(grey=True),
                      transform="strong", plan=plan, fisher_options={}, seed=0)


def test_jitter_order_is_drawn_per_image():
    """Brightness then contrast differs from contrast then brightness; with one image repeated,
    both orders show up across the batch."""
    x = torch.full((64, 3, 4, 4), 0.5)
    x[:, 0] = 0.9
    y = T.colour_jitter(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        T._uniform(64, 0, 1, g)
    orders = torch.rand(64, 4, generator=g).argsort(1)
    assert len(torch.unique(orders, dim=0)) > 1
