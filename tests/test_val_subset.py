"""SDFC's M_k(U) on a per-round subset of U (``val_fisher_samples``, docs/sampling.md §7): the
subset's rows and Fisher, the defense's use of one subset per round, and a run end to end."""

from __future__ import annotations

import pytest
import torch

from fisherguard import config
from fisherguard.clients.training import TrainPlan
from fisherguard.data.transforms import Pipeline
from fisherguard.defenses import registry
from fisherguard.defenses.base import DefenseConfigError, RoundInput
from fisherguard.defenses.sdfc import SDFC
from fisherguard.engine.runner import run
from fisherguard.engine.server_data import ValidationSet, ValidationSubset
from fisherguard.fisher import diagonal_fisher
from fisherguard.models import SimpleCNN, flatten
from fisherguard.results import RunDir

pytestmark = pytest.mark.unit

PLAN = TrainPlan(epochs=1, batch_size=16, lr=0.01, momentum=0.9, weight_decay=0.0)


def model() -> torch.nn.Module:
    return SimpleCNN(in_channels=1, num_classes=10)


def u_set(n: int = 40, seed: int = 0, transform: str = "test") -> ValidationSet:
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ValidationSet(model, x, y, Pipeline(grey=True, out_channels=1), transform=transform, plan=PLAN,
                         fisher_options={}, seed=seed)


def weights(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return flatten(model())


def test_subset_rows_are_distinct_sorted_and_drawn_per_round() -> None:
    u = u_set()
    assert u.subset(40) is u and u.subset(1000) is u  # all of U: the set itself
    u.begin_round(0)
    a = u.subset(8)
    assert isinstance(a, ValidationSubset) and a.size == 8
    rows = a.rows.tolist()
    assert rows == sorted(set(rows)) and all(0 <= r < 40 for r in rows)
    again = u_set()
    again.begin_round(0)
    assert again.subset(8).rows.tolist() == rows  # the same seed and round: the same rows
    u.begin_round(1)
    assert u.subset(8).rows.tolist() != rows  # another round draws afresh
    other = u_set(seed=1)
    other.begin_round(0)
    assert other.subset(8).rows.tolist() != rows


def test_subset_fisher_is_the_fisher_of_its_rows() -> None:
    u = u_set()
    u.begin_round(0)
    sub = u.subset(8)
    w = weights()
    x = Pipeline(grey=True, out_channels=1).test(u._images[sub.rows])
    want = diagonal_fisher(model(), w, x, u._labels[sub.rows])
    torch.testing.assert_close(sub.fisher(w), want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(sub.fisher(w), u.fisher(w))  # not the whole of U
    # augmented U: the subset's inputs are its own rows, drawn with the call's stream
    aug = u_set(transform="train")
    aug.begin_round(0)
    f = aug.subset(8).fisher(w)
    assert f.shape == w.shape and bool(torch.isfinite(f).all())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_subset_sizes_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        u_set().subset(bad)
    with pytest.raises(DefenseConfigError, match="val_fisher_samples"):
        registry.build("sdfc", {"val_fisher_samples": bad})


class CountingServer:
    """A ServerData whose ``subset`` hands out a recorded view: M(U; w) = w², on a subset w² · 2."""

    size = 16

    def __init__(self) -> None:
        self.subsets: list[int] = []
        self.full_calls = 0
        self.subset_calls = 0

    def fisher(self, w: torch.Tensor) -> torch.Tensor:
        self.full_calls += 1
        return w.to(torch.float64) ** 2

    def subset(self, size: int) -> "CountingServer.View":
        self.subsets.append(size)
        return CountingServer.View(self)

    class View:
        def __init__(self, parent: "CountingServer") -> None:
            self.parent, self.size = parent, 4

        def fisher(self, w: torch.Tensor) -> torch.Tensor:
            self.parent.subset_calls += 1
            return 2 * w.to(torch.float64) ** 2


def round_input(server: CountingServer) -> RoundInput:
    g = torch.Generator().manual_seed(0)
    k, p = 4, 6
    return RoundInput(round_idx=0, global_weights=torch.rand(p, generator=g, dtype=torch.float64),
                      updates=torch.rand(k, p, generator=g, dtype=torch.float64) * 0.1,
                      num_samples=torch.full((k,), 10.0, dtype=torch.float64),
                      fisher=torch.rand(k, p, generator=g, dtype=torch.float64),
                      client_ids=list(range(k)), server_data=server)


def test_sdfc_draws_one_subset_a_round_and_uses_it_for_every_upload() -> None:
    full, sub = CountingServer(), CountingServer()
    a = SDFC(hardening="off").aggregate(round_input(full))
    b = SDFC(hardening="off", val_fisher_samples=4).aggregate(round_input(sub))
    assert (full.subsets, full.full_calls, full.subset_calls) == ([], 4, 0)
    assert (sub.subsets, sub.full_calls, sub.subset_calls) == ([4], 0, 4)
    # the subset's Fisher (2w² here) is the one in H_k = |M_k(D_k) − M_k(U)|
    ri = round_input(CountingServer())
    for k in range(4):
        wk = ri.global_weights + ri.updates[k]
        assert b.diagnostics["fisher_difference"][k] == pytest.approx(
            float((ri.fisher[k] - 2 * wk ** 2).abs().sum()))
        assert a.diagnostics["fisher_difference"][k] == pytest.approx(
            float((ri.fisher[k] - wk ** 2).abs().sum()))


@pytest.mark.integration
def test_sampled_sdfc_run_with_a_subset_of_u(tmp_path) -> None:
    base = {"experiment": {"name": "subset", "seed": 2},
            "data": {"dataset": "synthetic", "synthetic_train": 900, "synthetic_test": 100},
            "partition": {"beta": 0.0, "min_size": 5},
            "federation": {"clients": 30, "clients_per_round": 6, "rounds": 2, "local_epochs": 1,
                           "batch_size": 16, "lr": 0.05},
            "attack": {"fraction": 0.2}, "server": {"val_size": 64},
            "runtime": {"trainer": "sequential", "workers": 1}}
    runs = {}
    for name, opts in (("full", {}), ("sub", {"val_fisher_samples": 16}),
                       ("sub-again", {"val_fisher_samples": 16})):
        cfg = config.resolve({**base, "defense": {"name": "sdfc", "options": opts}})
        run(cfg, tmp_path / name, progress=None)
        runs[name] = [r["diagnostics"]["fisher_difference"] for r in RunDir(tmp_path / name).rounds()]
    assert runs["sub"] == runs["sub-again"]  # seeded: the same subsets, the same numbers
    assert runs["sub"][0] != runs["full"][0]  # and M_k(U) is not the whole-U one
    assert all(v is not None and v > 0 for r in runs["sub"] for v in r)
