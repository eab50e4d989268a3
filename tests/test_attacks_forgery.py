"""Upload forgeries (docs/attacks.md §4): exact vectors, the minimiser's importance, knowledge,
the engine seam, option errors, and one forged run per defense family."""

from __future__ import annotations

import pytest
import torch

from attack_harness import run_attack
from fisherguard.attacks import registry
from fisherguard.attacks.base import AttackConfigError, AttackContext
from fisherguard.attacks.fdcr_forgery import FDCRMinV, FDCRSteer, fisher_for, importance_for
from fisherguard.attacks.forgery import (CountForgery, CountInflation, FConst, FDRegSkip, FMimic,
                                         FMismatch, FNonfinite, FSpike, FZero, mask_topq, minmax)
from fisherguard.attacks.val_echo import FValEcho, recover_val_fisher, with_echo_margin
from fisherguard.attacks.plan import AttackPlan
from fisherguard.clients.fdreg import FDReg
from fisherguard.clients.plan import TrainPlan
from fisherguard.clients.training import Upload
from fisherguard.defenses.base import ClientPlan

pytestmark = pytest.mark.unit

P = 6
G = torch.zeros(P)
HONEST = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0, 0.25])
OWN = {3: [0.3, -0.01, 0.2, 0.5, 0.002, -0.4], 4: [0.1, 0.2, -0.3, 0.4, 0.5, 0.6]}
BENIGN = {0: [0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 1: [0.2, 0.0, 0.1, 0.3, 0.1, 0.2]}


def _uploads(rows, fisher=HONEST):
    return {k: Upload(k, torch.tensor(v), fisher=fisher.clone(), num_samples=10)
            for k, v in rows.items()}


def _ctx():
    return AttackContext(num_clients=5, attackers=[3, 4], seed=0, target=2,
                         plan=TrainPlan(epochs=1, batch_size=4, lr=0.5, momentum=0.0,
                                        weight_decay=0.0))


class SeamSpy:
    """A stand-in for the engine's ``RoundView.fisher``: records calls, returns a fixed vector."""

    def __init__(self, value=None):
        self.calls = []
        self.value = HONEST * 3 if value is None else value

    def __call__(self, k, w, data=None):
        self.calls.append((k, w.clone(), data))
        return self.value.clone()


def _run(stage, own=OWN, benign=BENIGN, fisher=None, plans=None, round_idx=0, server=None):
    plan = AttackPlan([stage])
    plan.bind(_ctx())
    uploads = {**_uploads(benign), **_uploads(own)}
    view = plan.round_view(round_idx, G, uploads, [3, 4], fisher=fisher or SeamSpy(),
                           plans=plans, server_fisher=server)
    return plan.after_training(view)


def test_f_zero_and_const_upload_the_specified_vectors():
    out = _run(FZero())
    assert torch.equal(out[3].fisher, torch.zeros(P))
    out = _run(FConst())
    assert torch.equal(out[4].fisher, torch.full((P,), float(HONEST.mean())))
    assert torch.equal(_run(FConst(c=2.5))[3].fisher, torch.full((P,), 2.5))


def test_f_spike_puts_s_where_the_update_is_smallest():
    out = _run(FSpike())
    want = torch.zeros(P)
    want[4] = 1e6  # |Δ| = 0.002 is client 3's smallest
    assert torch.equal(out[3].fisher, want)
    out = _run(FSpike(r=2, s=7.0))
    assert torch.equal(out[3].fisher, torch.tensor([0., 7., 0., 0., 7., 0.]))
    out = _run(FSpike(r=0.5))  # a fraction of P: 3 entries
    assert int((out[4].fisher > 0).sum()) == 3 and out[4].fisher[[0, 1, 2]].eq(1e6).all()


@pytest.mark.parametrize("mode,check", [
    ("nan", lambda f: bool(torch.isnan(f[0])) and torch.equal(f[1:], HONEST[1:])),
    ("inf", lambda f: f[0] == float("inf") and torch.equal(f[1:], HONEST[1:])),
    ("negative", lambda f: torch.equal(f, -HONEST)),
    ("missing", lambda f: f is None),
    ("shape", lambda f: f.shape == (P - 1,)),
])
def test_f_nonfinite_modes(mode, check):
    assert check(_run(FNonfinite(mode=mode))[3].fisher)


def test_count_forgery_and_inflation():
    assert _run(CountForgery())[3].num_samples == 0
    assert _run(CountForgery(mode="negative"))[4].num_samples == -10
    out = _run(CountInflation())
    assert out[3].num_samples == 100 and out[4].num_samples == 100
    assert _run(CountInflation(factor=2.5))[3].num_samples == 25


def test_fdreg_skip_turns_the_plan_non_compliant():
    assert AttackPlan([FZero()]).follow_protocol
    assert not AttackPlan([FZero(), FDRegSkip()]).follow_protocol


def test_mask_topq_zeroes_the_most_moved_coordinates():
    delta = torch.tensor([0.3, -0.01, 0.2, 0.5, 0.002, -0.4])
    f = mask_topq(HONEST, delta, q=0.2, eps=1e-12)
    # Q_0.8 of |Δ| is 0.4 (interpolated): 0.5 and 0.4 are masked
    assert torch.equal(f == 1e-12, torch.tensor([False, False, False, True, False, True]))
    out = _run(FMismatch(mode="mask_topq", q=0.2))
    assert torch.allclose(out[3].fisher, f)


def test_mismatch_clean_subset_and_stale_model_use_the_seam_at_the_right_weights():
    spy = SeamSpy()
    stage = FMismatch(mode="stale_model")
    out = _run(stage, fisher=spy)
    assert torch.equal(out[3].fisher, spy.value)
    assert all(torch.equal(w, G) and d is None for _, w, d in spy.calls)
    spy = SeamSpy()
    stage = FMismatch()
    ctx_data = object()
    stage.bind(_ctx())
    plan = AttackPlan([stage])
    plan.bind(AttackContext(num_clients=5, attackers=[3, 4], seed=0, target=2,
                            clean_data={3: ctx_data, 4: ctx_data}))
    view = plan.round_view(0, G, {**_uploads(BENIGN), **_uploads(OWN)}, [3, 4], fisher=spy)
    plan.after_training(view)
    assert [(k, d) for k, _, d in spy.calls] == [(3, ctx_data), (4, ctx_data)]
    assert torch.equal(spy.calls[0][1], torch.tensor(OWN[3]))


def test_f_mimic_omniscient_is_the_benign_mean_and_proxy_never_sees_benign():
    benign = _uploads(BENIGN, fisher=torch.arange(P, dtype=torch.float32))
    stage = FMimic(source="omniscient")
    plan = AttackPlan([stage])
    plan.bind(_ctx())
    view = plan.round_view(0, G, {**benign, **_uploads(OWN)}, [3, 4], fisher=SeamSpy())
    out = plan.after_training(view)
    assert torch.equal(out[3].fisher, torch.arange(P, dtype=torch.float32))
    proxy = FMimic()
    assert proxy.knowledge == "model"
    view = proxy.round_view(0, G, {**benign, **_uploads(OWN)}, [3, 4])
    assert view.benign is None


def test_f_mimic_rescale_matches_the_honest_range():
    from fisherguard.attacks.forgery import rescale_to

    f = rescale_to(torch.tensor([1.0, 3.0, 2.0]), HONEST)
    assert float(f.min()) == float(HONEST.min()) and float(f.max()) == float(HONEST.max())


def test_minimiser_importance_follows_the_rule_and_min_max_returns_it_exactly():
    g = torch.tensor([2.0, -1.0, 0.5, 0.0, 4.0, 1e-4])
    tau = torch.tensor([1.0, 1.0, 1.0, 3.0, -1.0, 0.2])
    i = importance_for(g, tau)
    # clip(τ/g): 0.5; opposite sign 0; 2 → 1; g = 0 → 0; opposite 0; the smallest |g| is g=0 → 1
    assert torch.equal(i, torch.tensor([0.5, 0.0, 1.0, 1.0, 0.0, 1.0]))
    for honest in (HONEST, torch.tensor([3e-7, 1e-9, 0., 0., 0., 0.])):
        f = fisher_for(i, honest)
        assert torch.equal(minmax(f), i)
        assert float(f.max()) / float(honest.max()) < 2 and float(f.max()) / float(
            honest.max()) > 0.5  # benign magnitude
    # no zero entry: one is forced to 0 so min-max keeps the scale
    j = importance_for(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert float(j.min()) == 0.0 and float(j.max()) == 1.0
    assert torch.equal(minmax(fisher_for(j, HONEST[:3])), j)


def test_fdcr_min_v_omniscient_uploads_a_fisher_whose_importance_is_the_minimiser():
    benign = _uploads(BENIGN, fisher=torch.arange(1, P + 1, dtype=torch.float32))
    stage = FDCRMinV(estimate="omniscient")
    plan = AttackPlan([stage])
    plan.bind(_ctx())
    view = plan.round_view(0, G, {**benign, **_uploads(OWN)}, [3, 4], fisher=SeamSpy())
    out = plan.after_training(view)
    eta, n = 0.5, 40.0
    b = sum((10 / n) * torch.tensor(v) / eta * minmax(torch.arange(1, P + 1, dtype=torch.float32))
            for v in BENIGN.values())
    tau = b / (1 - 0.5)
    want = importance_for(torch.tensor(OWN[3]) / eta, tau)
    assert torch.equal(minmax(out[3].fisher), want)
    assert torch.equal(out[3].weights, torch.tensor(OWN[3]))  # the backdoor update is kept


def test_fdcr_min_v_prev_global_uses_the_last_aggregate_step(monkeypatch):
    import fisherguard.attacks.fdcr_forgery as mod

    ref = torch.full((P,), 0.1)
    monkeypatch.setattr(mod, "clean_reference_fisher",
                        lambda a, r, view, k: (view.global_weights + ref, HONEST))
    stage = FDCRMinV()
    assert stage.knowledge == "model"
    stage.bind(_ctx())
    stage.prev = (0, torch.full((P,), -0.2))
    view = stage.round_view(1, G, _uploads(OWN), [3, 4], fisher=SeamSpy())
    tau = stage.target(view, 3)
    assert torch.allclose(tau, (G + 0.2) / 0.5 * minmax(HONEST))
    stage.prev = None  # round 0 / unseen: the clean reference update
    assert torch.allclose(stage.target(view, 3), ref / 0.5 * minmax(HONEST))


def test_fdcr_steer_colluders_upload_identical_pairs_and_never_see_benign(monkeypatch):
    import fisherguard.attacks.fdcr_forgery as mod

    monkeypatch.setattr(mod, "clean_reference_fisher",
                        lambda a, r, view, k: (view.global_weights + 0.1, HONEST))
    stage = FDCRSteer(estimate="clean_ref")
    assert stage.knowledge == "colluding"
    out = _run(stage)
    assert torch.equal(out[3].weights, out[4].weights)
    assert torch.equal(out[3].fisher, out[4].fisher)
    assert torch.allclose(out[3].weights, (torch.tensor(OWN[3]) + torch.tensor(OWN[4])) / 2)


@pytest.mark.parametrize("stage", [FZero(), FSpike(), FMismatch(), FMimic(), FValEcho(),
                                   FDCRMinV(), FDCRSteer(), CountInflation()])
def test_model_and_colluding_stages_never_receive_benign_uploads_or_the_oracle(stage):
    view = stage.round_view(0, G, {**_uploads(BENIGN), **_uploads(OWN)}, [3, 4],
                            server_fisher=lambda w: w)
    assert view.benign is None and view.server_fisher is None
    assert sorted(view.own) == [3, 4]
    seen = []
    stage.after_training = lambda v: seen.append((v.benign, v.server_fisher)) or v.own
    plan = AttackPlan([FMimic(source="omniscient"), stage])
    plan.after_training(plan.round_view(0, G, {**_uploads(BENIGN), **_uploads(OWN)}, [3, 4],
                                        server_fisher=lambda w: w))
    assert seen == [(None, None)]


def test_round_view_hands_over_own_plans_only():
    plans = {0: ClientPlan(), 3: ClientPlan(), 4: ClientPlan()}
    view = FZero().round_view(0, G, _uploads(OWN), [3, 4], plans=plans)
    assert sorted(view.plans) == [3, 4]


def test_val_echo_recovery_rule():
    m_u = torch.tensor([0.5, 1.0, 0.2, 0.0])
    sent = torch.zeros(4)
    assert torch.equal(recover_val_fisher(sent, (sent - m_u).abs(), None), m_u)  # exact probe
    sent = torch.tensor([0.4, 1.5, 0.1, 0.3])
    h = (sent - m_u).abs()
    tie = torch.tensor([0.45, 0.9, 0.3, 0.1])
    got = recover_val_fisher(sent, h, tie)
    # coordinate 2: 0.1 − 0.1 = 0 vs 0.2, tie 0.3 → 0.2; coordinate 3: 0 vs 0.6, tie → 0
    assert torch.allclose(got, m_u)


def test_val_echo_recovered_probes_then_echoes_the_returned_h():
    stage = FValEcho()
    m_u = torch.tensor([0.5, 1.0, 0.2, 0.3, 0.7, 0.9])
    out = _run(stage, own={3: OWN[3]})
    probe = out[3].fisher
    assert float(probe.max()) < 1e-29 and float(probe.max()) > float(probe.min()) > 0
    # the server returns H = |sent − M(U)| with the anchor = the uploaded model
    plans = {3: ClientPlan(regulariser=FDReg((probe - m_u).abs(), torch.tensor(OWN[3]), 1.0))}
    plan = AttackPlan([stage])
    plan.bind(_ctx())
    view = plan.round_view(1, G, _uploads({3: OWN[3]}), [3, 4], fisher=SeamSpy(),
                           plans=plans)
    out = plan.after_training(view)
    assert torch.allclose(out[3].fisher, m_u, atol=1e-12)
    # a plan not derived from our last upload (another anchor) leaves the estimate as it was
    other = {3: ClientPlan(regulariser=FDReg(torch.ones(P), torch.ones(P), 1.0))}
    view = plan.round_view(2, G, _uploads({3: OWN[3]}), [3, 4], fisher=SeamSpy(), plans=other)
    assert torch.equal(stage.recovered(view, 3), out[3].fisher)


def test_val_echo_oracle_reads_the_server_fisher_and_margin_sets_the_ratio():
    m_u = torch.tensor([0.5, 1.0, 0.2, 0.3, 0.7, 0.9])
    stage = FValEcho(source="oracle")
    assert stage.knowledge == "omniscient"
    out = _run(stage, server=lambda w: m_u.clone())
    assert torch.equal(out[3].fisher, m_u)
    f = with_echo_margin(m_u, 2e-3, torch.Generator().manual_seed(0))
    rho = float((f - m_u).abs().sum() / (f + m_u).sum())
    assert rho == pytest.approx(2e-3, rel=1e-5)


def test_forgeries_leave_uploads_alone_when_the_defense_reads_no_fisher():
    plan = AttackPlan([FSpike()])
    plan.bind(_ctx())
    view = plan.round_view(0, G, _uploads(OWN), [3, 4])
    assert torch.equal(plan.after_training(view)[3].fisher, HONEST)


@pytest.mark.parametrize("name,options,match", [
    ("f-spike", {"r": 0}, "option r"),
    ("f-spike", {"s": -1}, "option s"),
    ("f-const", {"c": "median"}, "option c"),
    ("f-nonfinite", {"mode": "zero"}, "option mode must be one of nan, inf"),
    ("count-forgery", {"mode": "huge"}, "option mode"),
    ("count-inflation", {"factor": 0}, "option factor"),
    ("f-mimic", {"source": "oracle"}, "option source must be one of proxy, omniscient"),
    ("f-mismatch", {"q": 5}, "option q"),
    ("f-mismatch", {"mode": "topq"}, "clean_subset, stale_model, mask_topq"),
    ("f-val-echo", {"source": "exact"}, "recovered, proxy, oracle"),
    ("f-val-echo", {"echo_margin": -1}, "option echo_margin"),
    ("fdcr-min-v", {"estimate": "global"}, "prev_global, clean_ref, omniscient"),
])
def test_option_errors_name_the_option_and_allowed_values(name, options, match):
    with pytest.raises(AttackConfigError, match=match):
        registry.build(name, options)


def test_every_forgery_is_registered_with_its_section():
    names = ["f-zero", "f-const", "f-spike", "f-nonfinite", "count-forgery", "count-inflation",
             "f-mimic", "f-mismatch", "f-val-echo", "fdcr-min-v", "fdcr-steer", "fdreg-skip"]
    for n in names:
        cls = registry.get(n)
        assert cls.paper.startswith("fisherguard threat analysis (docs/attacks.md §4.")
        assert cls.kind in ("upload forgery", "protocol deviation")


@pytest.mark.integration
def test_fdcr_with_f_spike_through_the_engine_and_the_seam_matches_the_client(tmp_path,
                                                                           monkeypatch):
    seen = []
    forge = FSpike.forge

    def spy(self, view, k, u):
        # the seam at the trained weights reproduces the client's own honest upload
        seen.append(torch.equal(view.fisher(k, u.weights, None), u.fisher))
        forge(self, view, k, u)
        seen.append(int((u.fisher > 0).sum()) == 1)

    monkeypatch.setattr(FSpike, "forge", spy)
    _, rounds, w = run_attack(tmp_path, "badnets+f-spike", **{"defense.name": "fdcr"})
    assert len(rounds) == 2 and bool(torch.isfinite(w).all())
    assert all(r["attack"]["active"] for r in rounds)
    assert len(seen) == 8 and all(seen)


@pytest.mark.integration
def test_sdfc_with_f_val_echo_recovers_the_server_fisher_through_the_engine(tmp_path,
                                                                           monkeypatch):
    sent = []
    forge = FValEcho.forge

    def spy(self, view, k, u):
        forge(self, view, k, u)
        sent.append((view.round_idx, k, u.fisher.to(torch.float64).clone()))

    monkeypatch.setattr(FValEcho, "forge", spy)
    _, rounds, w = run_attack(tmp_path / "rec", "badnets+f-val-echo",
                              **{"defense.name": "sdfc"})
    assert len(rounds) == 2 and bool(torch.isfinite(w).all())
    first = rounds[0]["diagnostics"]
    # round 1 probes: H = M(U) − probe, so the echo ratio is ≈ 1 and T_k = Σ M_k(U)
    assert first["echo_ratio"][3] > 0.99
    for r, k, f in sent:
        if r == 1:  # round 2 uploads the M(U) recovered from the returned H: Σ equals T_k
            assert float(f.sum()) == pytest.approx(first["fisher_difference"][k], rel=1e-4)
    assert sorted(k for r, k, _ in sent if r == 1) == [3, 4]
    # the named oracle echoes the exact M(U): the ratio collapses
    _, rounds, _ = run_attack(tmp_path / "oracle", "badnets+f-val-echo",
                              {"f-val-echo": {"source": "oracle"}}, **{"defense.name": "sdfc"})
    assert all(rounds[0]["diagnostics"]["echo_ratio"][k] is not None
               and rounds[0]["diagnostics"]["echo_ratio"][k] < 1e-6 for k in (3, 4))


@pytest.mark.integration
def test_fdcr_consistency_rule_refuses_the_echo_probe_through_the_engine(tmp_path):
    # under FDCR no H comes back, so f-val-echo uploads its probe ramp every round: a Fisher
    # that does not rank the coordinates the update moved (docs/algorithms.md §8.2)
    _, rounds, w = run_attack(tmp_path, "badnets+f-val-echo", **{
        "defense.name": "fdcr", "defense.options": {"fisher_update_consistency": 0.35}})
    assert len(rounds) == 2 and bool(torch.isfinite(w).all())
    for r in rounds:
        reasons, rho = r["clients"]["reasons"], r["diagnostics"]["update_consistency"]
        assert [reasons[k] for k in (3, 4)] == ["inconsistent"] * 2
        assert all(rho[k] < 0.35 for k in (3, 4))
        assert "inconsistent" not in reasons[:3]  # the honest clients
        assert r["detection"]["attacker_share"] == 0.0


@pytest.mark.integration
def test_fedavg_with_count_inflation_gives_attackers_the_weight(tmp_path):
    _, rounds, _ = run_attack(tmp_path, "badnets+count-inflation", **{"defense.name": "fedavg"})
    counts = rounds[0]["clients"]["num_samples"]
    share = rounds[0]["detection"]["attacker_share"]
    assert share > 0.8 and counts[3] % 10 == 0


@pytest.mark.integration
@pytest.mark.parametrize("defense", ["fedavg", "multi-krum", "fltrust"])
def test_fisher_forgeries_under_a_defense_that_reads_no_fisher_equal_plain_badnets(tmp_path,
                                                                                   defense):
    # the forgery matrix leaves these cells out for FedAvg, Multi-Krum and FLTrust
    # (configs/forgery-reference.yaml): the run is the plain BadNets run bit for bit (no forged
    # vector, no random draw, same records); fdreg-skip has no regulariser to skip there
    _, base, w0 = run_attack(tmp_path / "badnets", "badnets", **{"defense.name": defense})
    for forgery in ("f-zero", "f-const", "f-spike", "f-nonfinite", "f-mimic", "f-val-echo",
                    "f-mismatch", "fdcr-min-v", "fdcr-steer", "fdreg-skip"):
        _, forged, w1 = run_attack(tmp_path / forgery, f"badnets+{forgery}",
                                   **{"defense.name": defense})
        assert torch.equal(w0, w1), forgery
        assert [r["metrics"] for r in base] == [r["metrics"] for r in forged], forgery
        assert ([r["clients"]["weights"] for r in base]
                == [r["clients"]["weights"] for r in forged]), forgery


def test_stateful_forgeries_save_and_restore_their_state():
    echo = FValEcho()
    _run(echo, own={3: OWN[3]})
    again = FValEcho()
    again.load_state_dict(echo.state_dict())
    assert torch.equal(again.sent[3], echo.sent[3])
    assert torch.equal(again.sent_weights[3], echo.sent_weights[3])
    with pytest.raises(ValueError, match="unknown state keys"):
        again.load_state_dict({**echo.state_dict(), "x": 1})
    m = FDCRMinV()
    m.prev = (4, torch.ones(P))
    n = FDCRMinV()
    n.load_state_dict(m.state_dict())
    assert n.prev[0] == 4 and torch.equal(n.prev[1], torch.ones(P))


def test_class_balanced_subset_takes_the_rarest_count_of_every_class():
    from fisherguard.attacks.val_echo import class_balanced
    from fisherguard.data.transforms import Pipeline
    from fisherguard.clients.training import ClientDataset

    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    data = ClientDataset(labels=labels, pipeline=Pipeline(grey=True, out_channels=1),
                         frozen=torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1))
    sub = class_balanced(data, torch.Generator().manual_seed(0))
    assert sorted(sub.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(labels[sub.frozen.view(-1).long()], sub.labels)


def test_proxy_echo_takes_all_clean_samples_when_the_balanced_subset_gives_no_estimate():
    import dataclasses

    from fisherguard.clients.training import ClientDataset
    from fisherguard.data.transforms import Pipeline

    def data(labels):
        labels = torch.tensor(labels)
        return ClientDataset(labels=labels, pipeline=Pipeline(grey=True, out_channels=1),
                             frozen=torch.zeros(len(labels), 1, 1, 1))

    # client 3: classes 0 and 1 with 5 and 1 samples (balanced subset 2); client 4: 3 and 3
    clean = {3: data([0, 0, 0, 0, 0, 1]), 4: data([0, 0, 0, 1, 1, 1])}

    class BatchEstimator(SeamSpy):  # like the release estimator: zeros without a full batch of 4
        def __call__(self, k, w, data=None):
            self.calls.append((k, w.clone(), data))
            n = len(data.labels)
            return torch.zeros(P) if n < 4 else HONEST * n

    plan = AttackPlan([FValEcho(source="proxy")])
    plan.bind(dataclasses.replace(_ctx(), clean_data=clean))
    seam = BatchEstimator()
    view = plan.round_view(0, G, {**_uploads(BENIGN), **_uploads(OWN)}, [3, 4], fisher=seam)
    out = plan.after_training(view)
    assert [(k, len(d.labels)) for k, _, d in seam.calls] == [(3, 2), (3, 6), (4, 6)]
    assert torch.equal(out[3].fisher, HONEST * 6)  # all six clean samples, not zeros
    assert torch.equal(out[4].fisher, HONEST * 6)  # the balanced subset (3 + 3) sufficed


@pytest.mark.integration
def test_a_forged_fisher_survives_the_byzantine_recompute(tmp_path):
    _, rounds, _ = run_attack(tmp_path, "sign-flip+f-zero", **{"defense.name": "fdcr"})
    assert rounds[0]["clients"]["reasons"][3:] == ["constant", "constant"]


def test_minimiser_hardening_aware_variant_raises_the_mean_importance_on_small_gradients():
    from fisherguard.attacks.fdcr_forgery import raise_mean

    g = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    i = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    j = raise_mean(i, g, 0.5)
    # the three smallest |g| (0.5 already 1, then 1.0, 2.0) get I = 1: mean 0.5
    assert torch.equal(j, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    assert float(raise_mean(i, g, 0.99).min()) == 0.0  # one 0 kept for min-max
    stage = FDCRMinV(min_mean=0.5)
    f = stage.crafted(g, torch.zeros(P), HONEST)
    assert float(minmax(f).mean()) >= 0.5
    with pytest.raises(AttackConfigError, match="option min_mean"):
        FDCRMinV(min_mean=2)


@pytest.mark.integration
@pytest.mark.parametrize("name,defense", [("badnets+f-val-echo", "sdfc"),
                                          ("badnets+fdcr-min-v", "fdcr")])
def test_stateful_forgeries_resume_after_kill_equal_an_uninterrupted_run(name, defense,
                                                                         tmp_path):
    import json

    from attack_harness import attack_config
    from fisherguard.engine.runner import run

    def records(out):
        clock = ("wall_time_s", "timing", "attack_reference_s")
        rows = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in clock} for r in rows]

    cfg = attack_config(name, None, **{"federation.rounds": 3, "defense.name": defense})
    run(cfg, tmp_path / "whole", progress=None)
    run(cfg, tmp_path / "resumed", progress=None, stop_after=2)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["attack_state"]["stages"][1], "the checkpoint holds the forgery's state"
    run(cfg, tmp_path / "resumed", resume=True, progress=None)
    assert records(tmp_path / "whole") == records(tmp_path / "resumed")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["weights"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["weights"]
    assert torch.equal(a, b)


@pytest.mark.integration
def test_server_count_cap_sets_the_bound_on_claimed_counts(tmp_path):
    """``server.count_cap`` (algorithms.md §8.3) reaches the defense: the attackers' inflated
    counts are clipped to cap × the round's lower median, and null turns the bound off."""
    shares = {}
    for cap in (None, 1.0):
        _, rounds, _ = run_attack(tmp_path / str(cap), "badnets+count-inflation",
                                  **{"defense.name": "fedavg", "server.count_cap": cap})
        counts = rounds[0]["clients"]["num_samples"]  # what the clients claimed
        honest, liars = sorted(counts[:3]), counts[3:]
        bound = liars if cap is None else [cap * sorted(counts)[2]] * 2
        expected = 100 * sum(bound) / (sum(bound) + sum(honest))
        shares[cap] = rounds[0]["detection"]["attacker_share"]
        assert shares[cap] == pytest.approx(expected, rel=1e-6)
    assert shares[1.0] < 50 < shares[None]
