"""Agreement with the published numbers: cell verdicts, named causes, table verdicts with Kendall τ.

The rules are the spec's (published-tables.md, sections 5.1–5.5), restated in
docs/results.md §5.1–§5.5. Numpy only: Kendall's τ-b is computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

DELTA_A = {"cifar10": 3.0, "cifar10-jpeg": 3.0}  # docs/results.md §5.1; 2.0 for every other set
DELTA_A_DEFAULT = 2.0
CAUSES = ("oracle", "baseline-code", "collapse", "seed-noise", "preset", "data-stand-in",
          "unexplained")


def delta_a(dataset: str) -> float:
    """δ_A of docs/results.md §5.1: 3.0 points for CIFAR-10, 2.0 for MNIST, Fashion-MNIST, USPS."""
    return DELTA_A.get(dataset, DELTA_A_DEFAULT)


def delta_r(r_pub: float) -> float:
    """δ_R of docs/results.md §5.1: 5.0 when R_pub < 20 or R_pub ≥ 80, else 10.0."""
    return 5.0 if r_pub < 20.0 or r_pub >= 80.0 else 10.0


def agrees(ours: float, std: float | None, pub: float, delta: float) -> bool:
    """|ours − pub| ≤ max(δ, 2·s) (docs/results.md §5.1); s is unknown (None, NaN) below 2 seeds."""
    s = 0.0 if std is None or not math.isfinite(std) else std
    return abs(ours - pub) <= max(delta, 2.0 * s)


@dataclass
class Ours:
    """The project's side of a cell: means and sample stds over seeds, collapse count."""

    A: float
    R: float
    s_A: float | None
    s_R: float | None
    n: int
    collapsed: int = 0
    ASR: float | None = None
    V: float | None = None
    dataset: str | None = None  # the dataset the runs used (a stand-in shows here)
    entropy: float | None = None  # mean normalised prediction entropy H (docs/protocol.md §7.3)
    q_max: float | None = None  # mean largest class share max_c q_c
    seeds: tuple[int, ...] = ()  # the seeds averaged
    degraded: bool | None = None  # Ā > 10 below FedAvg's, same seeds (docs/protocol.md §7.4)
    fedavg_A: float | None = None  # that FedAvg Ā
    reduced_scale: tuple[int, int] | None = None  # (T, E) when the runs are at the reduced scale

    @property
    def is_collapsed(self) -> bool:
        """docs/protocol.md §7.4: a cell with k ≥ 1 collapsed seeds is marked and not scored."""
        return self.collapsed > 0


@dataclass
class CellVerdict:
    """A cell's outcome (docs/results.md §5.1) and the one cause of a miss (docs/results.md §5.2)."""

    status: str  # agree | disagree | not-run | not-scored | collapse-agree
    a_ok: bool | None = None
    r_ok: bool | None = None
    cause: str | None = None
    note: str = ""
    scored: bool = False  # counts in the percentages of docs/results.md §5.2 criterion 2


def cell_verdict(pub_a: float | None, pub_r: float | None, ours: Ours | None, *,
                 dataset: str, flags: Sequence[str] = (), preset: str = "paper",
                 other_preset_agrees: bool | None = None) -> CellVerdict:
    """docs/results.md §5.1 for one cell, with the cause of a miss (docs/results.md §5.2)."""
    flags = set(flags)
    if ours is None:
        return CellVerdict("not-run", note="not run")
    if pub_a is None or pub_r is None:
        return CellVerdict("not-scored", note="published '–' (not scored)")
    pub_collapsed = "collapse-by-A" in flags or pub_a < 20.0
    if pub_collapsed or ours.is_collapsed:
        if pub_collapsed and ours.is_collapsed:
            return CellVerdict("collapse-agree", note="both collapsed (left out of percentages)")
        return CellVerdict("disagree", cause="collapse",
                           note="one side collapsed (left out of percentages)")
    a_ok = agrees(ours.A, ours.s_A, pub_a, delta_a(dataset))
    r_ok = agrees(ours.R, ours.s_R, pub_r, delta_r(pub_r))
    stand_in = ours.dataset is not None and ours.dataset != dataset
    unscored = []
    if "unscored" in flags:
        unscored.append("untuned RSA, reported only")
    if "oracle" in flags:
        unscored.append("oracle-assisted published value")
    if "baseline-code" in flags and preset != "code":
        unscored.append("corrected baseline; the code preset is scored")
    if stand_in:
        unscored.append(f"{ours.dataset} stand-in: ranking only")
    if ours.reduced_scale is not None:
        # docs/results.md §4: a reduced-scale run stands beside the cell and says so, unscored
        t, e = ours.reduced_scale
        unscored.append(f"reduced scale (T = {t}, E = {e})")
    if ours.n < 3:
        unscored.append(f"n = {ours.n} < 3 seeds")
    status = "agree" if a_ok and r_ok else "disagree"
    v = CellVerdict(status, a_ok=a_ok, r_ok=r_ok, scored=not unscored,
                    note="; ".join(unscored))
    if status == "disagree":
        v.cause = miss_cause(pub_a, pub_r, ours, flags=flags, stand_in=stand_in,
                             other_preset_agrees=other_preset_agrees, a_ok=a_ok, r_ok=r_ok)
    return v


def miss_cause(pub_a: float, pub_r: float, ours: Ours, *, flags: set[str], stand_in: bool,
               other_preset_agrees: bool | None, a_ok: bool, r_ok: bool) -> str:
    """The one named cause of a disagreeing cell (docs/results.md §5.2 criterion 4), first match:
    oracle, baseline-code, data-stand-in, preset, seed-noise, unexplained."""
    if "oracle" in flags:
        return "oracle"
    if "baseline-code" in flags:
        return "baseline-code"
    if stand_in:
        return "data-stand-in"
    if other_preset_agrees:
        return "preset"
    noisy = True
    for ok, mean, std, pub in ((a_ok, ours.A, ours.s_A, pub_a), (r_ok, ours.R, ours.s_R, pub_r)):
        if not ok:
            s = std if std is not None and math.isfinite(std) else 0.0
            noisy = noisy and s > 0 and abs(mean - pub) < 3.0 * s
    return "seed-noise" if noisy else "unexplained"


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's τ-b of paired values (ties in either list handled); None below 2 pairs or when
    one side is constant (docs/results.md §5.2 criterion 3)."""
    n = len(x)
    if n != len(y):
        raise ValueError("kendall_tau: the two lists differ in length")
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tie_x += 1
            elif dy == 0:
                tie_y += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tie_x) * (conc + disc + tie_y))
    if n < 2 or denom == 0:
        return None
    return (conc - disc) / denom


@dataclass
class ColumnRank:
    """Criterion 3 for one column: τ over methods scored on both sides, the paper's winner."""

    column: str
    tau: float | None
    n: int
    paper_best: str | None
    our_top3: list[str]
    ok: bool | None


def column_rank(column: str, rows: list[dict[str, Any]]) -> ColumnRank:
    """docs/results.md §5.2 criterion 3; ``rows``: method, pub_V, our_V, pub_collapsed,
    our_collapsed, oracle (bool each)."""
    both = [r for r in rows if r.get("pub_V") is not None and r.get("our_V") is not None
            and not r.get("pub_collapsed") and not r.get("our_collapsed")]
    tau = kendall_tau([r["pub_V"] for r in both], [r["our_V"] for r in both])
    pub = [r for r in rows if r.get("pub_V") is not None and not r.get("pub_collapsed")
           and not r.get("oracle")]
    best = max(pub, key=lambda r: r["pub_V"])["method"] if pub else None
    ours = sorted((r for r in rows if r.get("our_V") is not None and not r.get("our_collapsed")),
                  key=lambda r: -r["our_V"])
    top3 = [r["method"] for r in ours[:3]]
    if tau is None or best is None or not any(r["method"] == best for r in ours):
        ok = None
    else:
        ok = tau >= 0.5 and best in top3
    return ColumnRank(column, tau, len(both), best, top3, ok)


@dataclass
class TableVerdict:
    """docs/results.md §5.2: the four criteria and the overall verdict of one table and preset."""

    vanilla_ok: bool | None
    a_share: float | None
    r_share: float | None
    columns: list[ColumnRank] = field(default_factory=list)
    unexplained: int = 0
    causes: dict[str, int] = field(default_factory=dict)

    @property
    def criteria(self) -> dict[str, bool | None]:
        """Each criterion: True, False, or None when there is nothing to judge yet."""
        ranks = [c.ok for c in self.columns]
        c3 = None if not ranks or any(r is None for r in ranks) else all(ranks)
        c2 = None if self.a_share is None else (self.a_share >= 75.0 and self.r_share >= 60.0)
        return {"1 FedAvg row": self.vanilla_ok, "2 shares A≥75 %, R≥60 %": c2,
                "3 τ≥0.5 and top method in our top 3": c3,
                "4 no unexplained miss": self.unexplained == 0}

    @property
    def verdict(self) -> str:
        """reproduced | not reproduced | incomplete (a criterion could not be judged)."""
        vals = list(self.criteria.values())
        if any(v is False for v in vals):
            return "not reproduced"
        if any(v is None for v in vals):
            return "incomplete"
        return "reproduced"


def table_verdict(cells: list[dict[str, Any]], columns: list[ColumnRank],
                  vanilla_ok: bool | None) -> TableVerdict:
    """docs/results.md §5.2 over one table's cells (each: method, verdict: CellVerdict, fedavg)."""
    scored = [c["verdict"] for c in cells if c["verdict"].scored and not c.get("fedavg")]
    a_share = r_share = None
    if scored:
        a_share = 100.0 * sum(bool(v.a_ok) for v in scored) / len(scored)
        r_share = 100.0 * sum(bool(v.r_ok) for v in scored) / len(scored)
    causes: dict[str, int] = {}
    for c in cells:
        cause = c["verdict"].cause
        if cause:
            causes[cause] = causes.get(cause, 0) + 1
    return TableVerdict(vanilla_ok, a_share, r_share, columns, causes.get("unexplained", 0),
                        causes)
