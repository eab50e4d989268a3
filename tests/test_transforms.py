import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fisherguard.data.transforms import Pipeline, random_crop_flip, resize_to_32

pytestmark = pytest.mark.unit


def test_resize_grey_to_uint8_32():
    img = np.full((2, 28, 28), 77, dtype=np.uint8)
    out = resize_to_32(img)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.uint8
    assert torch.all(out == 77)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    assert torch.equal(resize_to_32(rgb), torch.from_numpy(rgb))  # already 32×32: untouched


def test_crop_equals_per_sample_pad_and_slice():
    x = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = random_crop_flip(x, g1, flip=False)
    oy = torch.randint(0, 9, (6,), generator=g2)
    ox = torch.randint(0, 9, (6,), generator=g2)
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        ref = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(out[i], ref)


def test_flip_mirrors_half_the_batch():
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), flip=True)
    g = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 9, (200,), generator=g)
    ox = torch.randint(0, 9, (200,), generator=g)
    do = torch.rand(200, generator=g) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(0, 200, 17):
        ref = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(out[i], ref.flip(-1) if do[i] else ref)
    assert 60 < int(do.sum()) < 140


def test_grey_normalisation_replicates_channels_with_mnist_constants():
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    y = Pipeline(grey=True).test(x)
    assert y.shape == (1, 3, 32, 32)
    assert float(y[0, 0, 0, 0]) == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert torch.equal(y[:, 0], y[:, 2])
    one = Pipeline(grey=True, out_channels=1).test(x)
    assert one.shape == (1, 1, 32, 32)
