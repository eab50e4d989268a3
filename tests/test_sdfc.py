"""SDFC (docs/algorithms.md §5, docs/algorithms.md §8.2): worked examples C, D, the echo rule of F, FDReg and FDAgg."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Callable

import pytest
import torch

from fisherguard.clients.fdreg import FDReg
from fisherguard.defenses import registry
from fisherguard.defenses.base import DefenseConfigError, PlanInput, RoundInput
from fisherguard.defenses.sdfc import SDFC, echo_ratio, fdagg_weights, fisher_difference
from fisherguard.models import SimpleCNN, flatten, trainable

pytestmark = pytest.mark.unit

D = torch.float64
TOL = dict(atol=1e-6, rtol=0)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=D)


class FakeServer:
    """ServerData stand-in: M(U) as a function of the weights; records every call."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int = 16) -> None:
        self.fn, self.size, self.calls = fn, size, []

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        self.calls.append(weights.clone())
        return self.fn(weights)

    def train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------ Example C


def test_example_c_fdagg() -> None:
    T = t(2, 4, 6, 10)
    sig = fdagg_weights(T, "sigmoid")
    torch.testing.assert_close(sig, t(0.315596, 0.276350, 0.238301, 0.169754), **TOL)
    soft = fdagg_weights(T, "softmax")
    torch.testing.assert_close(soft, t(0.363212, 0.282870, 0.220299, 0.133619), **TOL)
    assert float(sig.max() / sig.min()) == pytest.approx(1.859141, abs=1e-6)
    assert float(soft.max() / soft.min()) == pytest.approx(math.e, abs=1e-6)
    torch.testing.assert_close(torch.sigmoid(-(T - 2) / 8), t(0.5, 0.437823, 0.377541, 0.268941), **TOL)
    for kind in ("sigmoid", "softmax"):
        torch.testing.assert_close(fdagg_weights(t(3, 3, 3), kind), t(1 / 3, 1 / 3, 1 / 3), **TOL)
        torch.testing.assert_close(fdagg_weights(t(7), kind), t(1.0), **TOL)


def test_fdagg_bounds_of_section_5_4() -> None:
    # attackers 0–2 at T̂ = 1, seven benign at 0: share 18.73 % (sigmoid) / 13.62 % (softmax)
    T = t(1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
    assert float(fdagg_weights(T, "sigmoid")[:3].sum()) == pytest.approx(0.1873, abs=1e-4)
    assert float(fdagg_weights(T, "softmax")[:3].sum()) == pytest.approx(0.1362, abs=1e-4)


# ------------------------------------------------------------------ Example D


def test_example_d_difference_and_fdreg() -> None:
    md, mu = t(0.5, 1, 3, 1.5), t(1, 1, 1, 0.5)
    h = fisher_difference(md, mu)
    torch.testing.assert_close(h, t(0.5, 0, 2, 1), **TOL)
    assert float(h.sum()) == pytest.approx(3.5)
    torch.testing.assert_close(fisher_difference(md, None, "local_only"), md, **TOL)
    torch.testing.assert_close(fisher_difference(None, mu, "val_only"), mu, **TOL)
    reg = FDReg(h, t(1, 1, 2, 2), 5.0)
    w = t(1, 2, 3, 4).requires_grad_(True)
    pen = reg.penalty([w])
    assert float(pen.detach()) == pytest.approx(30.0, abs=1e-9)
    (gw,) = torch.autograd.grad(pen, [w])
    torch.testing.assert_close(gw, t(0, 0, 20, 20), **TOL)
    # split over several tensors in protocol order: same value
    a, b = t(1, 2).requires_grad_(True), t(3, 4).reshape(1, 2).requires_grad_(True)
    assert float(reg.penalty([a, b]).detach()) == pytest.approx(30.0, abs=1e-9)
    assert reg.kind == "fdreg"


def test_example_f_echo() -> None:
    m = t(0.5, 1, 3, 1.5)
    assert echo_ratio(m, m) == 0.0
    assert echo_ratio(t(0.5, 1, 3, 1.5), t(1, 1, 1, 0.5)) == pytest.approx(3.5 / 9.5)


def test_fdreg_on_simplecnn_matches_flat_formula() -> None:
    torch.manual_seed(0)
    model = SimpleCNN()
    p = flatten(model).numel()
    h = torch.rand(p)
    anchor = flatten(model) + 0.01 * torch.randn(p)
    reg = FDReg(h, anchor, 2.0)
    params = trainable(model)
    pen = reg.penalty(params)
    flat = flatten(model)
    assert float(pen.detach()) == pytest.approx(float(2.0 * (h * (flat - anchor) ** 2).sum()), rel=1e-5)
    pen.backward()
    g = torch.cat([q.grad.reshape(-1) for q in params])
    torch.testing.assert_close(g, 4.0 * h * (flat - anchor), rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError):
        reg.penalty(params[:-1])
    with pytest.raises(ValueError):
        FDReg(-h, anchor, 1.0)


# ------------------------------------------------------------------ server side


def example_round(echo_client: bool = False) -> tuple[RoundInput, FakeServer]:
    """Clients whose M(D) sits at different distances from a fixed M(U) (Example D's)."""
    mu = t(1, 1, 1, 0.5)
    local = torch.stack([t(0.5, 1, 3, 1.5), t(1.3, 1, 1, 0.7), t(4, 4, 5, 4), t(1, 2, 1, 1)])
    if echo_client:
        local[3] = mu
    server = FakeServer(lambda w: mu.clone())
    upd = torch.tensor([[0.1, 0, 0, 0], [0, 0.2, 0, 0], [0, 0, 0.3, 0], [0, 0, 0, 0.4]], dtype=D)
    ri = RoundInput(global_weights=t(1, 1, 1, 1), updates=upd, fisher=local,
                    num_samples=t(10, 20, 30, 40), client_ids=[0, 1, 2, 3], server_data=server)
    return ri, server


def test_aggregate_weights_and_model() -> None:
    ri, server = example_round()
    sdfc = SDFC()
    agg = sdfc.aggregate(ri)
    T = t(3.5, 0.5, 13.5, 1.5)
    expected = fdagg_weights(T, "sigmoid")
    torch.testing.assert_close(agg.client_weights, expected, **TOL)
    assert agg.diagnostics["fisher_difference"] == pytest.approx(T.tolist())
    assert agg.diagnostics["weight"] == pytest.approx(expected.tolist())
    torch.testing.assert_close(agg.new_weights, ri.global_weights + expected @ ri.updates, **TOL)
    assert float(agg.client_weights.sum()) == pytest.approx(1.0)
    # M_k(U) is computed on each uploaded model w_k = w^t + Δ_k
    assert len(server.calls) == 4
    for k in range(4):
        torch.testing.assert_close(server.calls[k], ri.global_weights + ri.updates[k])
    # ignores n_k: the same uploads with other counts give the same weights
    ri2, _ = example_round()
    ri2.num_samples = t(1, 1, 1, 1000)
    torch.testing.assert_close(SDFC().aggregate(ri2).client_weights, expected, **TOL)
    code = SDFC(preset="code").aggregate(example_round()[0])
    torch.testing.assert_close(code.client_weights, fdagg_weights(T, "softmax"), **TOL)
    fedavg = SDFC(use_fdagg=False).aggregate(example_round()[0])
    torch.testing.assert_close(fedavg.client_weights, t(0.1, 0.2, 0.3, 0.4), **TOL)


def test_echo_rejected_only_with_hardening() -> None:
    ri, _ = example_round(echo_client=True)
    agg = SDFC().aggregate(ri)
    assert agg.reasons == [None, None, None, "echo"] and float(agg.client_weights[3]) == 0.0
    assert float(agg.client_weights.sum()) == pytest.approx(1.0)
    for off in (SDFC(hardening="off"), SDFC(echo_rtol=None)):
        res = off.aggregate(example_round(echo_client=True)[0])
        assert res.reasons[3] is None
        assert float(res.client_weights[3]) == float(res.client_weights.max())  # T = 0: largest weight


def test_stale_echo_refuses_the_last_rounds_server_fisher_and_survives_a_refusal() -> None:
    # issue 15: the recovered echo uploads M(U) of the client's previous upload, which the server
    # computed last round; honest uploads are checked against it too and pass
    vals = iter([t(1, 1, 1, 0.5), t(2, 1, 1, 1), t(3, 1, 2, 1)])
    current = {"v": next(vals)}
    server = FakeServer(lambda w: current["v"].clone())
    local = torch.stack([t(0.5, 1, 3, 1.5), t(1.3, 1, 1, 0.7), t(4, 4, 5, 4), t(1, 2, 1, 1)])
    upd = torch.tensor([[0.1, 0, 0, 0], [0, 0.2, 0, 0], [0, 0, 0.3, 0], [0, 0, 0, 0.4]], dtype=D)

    def round_with(fisher: torch.Tensor) -> RoundInput:
        return RoundInput(global_weights=t(1, 1, 1, 1), updates=upd, fisher=fisher,
                          num_samples=t(10, 20, 30, 40), client_ids=[0, 1, 2, 3], server_data=server)

    sdfc = SDFC(stale_echo_rtol=0.05)
    first = sdfc.aggregate(round_with(local))
    assert first.reasons == [None] * 4 and first.diagnostics["stale_echo_ratio"] == [None] * 4
    echo = local.clone()
    echo[3] = t(1, 1, 1, 0.5)  # last round's M(U), now stale: the current one is (2, 1, 1, 1)
    current["v"] = next(vals)
    second = sdfc.aggregate(round_with(echo))
    assert second.reasons == [None, None, None, "stale_echo"]
    assert second.diagnostics["stale_echo_ratio"][3] == 0.0
    assert second.diagnostics["echo_ratio"][3] == pytest.approx(1.5 / 8.5)  # the plain check passes it
    assert min(second.diagnostics["stale_echo_ratio"][:3]) > 0.05
    # refused, the client loses its FDReg history but not the M(U) it is checked against
    assert 3 not in sdfc.state_dict()["client_ids"]
    current["v"] = next(vals)
    echo[3] = t(2, 1, 1, 1)  # the echo of the refused round's M(U)
    assert sdfc.aggregate(round_with(echo)).reasons[3] == "stale_echo"
    restored = SDFC(stale_echo_rtol=0.05)
    restored.load_state_dict(sdfc.state_dict())
    torch.testing.assert_close(restored._last_val.row(3), t(3, 1, 2, 1).float())
    # 0 records without refusing; off by default (no ratio recorded)
    rec = SDFC(stale_echo_rtol=0)
    rec.aggregate(example_round()[0])
    assert rec.aggregate(example_round(echo_client=True)[0]).reasons == [None, None, None, "echo"]
    assert "stale_echo_ratio" not in SDFC().aggregate(example_round()[0]).diagnostics


def test_update_consistency_option_refuses_a_fisher_that_ranks_other_coordinates() -> None:
    ri, _ = example_round()
    # client 0 moved coordinate 0 only, where its M(D) is smallest: ρ < 0
    agg = SDFC(fisher_update_consistency=0.0).aggregate(ri)
    rho = agg.diagnostics["update_consistency"]
    assert rho[0] < 0 and agg.reasons[0] == "inconsistent"
    assert [r is None for r in agg.reasons[1:]] == [x >= 0 for x in rho[1:]]
    recorded = SDFC(fisher_update_consistency=-1).aggregate(example_round()[0])
    assert recorded.reasons == [None] * 4 and recorded.diagnostics["update_consistency"] == rho
    with pytest.raises(DefenseConfigError, match="fisher_update_consistency"):
        SDFC(fisher_update_consistency=2)
    with pytest.raises(DefenseConfigError, match="stale_echo_rtol"):
        SDFC(stale_echo_rtol=-0.1)


def test_invalid_uploads_flagged_never_crash() -> None:
    p = 4
    server = FakeServer(lambda w: torch.ones(p, dtype=D))
    ups = [t(0.1, 0, 0, 0), t(math.nan, 0, 0, 0), t(0, 0, 0, 0.1), t(0, 0, 0.1), t(0.2, 0, 0, 0)]
    fis = [t(0.5, 1, 3, 1.5), t(1, 2, 3, 4), None, t(1, 2, 3, 4), t(1, 2, 3, math.inf)]
    ri = RoundInput.from_uploads(t(0, 0, 0, 0), ups, [5, 5, 5, 5, 5], list(range(5)),
                                 fisher=fis, server_data=server)
    agg = SDFC().aggregate(ri)
    assert agg.reasons == [None, "non_finite", "missing", "bad_shape", "non_finite"]
    torch.testing.assert_close(agg.client_weights, t(1, 0, 0, 0, 0), **TOL)
    torch.testing.assert_close(agg.new_weights, t(0.1, 0, 0, 0), **TOL)
    # a model the server's Fisher cannot evaluate is rejected, not propagated as NaN
    bad = FakeServer(lambda w: torch.full((p,), math.nan, dtype=D) if w[0] > 0.05 else torch.ones(p, dtype=D))
    ri2 = RoundInput(global_weights=t(0, 0, 0, 0), updates=torch.stack([t(0.1, 0, 0, 0), t(0, 0.1, 0, 0)]),
                     fisher=torch.stack([t(1, 2, 3, 4), t(1, 2, 3, 5)]), num_samples=t(1, 1),
                     client_ids=[0, 1], server_data=bad)
    agg2 = SDFC().aggregate(ri2)
    assert agg2.reasons == ["non_finite", None] and bool(torch.isfinite(agg2.new_weights).all())
    # nobody valid: w^t back unchanged
    ri3 = RoundInput(global_weights=t(0, 0, 0, 0), updates=torch.zeros(2, p, dtype=D),
                     fisher=None, num_samples=t(1, 1), client_ids=[0, 1], server_data=server)
    agg3 = SDFC().aggregate(ri3)
    assert agg3.status == "no_valid_clients" and torch.equal(agg3.new_weights, t(0, 0, 0, 0))


def test_attackers_get_lower_weight() -> None:
    g = torch.Generator().manual_seed(0)
    p, k = 300, 10
    mu = torch.exp(torch.randn(p, generator=g, dtype=D))
    local = mu * (1 + torch.rand(k, p, generator=g, dtype=D))  # honest ρ ≈ 0.2
    local[7:] = mu * (3 + torch.rand(3, p, generator=g, dtype=D))  # poisoned data: M(D) far from M(U)
    ri = RoundInput(global_weights=torch.zeros(p, dtype=D),
                    updates=0.01 * torch.randn(k, p, generator=g, dtype=D), fisher=local,
                    num_samples=torch.full((k,), 100.0, dtype=D), client_ids=list(range(k)),
                    server_data=FakeServer(lambda w: mu))
    for preset in ("paper", "code"):
        w = SDFC(preset=preset).aggregate(ri).client_weights
        assert float(w[7:].max()) < float(w[:7].min())
        assert float(w[7:].sum()) < 0.3 and bool((w > 0).all())


# ------------------------------------------------------------------ client side and state


def make_plan_input(t_idx: int, wt: torch.Tensor, server: FakeServer, ids=(0, 1, 2, 3)):
    """Phase-1 input of a plan, and the list that records which client Fishers were asked for."""
    calls: list[tuple[int, torch.Tensor]] = []
    return PlanInput(round_idx=t_idx, global_weights=wt, client_ids=list(ids),
                     server_data=server), calls


def two_phase(defense, pi: PlanInput, calls: list) -> dict:
    """What the engine does: ask for the Fishers phase 1 names, then plan with them."""
    wanted = defense.plan_fisher_requests(pi)
    calls.extend((cid, w.clone()) for cid, w in wanted.items())
    fishers = {cid: t(0.5, 1, 3, 1.5) * (cid + 1) for cid in wanted}
    return defense.plan_clients(dataclasses.replace(pi, client_fishers=fishers))


def test_plan_round_zero_and_history() -> None:
    ri, server = example_round()
    sdfc = SDFC()
    wt = ri.global_weights
    pi, calls = make_plan_input(0, wt, server)
    plans = two_phase(sdfc, pi, calls)
    assert sorted(plans) == [0, 1, 2, 3]
    # round 0: anchor w^t, H at w^t from both Fishers
    assert [c for c, _ in calls] == [0, 1, 2, 3] and all(torch.equal(w, wt) for _, w in calls)
    assert torch.equal(server.calls[0], wt)
    reg = plans[2].regulariser
    assert isinstance(reg, FDReg) and reg.lam == 5.0
    torch.testing.assert_close(reg.importance.to(D), (t(0.5, 1, 3, 1.5) * 3 - t(1, 1, 1, 0.5)).abs(),
                               **TOL)
    torch.testing.assert_close(reg.anchor.to(D), wt, **TOL)

    # after a round: own H_k and anchor w_k, no client round trip
    ri, server = example_round()
    sdfc.aggregate(ri)
    new_wt = t(9, 9, 9, 9)
    pi, calls = make_plan_input(1, new_wt, server)
    plans = two_phase(sdfc, pi, calls)
    assert calls == []
    reg = plans[1].regulariser
    torch.testing.assert_close(reg.importance.to(D), t(0.3, 0, 0, 0.2), **TOL)
    torch.testing.assert_close(reg.anchor.to(D), ri.global_weights + ri.updates[1], **TOL)
    glob = SDFC(anchor="global")
    glob.aggregate(example_round()[0])
    reg_g = two_phase(glob, *make_plan_input(1, new_wt, server))[1].regulariser
    torch.testing.assert_close(reg_g.anchor.to(D), new_wt, **TOL)
    torch.testing.assert_close(reg_g.importance.to(D), t(0.3, 0, 0, 0.2), **TOL)
    assert two_phase(SDFC(use_fdreg=False), pi, calls) == {} and calls == []


def test_rejected_client_loses_history_and_state_roundtrip() -> None:
    sdfc = SDFC()
    sdfc.aggregate(example_round()[0])
    sdfc.aggregate(example_round(echo_client=True)[0])
    state = sdfc.state_dict()
    assert state["client_ids"] == [0, 1, 2]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = SDFC()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    ri, server = example_round()
    pi, calls = make_plan_input(2, t(0, 0, 0, 0), server)
    plans = two_phase(restored, pi, calls)
    assert [c for c, _ in calls] == [3]  # only the rejected client starts afresh
    for cid in (0, 1, 2):
        torch.testing.assert_close(plans[cid].regulariser.anchor,
                                   two_phase(sdfc, pi, [])[cid].regulariser.anchor)
    with pytest.raises(ValueError):
        restored.load_state_dict({"bogus": 1})


def test_fisher_options_and_presets() -> None:
    paper, code = SDFC(), SDFC(preset="code")
    assert paper.fisher_options() == {"estimator": "per_sample", "label_source": "dataset",
                                      "importance_metric": "squared"}
    assert code.fisher_options()["estimator"] == "official_label_mixed"
    assert (paper.lambda_reg, code.lambda_reg) == (5.0, 1.0)
    assert (paper.fdagg_weights, code.fdagg_weights) == ("sigmoid", "softmax")
    assert SDFC(importance_metric="abs").fisher_options()["importance_metric"] == "abs"
    assert SDFC.needs_fisher and SDFC.needs_server_data and SDFC.client_regulariser == "fdreg"


def test_registry_and_bad_options() -> None:
    d = registry.build("sdfc", {"preset": "code", "lambda_reg": 5})
    assert isinstance(d, SDFC) and d.lambda_reg == 5.0
    for opts, name in [({"lambda_reg": -1}, "lambda_reg"), ({"fdagg_weights": "max"}, "fdagg_weights"),
                       ({"anchor": "prev"}, "anchor"), ({"difference": "rel"}, "difference"),
                       ({"echo_rtol": 0}, "echo_rtol"), ({"use_fdreg": 1}, "use_fdreg"),
                       ({"importance_metric": "cube"}, "importance_metric"),
                       ({"hardening": "yes"}, "hardening"), ({"attacker_ids": [1]}, "attacker_ids")]:
        with pytest.raises(DefenseConfigError, match=name):
            registry.build("sdfc", opts)
