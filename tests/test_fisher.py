"""Diagonal Fisher estimators (docs/algorithms.md §2) against worked example E and the per-sample loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherguard.fisher import diagonal_fisher, per_sample_loop_fisher
from fisherguard.models import SimpleCNN, flatten
from reference_fisher import minibatch_square_fisher

pytestmark = pytest.mark.unit


class LinearSoftmax(nn.Module):
    """Example E's model: logits = W x, no bias, W row-major (W00, W01, W10, W11)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(x.shape[0], -1))


class TinyCNN(nn.Module):
    """Conv (with padding and stride) plus linear layers: small enough for the per-sample loop."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.fc = nn.Linear(5 * 2 * 2, 7)
        self.out = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.tanh(self.fc(x.reshape(x.shape[0], -1)))
        return self.out(x)


class TinyBN(nn.Module):
    """A model the hooks backend does not support (BatchNorm affine parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.c(x))).reshape(x.shape[0], -1))


EX_X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
EX_Y = torch.tensor([0, 1])
EX_W = torch.zeros(4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyCNN()
    w = flatten(model) + 0.05 * torch.randn(sum(p.numel() for p in model.parameters()))
    x = torch.randn(37, 3, 8, 8)
    y = torch.randint(0, 4, (37,))
    return model, w, x, y


# ------------------------------------------------------------------ Example E


@pytest.mark.parametrize("backend", ["auto", "hooks", "vmap"])
def test_example_e_per_sample(backend: str) -> None:
    m = LinearSoftmax()
    f = diagonal_fisher(m, EX_W, EX_X, EX_Y, backend=backend)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, torch.tensor([0.125, 0.5, 0.125, 0.5]), atol=1e-6, rtol=0)
    f = diagonal_fisher(m, EX_W, EX_X, EX_Y, backend=backend, label_source="model_expectation")
    torch.testing.assert_close(f, torch.tensor([0.125, 0.5, 0.125, 0.5]), atol=1e-6, rtol=0)


def test_example_e_reference_estimators() -> None:
    m = LinearSoftmax()
    torch.testing.assert_close(minibatch_square_fisher(m, EX_W, EX_X, EX_Y, batch_size=2),
                               torch.tensor([0.0625, 0.25, 0.0625, 0.25]), atol=1e-6, rtol=0)
    torch.testing.assert_close(minibatch_square_fisher(m, EX_W, EX_X, EX_Y, batch_size=1),
                               torch.tensor([0.125, 0.5, 0.125, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_sample_loop_fisher(m, EX_W, EX_X, EX_Y),
                               torch.tensor([0.125, 0.5, 0.125, 0.5]), atol=1e-6, rtol=0)


def test_example_e_official_label_mixed() -> None:
    m = LinearSoftmax()
    g = torch.Generator().manual_seed(3)
    f2 = diagonal_fisher(m, EX_W, EX_X, EX_Y, estimator="official_label_mixed", batch_size=2,
                         generator=g)
    torch.testing.assert_close(f2, torch.zeros(4), atol=1e-6, rtol=0)
    f1 = diagonal_fisher(m, EX_W, EX_X, EX_Y, estimator="official_label_mixed", batch_size=1,
                         generator=g)
    torch.testing.assert_close(f1, torch.tensor([0.0625, 0.25, 0.0625, 0.25]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ exactness


@pytest.fixture(scope="module")
def loop_reference(tiny) -> dict[str, torch.Tensor]:
    model, w, x, y = tiny
    return {m: per_sample_loop_fisher(model, w, x, y, importance_metric=m) for m in ("squared", "abs")}


@pytest.mark.parametrize("backend", ["hooks", "vmap"])
@pytest.mark.parametrize("metric", ["squared", "abs"])
def test_per_sample_equals_loop(tiny, loop_reference, backend: str, metric: str) -> None:
    model, w, x, y = tiny
    ref = loop_reference[metric]
    for chunk in (5, 128):
        f = diagonal_fisher(model, w, x, y, backend=backend, chunk_size=chunk,
                            importance_metric=metric)
        assert f.shape == w.shape and f.dtype == torch.float32
        assert rel(f, ref) < 1e-5


def test_per_sample_differs_from_minibatch_square(tiny) -> None:
    model, w, x, y = tiny
    exact = diagonal_fisher(model, w, x, y)
    mb = minibatch_square_fisher(model, w, x, y, batch_size=16)
    assert rel(mb, exact) > 0.3
    assert float(mb.sum()) < 0.7 * float(exact.sum())


def test_simplecnn_hooks_vmap_agree() -> None:
    torch.manual_seed(1)
    model = SimpleCNN()
    w = flatten(model)
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    a = diagonal_fisher(model, w, x, y, backend="hooks", chunk_size=10)
    b = diagonal_fisher(model, w, x, y, backend="vmap", chunk_size=10)
    assert a.numel() == 92626
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("metric", ["squared", "abs"])
def test_label_sources_agree_across_backends(tiny, metric: str) -> None:
    model, w, x, y = tiny
    for src in ("model_expectation", "model_sample"):
        a = diagonal_fisher(model, w, x, y, backend="hooks", label_source=src,
                            importance_metric=metric, generator=torch.Generator().manual_seed(5))
        b = diagonal_fisher(model, w, x, y, backend="vmap", label_source=src,
                            importance_metric=metric, generator=torch.Generator().manual_seed(5))
        assert rel(a, b) < 1e-5


def test_model_expectation_is_probability_weighted_sum(tiny) -> None:
    model, w, x, y = tiny
    x, y = x[:8], y[:8]
    from fisherguard.models import load_flat
    import copy

    m = load_flat(copy.deepcopy(model), w).eval()
    with torch.no_grad():
        p = torch.softmax(m(x), -1)
    expected = torch.zeros_like(w)
    for i in range(x.shape[0]):
        for c in range(p.shape[1]):
            expected += p[i, c] * per_sample_loop_fisher(model, w, x[i:i + 1], torch.tensor([c]))
    expected /= x.shape[0]
    f = diagonal_fisher(model, w, x, y, label_source="model_expectation")
    assert rel(f, expected) < 1e-5


def test_model_sample_is_seeded(tiny) -> None:
    model, w, x, y = tiny
    a = diagonal_fisher(model, w, x, y, label_source="model_sample",
                        generator=torch.Generator().manual_seed(9))
    b = diagonal_fisher(model, w, x, y, label_source="model_sample",
                        generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_unsupported_layers_fall_back_to_vmap() -> None:
    torch.manual_seed(2)
    model = TinyBN()
    w = flatten(model)
    x, y = torch.randn(9, 3, 6, 6), torch.randint(0, 3, (9,))
    model.eval()
    ref = per_sample_loop_fisher(model, w, x, y)
    assert rel(diagonal_fisher(model, w, x, y), ref) < 1e-5
    with pytest.raises(ValueError, match="hooks"):
        diagonal_fisher(model, w, x, y, backend="hooks")


# ------------------------------------------------------------------ the release's estimator


def test_official_label_mixed_matches_hand_computation(tiny) -> None:
    model, w, x, y = tiny
    bs = 8
    f = diagonal_fisher(model, w, x, y, estimator="official_label_mixed", batch_size=bs,
                        generator=torch.Generator().manual_seed(4))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(4))
    import copy
    from fisherguard.models import load_flat

    m = load_flat(copy.deepcopy(model), w).train()
    total = torch.zeros_like(w)
    nb = x.shape[0] // bs  # 37 // 8 = 4: the last 5 samples are dropped
    for b in range(nb):
        idx = order[b * bs:(b + 1) * bs]
        m.zero_grad()
        torch.log_softmax(m(x[idx]), 1)[:, y[idx]].mean().backward()
        total += torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(f, (total / nb) ** 2, rtol=1e-5, atol=1e-12)


def test_official_label_mixed_too_few_samples_warns() -> None:
    m = LinearSoftmax()
    with pytest.warns(UserWarning, match="no full batch"):
        f = diagonal_fisher(m, EX_W, EX_X, EX_Y, estimator="official_label_mixed", batch_size=64)
    assert torch.equal(f, torch.zeros(4))


# ------------------------------------------------------------------ the caller's model is untouched


@pytest.mark.parametrize("estimator", ["per_sample", "official_label_mixed"])
def test_model_left_unchanged(estimator: str) -> None:
    torch.manual_seed(3)
    model = TinyBN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = flatten(model) + 1.0
    x, y = torch.randn(12, 3, 6, 6), torch.randint(0, 3, (12,))
    diagonal_fisher(model, w, x, y, estimator=estimator, batch_size=4)
    per_sample_loop_fisher(model, w, x, y)
    minibatch_square_fisher(model, w, x, y, batch_size=4)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_bad_options_raise() -> None:
    m = LinearSoftmax()
    for kw in ({"estimator": "minibatch"}, {"label_source": "true"}, {"importance_metric": "sq"},
               {"backend": "jit"}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            diagonal_fisher(m, EX_W, EX_X, EX_Y, **kw)
    with pytest.raises(ValueError):
        diagonal_fisher(m, torch.zeros(5), EX_X, EX_Y)
    with pytest.raises(ValueError):
        diagonal_fisher(m, EX_W, EX_X, EX_Y, estimator="official_label_mixed",
                        label_source="model_sample")


@pytest.mark.parametrize("channels,padding", [(1, 0), (1, 2), (3, 1)])
def test_per_sample_kernel_gradients_equal_each_samples_own_autograd(channels, padding):
    from fisherguard.fisher import _per_sample_kernel_grads

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 4, 3, padding=padding)
    a = torch.randn(5, channels, 9, 9)
    g = torch.randn(5, 4, *conv(a).shape[2:])
    per = _per_sample_kernel_grads(conv, a, g)
    for i in range(5):
        conv.zero_grad()
        (conv(a[i:i + 1]) * g[i:i + 1]).sum().backward()
        assert torch.allclose(per[i], conv.weight.grad, atol=1e-5, rtol=1e-5)
