"""Property-based fuzzing of every defense's ``aggregate`` with hostile rounds (issue 19).

A hypothesis strategy draws whole rounds as a hostile federation could send them: NaN, ±inf,
huge, denormal and zero values, zero and duplicate rows, K = 1–5 clients, mismatched shapes
(wrong-length or non-numeric rows through ``RoundInput.from_uploads``, a wrong-shaped update or
Fisher matrix, a short count vector), forged sample counts (0, negative, fractional, NaN, inf,
beyond 2**53) and forged Fisher rows (negative, constant, zero, NaN, inf, huge, missing). Each
example runs one or two rounds through one defense instance (state carried over, as in a run).

The properties (docs/protocol.md §7.6, ``fisherguard.defenses.base``):

* ``aggregate`` raises nothing but the documented errors (``DefenseConfigError``,
  ``MissingServerDataError``); each one raised is counted as a documented rejection;
* ``new_weights`` (and ``eval_weights`` when set) are finite, shape (P,), the global weights' dtype;
* ``client_weights`` are (K,) float64, finite, non-negative, and sum to 1 or are all zero;
* ``flagged`` is exactly ``client_weights == 0``, every flag has a reason, and a client whose
  upload failed validation is flagged with that failure reason.

Used by ``tests/test_fuzz_defenses.py`` (a few examples per defense in ``make test``) and by
``tools/fuzz.py`` (``make fuzz``: >= 1,000 examples per defense and a table).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisherguard.defenses import registry
from fisherguard.defenses.base import (COUNT_CAP, PRESETS, DefenseConfigError,
                                       MissingServerDataError, RoundInput, validate_uploads)

DOCUMENTED = (DefenseConfigError, MissingServerDataError)
NAMES = list(registry.available())


def default_examples() -> int:
    """Examples per defense: ``FUZZ_EXAMPLES`` (``make test`` keeps the small default)."""
    return int(os.environ.get("FUZZ_EXAMPLES", "10"))


# ---------------------------------------------------------------------------------------------
# A tiny server set U: softmax regression (C = 3 classes, D = 3 features, P = 12) on 24 points.


class TinyServerData:
    """ServerData on flat weights W (C×D, row-major) then b (C); any weights in, no exception out."""

    C, D, SIZE = 3, 3, 24
    P = C * D + C

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.size = self.SIZE
        means = torch.randn(self.C, self.D, generator=g) * 2.0
        self.y = torch.arange(self.SIZE) % self.C
        self.x = (means[self.y] + torch.randn(self.SIZE, self.D, generator=g)).double()

    def _logits(self, w: torch.Tensor) -> torch.Tensor:
        cd = self.C * self.D
        return self.x @ w[:cd].view(self.C, self.D).T + w[cd:]

    def fisher(self, weights: torch.Tensor) -> torch.Tensor:
        """Empirical diagonal Fisher: mean squared per-sample gradient (closed form)."""
        w = weights.detach().double()
        err = F.softmax(self._logits(w), dim=1) - F.one_hot(self.y, self.C).double()  # (N, C)
        gw = (err[:, :, None] * self.x[:, None, :]).reshape(self.SIZE, -1)  # (N, C·D)
        return torch.cat([gw, err], 1).pow(2).mean(0).to(weights.dtype)

    def train(self, weights: torch.Tensor, epochs: int) -> torch.Tensor:
        w = weights.detach().double().clone()
        onehot = F.one_hot(self.y, self.C).double()
        for _ in range(epochs):
            for s in range(0, self.SIZE, 8):
                x, t = self.x[s:s + 8], onehot[s:s + 8]
                cd = self.C * self.D
                err = F.softmax(x @ w[:cd].view(self.C, self.D).T + w[cd:], dim=1) - t
                grad = torch.cat([(err.T @ x).reshape(-1), err.sum(0)]) / len(x)
                w = w - 0.1 * grad
        return w.to(weights.dtype)

    def loss_and_entropy(self, weights: torch.Tensor) -> tuple[float, float]:
        logits = self._logits(weights.detach().double())
        logp = F.log_softmax(logits, dim=1)
        return float(F.nll_loss(logp, self.y)), float(-(logp.exp() * logp).sum(1).mean())


SERVER = TinyServerData()


# ---------------------------------------------------------------------------------------------
# Hostile values


NAN, INF = float("nan"), float("inf")
SPECIAL = [0.0, -0.0, NAN, INF, -INF, 1e30, -1e30, 3.0e38, -3.0e38, 1e300, -1e300,
           1e-45, -1e-45, 1e-310, 5e-324, 1e-3, 1.0]
FINITE_SPECIAL = [0.0, -0.0, 1e30, -1e30, 3.0e38, 1e300, 1e-45, 1e-310, 5e-324, 1e-8, 1e8]

clean_values = st.floats(-1.0, 1.0, allow_nan=False)
clean_fisher = st.floats(1e-4, 1.0)
values = st.one_of(clean_values, st.sampled_from(SPECIAL))
fisher_values = st.one_of(clean_fisher, st.sampled_from(SPECIAL))
counts = st.one_of(st.integers(1, 500).map(float), st.integers(1, 500).map(float),
                   st.integers(1, 500).map(float),
                   st.sampled_from([0.0, -1.0, -50.0, 2.5, NAN, INF, -INF, 1e308, 2.0 ** 53,
                                    2.0 ** 53 + 2, 2.0 ** 60, 1e6, 1.0]))


def hostile_rows(draw, k: int, p: int, clean, elements) -> list[list[float]]:
    """K rows of length P: most clean (so the rule itself runs), the rest hostile."""
    rows: list[list[float]] = []
    for i in range(k):
        mode = draw(st.sampled_from(["clean"] * 4 + ["sprinkled"] * 2 + [
            "hostile", "zero", "dup", "dup", "scaled", "constant", "nan"]))
        if mode == "dup" and rows:
            rows.append(list(rows[draw(st.integers(0, len(rows) - 1))]))
        elif mode == "zero":
            rows.append([0.0] * p)
        elif mode == "nan":
            rows.append([NAN] * p)
        elif mode == "constant":
            rows.append([draw(elements)] * p)
        elif mode == "scaled" and rows:
            src = rows[draw(st.integers(0, len(rows) - 1))]
            scale = draw(st.sampled_from([-1.0, 1e10, 1e-10, 1e300, 1e-300]))
            rows.append((torch.tensor(src, dtype=torch.float64) * scale).tolist())
        elif mode == "hostile":
            rows.append(draw(st.lists(elements, min_size=p, max_size=p)))
        else:
            row = draw(st.lists(clean, min_size=p, max_size=p))
            if mode == "sprinkled":
                row[draw(st.integers(0, p - 1))] = draw(st.sampled_from(SPECIAL))
            rows.append(row)
    return rows


@dataclass
class Case:
    """One drawn example: the defense's options and its rounds (RoundInputs)."""

    options: dict[str, Any]
    rounds: list[RoundInput]
    attacker_ids: list[int] = field(default_factory=list)


def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


@st.composite
def hostile_case(draw, name: str) -> Case:
    cls = registry.get(name)
    options: dict[str, Any] = {}
    if _accepts(cls, "preset"):
        options["preset"] = draw(st.sampled_from(PRESETS))
    if _accepts(cls, "assumed_attackers"):
        options["assumed_attackers"] = draw(st.integers(0, 2))
    if name == "fltrust":
        options["server_epochs"] = 1
    if name == "finetuning":
        options["epochs"] = draw(st.integers(0, 1))
    if name == "fdcr-oracle":
        options["seed"] = draw(st.integers(0, 3))

    server = cls.needs_server_data
    p = TinyServerData.P if server else draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gw = torch.tensor(draw(st.lists(st.one_of(st.floats(-2.0, 2.0, allow_nan=False),
                                              st.sampled_from(FINITE_SPECIAL[:2] + [1e-40])),
                                    min_size=p, max_size=p)), dtype=torch.float64).to(dtype)
    n_rounds = draw(st.integers(1, 2))
    rounds = []
    all_ids: set[int] = set()
    for r in range(n_rounds):
        k = draw(st.integers(1, 5))
        ids = draw(st.lists(st.integers(0, 20), min_size=k, max_size=k, unique=True))
        all_ids.update(ids)
        rows = hostile_rows(draw, k, p, clean_values, values)
        fisher_rows = (hostile_rows(draw, k, p, clean_fisher, fisher_values)
                       if draw(st.booleans()) or cls.needs_fisher else None)
        if fisher_rows is not None and draw(st.integers(0, 9)) == 0:
            fisher_rows = None  # a Fisher-reading defense without any Fisher
        n = [draw(counts) for _ in range(k)]
        upd_dtype = draw(st.sampled_from([dtype, torch.float64, torch.float32]))
        kw = dict(lr=draw(st.sampled_from([0.01, 0.1, 1.0])), round_idx=r,
                  num_rounds=draw(st.sampled_from([None, n_rounds, r + 1])),
                  count_cap=draw(st.sampled_from([COUNT_CAP, None, 1.0])),
                  server_data=SERVER if server else None)
        shape = draw(st.sampled_from(["tensor"] * 5 + ["uploads", "uploads", "bad_matrix",
                                      "short_counts"]))
        if shape == "uploads":
            # what the engine does with what clients sent: any row may be malformed or missing
            junk = st.sampled_from([None, "abc", [[1.0]], {"a": 1}, list(range(p)),
                                    [0.5] * (p + 1), torch.zeros(p, dtype=torch.int64),
                                    torch.zeros(p, 1), torch.ones(p, dtype=torch.float16)])
            ups = [draw(junk) if draw(st.integers(0, 3)) == 0 else torch.tensor(row, dtype=upd_dtype)
                   for row in rows]
            fis = None if fisher_rows is None else [
                draw(junk) if draw(st.integers(0, 4)) == 0 else torch.tensor(row, dtype=upd_dtype)
                for row in fisher_rows]
            raw_n: list[Any] = [draw(st.sampled_from([c, int(c) if math.isfinite(c) else c,
                                                      "7", None, 10 ** 400])) for c in n]
            ri = RoundInput.from_uploads(gw.clone(), ups, raw_n[:draw(st.integers(0, k))]
                                         if draw(st.integers(0, 5)) == 0 else raw_n,
                                         ids, fisher=fis, **kw)
        else:
            upd = torch.tensor(rows, dtype=torch.float64).to(upd_dtype)
            fis = None if fisher_rows is None else torch.tensor(fisher_rows, dtype=torch.float64
                                                                 ).to(upd_dtype)
            nums = torch.tensor(n, dtype=torch.float64)
            if shape == "bad_matrix":
                which = draw(st.sampled_from(["wide", "tall", "int", "fisher_wide", "flat"]))
                if which == "wide":
                    upd = torch.cat([upd, upd[:, :1]], 1)
                elif which == "tall":
                    upd = torch.cat([upd, upd[:1]], 0)
                elif which == "int":
                    upd = torch.zeros(k, p, dtype=torch.int64)
                elif which == "flat":
                    upd = upd.reshape(-1)
                elif fis is not None:
                    fis = torch.cat([fis, fis[:, :1]], 1)
            elif shape == "short_counts":
                nums = nums[:draw(st.integers(0, k - 1))]
            ri = RoundInput(global_weights=gw.clone(), updates=upd, num_samples=nums,
                            client_ids=list(ids), fisher=fis, **kw)
        rounds.append(ri)
    attackers = (draw(st.lists(st.sampled_from(sorted(all_ids)), unique=True))
                 if cls.needs_attacker_ids else [])
    return Case(options, rounds, attackers)


# ---------------------------------------------------------------------------------------------
# The properties


@dataclass
class Stats:
    cases: int = 0
    rounds: int = 0
    documented: int = 0  # documented exceptions raised
    all_rejected: int = 0  # rounds where no upload was valid (w^t kept)
    failures: int = 0
    failure: str = ""


def check_aggregate(name: str, ri: RoundInput, out) -> None:
    k, p = ri.num_clients, ri.num_params
    where = f"{name}: round {ri.round_idx}"
    nw = out.new_weights
    assert tuple(nw.shape) == (p,), f"{where}: new_weights shape {tuple(nw.shape)}, P = {p}"
    assert nw.dtype == ri.global_weights.dtype, f"{where}: new_weights dtype {nw.dtype}"
    assert bool(torch.isfinite(nw).all()), f"{where}: non-finite new_weights {nw.tolist()}"
    if out.eval_weights is not None:
        assert bool(torch.isfinite(out.eval_weights).all()), f"{where}: non-finite eval_weights"
    cw = out.client_weights
    assert cw.dtype == torch.float64 and tuple(cw.shape) == (k,), \
        f"{where}: client_weights {cw.dtype} {tuple(cw.shape)}"
    assert bool(torch.isfinite(cw).all()) and bool((cw >= 0).all()), \
        f"{where}: client_weights not finite and >= 0: {cw.tolist()}"
    total = float(cw.sum())
    assert total == 0.0 or abs(total - 1.0) <= 1e-9, \
        f"{where}: client_weights sum to {total!r}: {cw.tolist()}"
    assert torch.equal(out.flagged, cw == 0), \
        f"{where}: flagged {out.flagged.tolist()} is not weight 0 {cw.tolist()}"
    assert len(out.reasons) == k, f"{where}: {len(out.reasons)} reasons for {k} clients"
    for i in range(k):
        if bool(out.flagged[i]):
            assert out.reasons[i] is not None, f"{where}: client {i} flagged without a reason"
    pre = validate_uploads(ri, require_fisher=registry.get(name).needs_fisher)
    for i, r in enumerate(pre):
        if r is not None:
            assert bool(out.flagged[i]) and out.reasons[i] == r, \
                f"{where}: invalid upload {i} ({r}) got weight {float(cw[i])}, reason {out.reasons[i]}"


def run_case(name: str, case: Case, stats: Stats) -> None:
    stats.cases += 1
    try:
        d = registry.build(name, case.options)
    except DefenseConfigError:
        stats.documented += 1
        return
    if d.needs_attacker_ids:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d.receive_attacker_ids(case.attacker_ids)  # type: ignore[attr-defined]
    for ri in case.rounds:
        stats.rounds += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    out = d.aggregate(ri)
        except DOCUMENTED:
            stats.documented += 1
            return
        check_aggregate(name, ri, out)
        if out.status == "no_valid_clients":
            stats.all_rejected += 1


def fuzz(name: str, examples: int, *, derandomize: bool = True, stats: Stats | None = None
         ) -> Stats:
    """Run ``examples`` hostile cases through defense ``name``; raises on the first failure
    (after hypothesis has shrunk it), with the counts so far in ``stats``."""
    stats = Stats() if stats is None else stats

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(hostile_case(name))
    def prop(case: Case) -> None:
        run_case(name, case, stats)

    prop()
    return stats
