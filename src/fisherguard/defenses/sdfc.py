"""SDFC (Huang et al., ECCV 2024): Fisher discrepancy regularisation and aggregation.

Server part (FDAgg, SDFC Eq. 10) in ``combine``; client part (FDReg, Eq. 9) handed out by
``plan_clients`` as ``clients.fdreg.FDReg``. docs/algorithms.md §5 and docs/algorithms.md §8.2 (echo check). Equation
numbers refer to the SDFC paper. Server statistics are float64.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fisherguard.clients.fdreg import FDReg
from fisherguard.defenses.base import (PRESETS, SUSPICION, Aggregate, ClientPlan, Combined, Defense,
                                       MissingServerDataError, PlanInput, RoundInput, Rows,
                                       check_choice, check_flag, check_range,
                                       fisher_estimator_option, reject_all, weighted_sum)
from fisherguard.defenses.client_rows import ClientRows
from fisherguard.defenses.fdcr import update_consistency
from fisherguard.fisher import IMPORTANCE_METRICS

Tensor = torch.Tensor

DIFFERENCES = ("abs_diff", "local_only", "val_only")
# The echo check's default threshold on ρ_k (docs/algorithms.md §8.2): honest real uploads gave
# ρ ≥ 0.324 (tests/fixtures/fisher_real.npz, 30 uploads) and ≥ 0.126 in issue 15's runs; 0.05
# sits 2.5× below the smaller. A rescaled echo (×1.01: ρ = 0.005) or echo + 1 % noise
# (ρ ≈ 0.004) falls far below it.
ECHO_RTOL = 0.05


def fisher_difference(local: Tensor | None, val: Tensor | None, kind: str = "abs_diff") -> Tensor:
    """H_k = |M_k(D_k) − M_k(U)| (SDFC Eqs. 7a–8b); ``local_only`` / ``val_only`` are the Tab. 4 ablations.

    The Fisher a variant does not use may be None.
    """
    if kind not in DIFFERENCES:
        raise ValueError(f"difference must be one of {DIFFERENCES}, got {kind!r}")
    if kind != "val_only" and local is None or kind != "local_only" and val is None:
        raise ValueError(f"difference {kind!r} needs the Fisher it is named after")
    if kind == "abs_diff":
        return (local.to(torch.float64) - val.to(torch.float64)).abs()  # type: ignore[union-attr]
    if kind == "local_only":
        return local.to(torch.float64)  # type: ignore[union-attr]
    return val.to(torch.float64)  # type: ignore[union-attr]


def echo_ratio(local: Tensor, val: Tensor) -> float:
    """ρ_k = Σ_v |M_k(D_k) − M_k(U)| / Σ_v (M_k(D_k) + M_k(U)), the echo statistic (docs/algorithms.md §8.2, after SDFC Eq. 8b)."""
    lo, va = local.to(torch.float64), val.to(torch.float64)
    denom = float((lo + va).sum())
    return float((lo - va).abs().sum()) / denom if denom > 0 else 0.0


def fdagg_weights(totals: Tensor, kind: str = "sigmoid") -> Tensor:
    """α_k = σ(−T̂_k)/Σ_j σ(−T̂_j) with T̂ the min-max of T_k = Σ_v H_{k,v} (SDFC Eq. 10); ``softmax``: the code's exp(−T̂).

    Equal totals (one client included) give equal weights, where the code divides 0 by 0.
    """
    t = totals.to(torch.float64).reshape(-1)
    if t.numel() == 0:
        return t
    lo, hi = float(t.min()), float(t.max())
    if not hi > lo:
        return torch.full_like(t, 1.0 / t.numel())
    th = (t - lo) / (hi - lo)
    if kind == "sigmoid":
        s = torch.sigmoid(-th)
    elif kind == "softmax":
        s = torch.exp(-th)
    else:
        raise ValueError(f"fdagg_weights must be 'sigmoid' or 'softmax', got {kind!r}")
    return s / s.sum()


class SDFC(Defense):
    """SDFC: clients train with FDReg (Eq. 9); the server weights uploads by FDAgg (Eq. 10).

    Hyperparameters (keyword-only; ``None`` means "from the preset"): ``preset`` paper|code;
    ``lambda_reg`` (paper 5, code 1.0); ``fdagg_weights`` sigmoid|softmax (paper / code);
    ``anchor`` own|global; ``use_fdreg``, ``use_fdagg``; ``difference``
    abs_diff|local_only|val_only; ``importance_metric`` squared|abs; ``fisher_estimator``
    per_sample|official_label_mixed (paper / code); ``label_source``; ``hardening`` on|off;
    ``echo_rtol`` (None disables the echo check, which runs with ``hardening = on`` and
    ``difference = abs_diff`` only: the other variants have no M(D) − M(U) to echo);
    ``val_fisher_samples`` (None: M_k(U) on all of U, the paper; n: on n samples of U drawn
    each round, the same for every upload of the round, so the server's cost per round stops
    growing with |U| × the clients in it, docs/sampling.md §7). Off by default, both issue 15's
    answers to the recovered echo (docs/algorithms.md §8.2): ``stale_echo_rtol`` refuses as
    ``stale_echo`` an upload whose echo ratio against the server's M(U) of the client's previous
    upload is below it (0 records without refusing); ``fisher_update_consistency`` refuses as
    ``inconsistent`` an upload whose M_k(D_k) does not rank the coordinates its update moved
    (Spearman ρ below it; −1 records without refusing), FDCR's rule.

    With ``use_fdagg = false`` the server falls back to FedAvg's data-size weights n_k/Σn (the
    authors' framework's default aggregation); FDAgg itself ignores n_k.
    """

    name = "sdfc"
    paper = "Huang et al., ECCV 2024 (SDFC)"
    summary = ("clients regularised towards their previous model by the local-vs-validation Fisher "
               "difference (FDReg); server weights by σ(−normalised Fisher difference) (FDAgg)")
    needs_fisher = True
    needs_server_data = True
    client_regulariser = "fdreg"
    # FDAgg's α_k = σ(−T̂_k)/Σ falls as T_k grows: the paper takes a large difference as suspect
    suspicion_score = "Fisher difference T_k = Σ_v H_k,v as is (larger T, smaller FDAgg weight)"

    def __init__(self, *, preset: str = "paper", lambda_reg: float | None = None,
                 fdagg_weights: str | None = None, anchor: str = "own", use_fdreg: bool = True,
                 use_fdagg: bool = True, difference: str = "abs_diff",
                 importance_metric: str = "squared", fisher_estimator: str | None = None,
                 label_source: str = "dataset", hardening: str = "on",
                 echo_rtol: float | None = ECHO_RTOL,
                 val_fisher_samples: int | None = None, stale_echo_rtol: float | None = None,
                 fisher_update_consistency: float | None = None) -> None:
        check_choice("preset", preset, PRESETS)
        code = preset == "code"
        lambda_reg = lambda_reg if lambda_reg is not None else (1.0 if code else 5.0)
        check_range("lambda_reg", lambda_reg, low=0.0)
        fdagg_weights = fdagg_weights if fdagg_weights is not None else ("softmax" if code else "sigmoid")
        check_choice("fdagg_weights", fdagg_weights, ("sigmoid", "softmax"))
        check_choice("anchor", anchor, ("own", "global"))
        check_flag("use_fdreg", use_fdreg)
        check_flag("use_fdagg", use_fdagg)
        check_choice("difference", difference, DIFFERENCES)
        check_choice("importance_metric", importance_metric, IMPORTANCE_METRICS)
        fisher_estimator = fisher_estimator_option(fisher_estimator, label_source, code=code)
        check_choice("hardening", hardening, ("on", "off"))
        check_range("echo_rtol", echo_rtol, low=0.0, high=1.0, low_open=True, allow_none=True)
        check_range("val_fisher_samples", val_fisher_samples, low=1, integer=True, allow_none=True)
        check_range("stale_echo_rtol", stale_echo_rtol, low=0.0, high=1.0, allow_none=True)
        check_range("fisher_update_consistency", fisher_update_consistency, low=-1.0, high=1.0,
                    allow_none=True)

        self.preset = preset
        self.lambda_reg = float(lambda_reg)
        self.fdagg_weights = fdagg_weights
        self.anchor = anchor
        self.use_fdreg = use_fdreg
        self.use_fdagg = use_fdagg
        self.difference = difference
        self.importance_metric = importance_metric
        self.fisher_estimator = fisher_estimator
        self.label_source = label_source
        self.hardening = hardening
        self.echo_rtol = echo_rtol
        self.val_fisher_samples = None if val_fisher_samples is None else int(val_fisher_samples)
        self.stale_echo_rtol = None if stale_echo_rtol is None else float(stale_echo_rtol)
        self.fisher_update_consistency = (None if fisher_update_consistency is None
                                          else float(fisher_update_consistency))
        # per client: the server's M(U) of its last upload, for the stale-echo check only (the
        # recovered echo uploads exactly that, docs/attacks.md §4.5); kept across rejections,
        # unlike H_k, so that a refused echo cannot come back as the one before it
        self._last_val = ClientRows()
        # per client: H_k, anchor w_k and the round they were computed in: cross-round state
        # (docs/algorithms.md §5.1 step 4), in fixed slots so that sampling does not fragment memory
        self._h = ClientRows()
        self._anchors = ClientRows()
        self._computed_in: dict[int, int] = {}

    def fisher_options(self) -> dict[str, Any]:
        """Options for ``diagonal_fisher`` on clients and on U (both Fishers alike, docs/algorithms.md §2.4)."""
        return {"estimator": self.fisher_estimator, "label_source": self.label_source,
                "importance_metric": self.importance_metric}

    # ------------------------------------------------------------------ client side (FDReg)

    def plan_fisher_requests(self, plan_input: PlanInput) -> dict[int, Tensor]:
        """F(D_k; w^t) of every client without a usable H_k from an earlier round (docs/algorithms.md §5.5)."""
        if not self.use_fdreg or self.difference == "val_only":
            return {}
        wt = plan_input.global_weights.detach()
        return {int(cid): wt for cid in plan_input.client_ids if int(cid) not in self._h}

    def plan_clients(self, plan_input: PlanInput) -> dict[int, ClientPlan]:
        """FDReg (Eq. 9) for every client: own H_k and anchor w_k^{t−1}, else H at w^t (docs/algorithms.md §5.5)."""
        if not self.use_fdreg:
            return {}
        pi = plan_input
        wt = pi.global_weights.detach()
        val_at_global: Tensor | None = None
        plans: dict[int, ClientPlan] = {}
        for cid in pi.client_ids:
            if int(cid) in self._h:
                # copies: a view would carry its whole chunk wherever the plan is sent
                h = self._h.row(int(cid)).clone()
                anchor = self._anchors.row(int(cid)).clone() if self.anchor == "own" else wt
            else:
                # [code] round 0, [project] any client without a valid previous round: anchor w^t
                if val_at_global is None and self.difference != "local_only":
                    if pi.server_data is None:
                        raise MissingServerDataError("defense 'sdfc' needs the server's clean data "
                                                     "(PlanInput.server_data), got None")
                    val_at_global = pi.server_data.fisher(wt).detach().to(torch.float64)
                local = (_asked_fisher(pi, int(cid), wt).detach().to(torch.float64)
                         if self.difference != "val_only" else None)
                h = fisher_difference(local, val_at_global, self.difference)
                anchor = wt
            if (h.numel() != wt.numel() or not bool(torch.isfinite(h).all())
                    or bool((h < 0).any())):
                warnings.warn(f"SDFC: client {cid} has no usable Fisher difference this round; "
                              "it trains without FDReg", RuntimeWarning, stacklevel=2)
                plans[int(cid)] = ClientPlan(regulariser=None)
                continue
            plans[int(cid)] = ClientPlan(regulariser=FDReg(h.to(wt.dtype), anchor.to(wt.dtype),
                                                           self.lambda_reg))
        return plans

    # ------------------------------------------------------------------ server side (FDAgg)

    def requires_server_data(self) -> bool:
        """Every variant but ``local_only`` evaluates M_k(U) on the server's data."""
        return self.difference != "local_only"

    def _blank_diagnostics(self, k_all: int) -> dict[str, Any]:
        diag: dict[str, Any] = {"fisher_difference": [None] * k_all, "weight": [0.0] * k_all,
                                "echo_ratio": [None] * k_all, "num_rejected": 0,
                                SUSPICION: [None] * k_all}
        if self.stale_echo_rtol is not None:
            diag["stale_echo_ratio"] = [None] * k_all
        if self.fisher_update_consistency is not None:
            diag["update_consistency"] = [None] * k_all
        return diag

    def _forget_rejected(self, ri: RoundInput, reasons: list[str | None]) -> int:
        """Drop the history of every client rejected this round (docs/algorithms.md §5.5); their number."""
        for k in range(ri.num_clients):
            if reasons[k] is not None:
                self._forget(int(ri.client_ids[k]))
        return sum(r is not None for r in reasons)

    def reject(self, ri: RoundInput, reasons: list[str | None]) -> Aggregate:
        """No valid upload: w^t back, and nobody keeps a history for the next round."""
        diag = self._blank_diagnostics(ri.num_clients)
        diag["num_rejected"] = self._forget_rejected(ri, reasons)
        return reject_all(ri, reasons, diagnostics=diag)

    def combine(self, ri: RoundInput, rows: Rows, reasons: list[str | None]) -> Combined:
        """H_k, echo check, FDAgg weights and w^{t+1} = Σ_k α_k w_k (SDFC Eqs. 7–10; docs/algorithms.md §5.1).

        Works in RoundInput order (``reasons``), not the rows' client-id order.
        """
        k_all = ri.num_clients
        diag = self._blank_diagnostics(k_all)
        wt = ri.global_weights.to(torch.float64)
        # H_k as it is kept (float32) and T_k = Σ_v H_k,v in float64, so no m × P float64 block
        h_rows: dict[int, tuple[Tensor, Tensor]] = {}
        assert ri.fisher is not None
        need_val = self.requires_server_data()
        u = ri.server_data
        if need_val and self.val_fisher_samples is not None:
            u = u.subset(self.val_fisher_samples)  # type: ignore[union-attr]
        for k in range(k_all):
            if reasons[k] is not None:
                continue
            wk = wt + ri.updates[k].to(torch.float64)
            local = ri.fisher[k].to(torch.float64)
            val = (u.fisher(wk.to(ri.global_weights.dtype)).detach().to(torch.float64)  # type: ignore[union-attr]
                   if need_val else None)
            if val is not None and (val.numel() != local.numel()
                                    or not bool(torch.isfinite(val).all())):
                reasons[k] = "non_finite"  # the uploaded model breaks the server's Fisher
                continue
            if val is not None:
                rho = echo_ratio(local, val)
                diag["echo_ratio"][k] = rho
                if (self.hardening == "on" and self.echo_rtol is not None
                        and self.difference == "abs_diff" and rho < self.echo_rtol):
                    reasons[k] = "echo"
                    continue
                if self._stale_echo(ri, k, local, val, diag):
                    reasons[k] = "stale_echo"
                    continue
            if self.fisher_update_consistency is not None:
                c = float(update_consistency(local.unsqueeze(0), ri.updates[k].unsqueeze(0))[0])
                diag["update_consistency"][k] = c
                if c < self.fisher_update_consistency:
                    reasons[k] = "inconsistent"
                    continue
            h = fisher_difference(local, val, self.difference)
            total = h.sum()
            if not bool(torch.isfinite(total)):
                reasons[k] = "non_finite"  # T_k overflows float64; min-max would give NaN
                continue
            h_rows[k] = (h.to(torch.float32), total)
        # a client rejected this round has no valid history for the next (docs/algorithms.md §5.5)
        diag["num_rejected"] = self._forget_rejected(ri, reasons)
        idx = sorted(h_rows)
        if not idx:
            return Combined.unchanged(ri, "no_valid_clients", diagnostics=diag)

        totals = torch.stack([h_rows[k][1] for k in idx])
        if self.use_fdagg:
            alpha = fdagg_weights(totals, self.fdagg_weights)
        else:
            n = ri.num_samples.to(torch.float64)[idx]
            alpha = n / n.sum()
        new = wt + weighted_sum(alpha, ri.updates[idx])
        weights = torch.zeros(k_all, dtype=torch.float64)
        weights[idx] = alpha
        for pos, k in enumerate(idx):
            diag["fisher_difference"][k] = float(totals[pos])
            diag[SUSPICION][k] = float(totals[pos])
            diag["weight"][k] = float(alpha[pos])
            cid = int(ri.client_ids[k])
            self._remember(cid, h_rows[k][0],
                           (wt + ri.updates[k].to(torch.float64)).to(ri.global_weights.dtype),
                           int(ri.round_idx))
        return Combined(weights, new, diag)

    def _stale_echo(self, ri: RoundInput, k: int, local: Tensor, val: Tensor,
                    diag: dict[str, Any]) -> bool:
        """Record ρ against the M(U) kept from client k's previous upload, keep this one's, and
        say whether ρ is below ``stale_echo_rtol`` (docs/algorithms.md §8.2)."""
        if self.stale_echo_rtol is None or self.difference != "abs_diff":
            return False
        cid = int(ri.client_ids[k])
        prev = self._last_val.row(cid).to(torch.float64) if cid in self._last_val else None
        self._last_val.set(cid, val.to(torch.float32))
        if prev is None:
            return False
        rho = echo_ratio(local, prev)
        diag["stale_echo_ratio"][k] = rho
        return self.hardening == "on" and rho < self.stale_echo_rtol

    def _remember(self, cid: int, h: Tensor, anchor: Tensor, round_idx: int) -> None:
        self._h.set(cid, h)
        self._anchors.set(cid, anchor)
        self._computed_in[cid] = round_idx

    def _forget(self, cid: int) -> None:
        self._h.pop(cid)
        self._anchors.pop(cid)
        self._computed_in.pop(cid, None)

    # ------------------------------------------------------------------ cross-round state

    def state_dict(self) -> dict[str, Any]:
        """H_k and anchors per client as lists of tensors (views of the store, ``torch.save``-able)."""
        ids = list(self._h)
        state: dict[str, Any] = {"client_ids": ids,
                                 "fisher_difference": [self._h.row(c) for c in ids],
                                 "anchors": [self._anchors.row(c) for c in ids],
                                 "rounds": [self._computed_in[c] for c in ids]}
        if len(self._last_val):
            last = list(self._last_val)
            state["last_val_fisher"] = {"client_ids": last,
                                        "rows": [self._last_val.row(c) for c in last]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._h, self._anchors, self._computed_in = ClientRows(), ClientRows(), {}
        self._last_val = ClientRows()
        if not state:
            return
        keys = {"client_ids", "fisher_difference", "anchors", "rounds"}
        if set(state) - {"last_val_fisher"} != keys:
            raise ValueError(f"SDFC state needs keys {sorted(keys)} (and last_val_fisher), "
                             f"got {sorted(state)}")
        last = state.get("last_val_fisher") or {"client_ids": [], "rows": []}
        for c, row in zip(last["client_ids"], last["rows"]):
            self._last_val.set(int(c), torch.as_tensor(row))
        ids, hs, ws, rs = (state[k] for k in ("client_ids", "fisher_difference", "anchors", "rounds"))
        if not len(ids) == len(hs) == len(ws) == len(rs):
            raise ValueError("SDFC state lists differ in length")
        for c, h, w, r in zip(ids, hs, ws, rs):
            self._remember(int(c), torch.as_tensor(h), torch.as_tensor(w), int(r))


def _asked_fisher(pi: PlanInput, cid: int, like: Tensor) -> Tensor:
    """The phase-1 Fisher of client ``cid``, or NaN (an unusable plan) when it did not arrive."""
    f = pi.client_fishers.get(cid)
    return torch.full_like(like, float("nan")) if f is None else f
