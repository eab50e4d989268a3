"""The shared parts of every defense: constructor parameters (get_params) and the round template."""

import pytest
import torch

from fisherguard.defenses import registry
from fisherguard.defenses.base import (Defense, MissingServerDataError, RoundInput,
                                       constructor_params)

pytestmark = pytest.mark.unit

NAMES = sorted(registry.available())

# One non-default option set per defense, so the round trip also carries values that differ
# from the constructor's defaults (and the preset-resolved ones).
NON_DEFAULT = {
    "bulyan": {"f": 1, "assumed_attackers": 2, "on_violation": "raise", "preset": "code"},
    "crfl": {"slope": 1.5, "offset": 5.0, "rho_max": 9.0, "sigma": 0.0, "seed": 3, "preset": "code"},
    "dnc": {"b": 50, "niters": 2, "c": 0.5, "f": 2, "weighted": True, "seed": 1, "preset": "code"},
    "fdcr": {"preset": "code", "clustering": "kmeans", "importance_scope": "layer",
             "layer_sizes": [4, 2], "param_slice": [0, 3], "max_drop_fraction": 0.5,
             "min_silhouette": None, "support_ratio": 4.0, "seed": 7},
    "fdcr-oracle": {"fisher_estimator": "per_sample", "seed": 2},
    "fedavg": {"weights": "uniform"},
    "finetuning": {"epochs": 0, "weights": "uniform"},
    "fltrust": {"server_epochs": 3},
    "foolsgold": {"kappa": 2.0, "epsilon": 0.0, "clip_norm": None, "preset": "code", "seed": 4},
    "krum": {"f": 1, "assumed_attackers": 3, "on_violation": "raise", "preset": "code"},
    "median": {},
    "mma": {"p": 0.5, "vectors": "deltas"},
    "multi-krum": {"m": 3, "weighted": True, "f": 1, "preset": "code"},
    "rfa": {"nu": 1e-3, "max_iter": 5, "ftol": 0.0, "weights": "uniform"},
    "rlr": {"theta": 2, "server_lr": 0.5, "preset": "code", "seed": 9},
    "rsa": {"lam": 0.1, "mu": 0.0, "c": 0.5, "client_init": "global"},
    "sageflow": {"entropy_threshold": 1.0, "delta": 2.0, "use_sample_counts": True,
                 "preset": "code"},
    "sdfc": {"preset": "code", "lambda_reg": 2.0, "anchor": "global", "use_fdreg": False,
             "difference": "local_only", "importance_metric": "abs", "hardening": "off",
             "echo_rtol": None},
    "trimmed-mean": {"beta": 0.2, "assumed_attackers": 1, "preset": "code"},
}


def test_every_defense_has_a_non_default_case() -> None:
    assert sorted(NON_DEFAULT) == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", ["defaults", "non_default"])
def test_get_params_round_trip(name: str, variant: str) -> None:
    options = NON_DEFAULT[name] if variant == "non_default" else {}
    d = registry.build(name, options)
    params = d.get_params()
    assert list(params) == constructor_params(type(d))
    for key, value in options.items():
        assert params[key] == value, key  # the attribute holds what was passed
    assert type(d)(**params).get_params() == params
    assert registry.build(name, params).get_params() == params


def test_get_params_resolves_preset_defaults() -> None:
    p = registry.build("fdcr", {"preset": "code"}).get_params()
    assert (p["discrepancy"], p["fpra_when_single_cluster"], p["fisher_estimator"]) == (
        "l2", False, "official_label_mixed")
    assert registry.build("rlr").get_params()["theta"] == 4.0


def test_get_params_names_a_missing_attribute() -> None:
    class Careless(Defense):
        def __init__(self, *, alpha: float = 1.0) -> None:
            self._alpha = alpha

    with pytest.raises(AttributeError, match="alpha"):
        Careless().get_params()


# ------------------------------------------------------------------ the round template


@pytest.mark.parametrize("name", NAMES)
def test_no_defense_overrides_aggregate(name: str) -> None:
    assert registry.get(name).aggregate is Defense.aggregate


def _round(server_data=None) -> RoundInput:
    g = torch.Generator().manual_seed(0)
    return RoundInput(global_weights=torch.zeros(6), updates=0.01 * torch.randn(5, 6, generator=g),
                      num_samples=torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]),
                      client_ids=[0, 1, 2, 3, 4], fisher=torch.rand(5, 6, generator=g) + 0.1,
                      server_data=server_data)


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).needs_server_data])
def test_missing_server_data_is_one_error(name: str) -> None:
    d = registry.build(name, {"epochs": 2} if name == "finetuning" else {})
    with pytest.raises(MissingServerDataError, match=rf"'{name}' needs the server's clean data"):
        d.aggregate(_round())
    # the copies it replaced raised ValueError (FLTrust, Sageflow, Finetuning) or RuntimeError (SDFC)
    assert issubclass(MissingServerDataError, ValueError)
    assert issubclass(MissingServerDataError, RuntimeError)


@pytest.mark.parametrize("name,options", [("finetuning", {"epochs": 0}),
                                          ("sdfc", {"difference": "local_only"})])
def test_configurations_that_never_read_server_data_run_without_it(name: str, options) -> None:
    d = registry.build(name, options)
    assert d.needs_server_data and not d.requires_server_data()
    out = d.aggregate(_round())
    assert out.status == "ok" and bool(torch.isfinite(out.new_weights).all())


@pytest.mark.parametrize("name", NAMES)
def test_nobody_valid_keeps_the_global_model(name: str) -> None:
    d = registry.build(name, {})
    if d.needs_attacker_ids:
        with pytest.warns(UserWarning):
            d.receive_attacker_ids([1])  # type: ignore[attr-defined]
    ri = _round()
    ri.updates[:] = float("nan")
    out = d.aggregate(ri)  # no server data needed: the round ends before the rule runs
    assert out.status == "no_valid_clients" and torch.equal(out.new_weights, ri.global_weights)
    assert out.reasons == ["non_finite"] * 5 and bool(out.flagged.all())


# ------------------------------------------------------------------ rooms


def test_clients_never_import_defenses() -> None:
    """Defenses are the higher room: no module under fisherguard.clients imports them, not even
    inside a function."""
    import ast
    from pathlib import Path

    import fisherguard.clients

    for path in Path(fisherguard.clients.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.startswith("fisherguard.defenses") for n in names), (path.name, names)


def test_weighted_sum_works_in_column_blocks_of_any_size() -> None:
    from fisherguard.defenses.base import weighted_sum

    rows = torch.arange(30, dtype=torch.float32).reshape(3, 10)  # small integers: exact sums
    alpha = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    expected = 0.5 * rows[0].double() + 0.25 * rows[1].double() + 0.25 * rows[2].double()
    for block in (1, 3, 10, 64):
        got = weighted_sum(alpha, rows, block)
        assert got.dtype == torch.float64 and torch.equal(got, expected)
