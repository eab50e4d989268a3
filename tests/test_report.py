"""Published numbers, verdict rules and `fisherguard report` (docs/results.md)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fisherguard.cli import main
from fisherguard.report import published
from fisherguard.report.verdict import (Ours, cell_verdict, column_rank, delta_a, delta_r,
                                        kendall_tau, table_verdict)
from report_fixture import fake_run

pytestmark = pytest.mark.unit

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "published-tables.md"
ROWS = {"sdfc-t1": 3, "sdfc-t2": 2, "sdfc-t3": 4, "sdfc-t4": 3, "sdfc-t5": 72, "fdcr-t1": 3,
        "fdcr-t2": 2, "fdcr-t3": 4, "fdcr-t4": 84}


# --------------------------------------------------------------------------- published data


def test_shipped_totals():
    data = published.load()
    assert data["tables"] == ROWS and sum(data["tables"].values()) == 177
    # SDFC Table 1: 3 × 4 marks; every other row: one value per printed column
    values = 12 + 2 * 9 + 4 * 9 + 3 * 9 + 72 * 6 + 3 * 12 + 2 * 6 + 4 * 12 + 84 * 6
    assert len(data["cells"]) == values == 1125


def test_shipped_flags_match_the_spec_lists():
    cells = published.cells()
    collapsed = [c for c in cells if "collapse-by-A" in c["flags"] and c["metric"] == "A"]
    assert len(collapsed) == 16  # the sixteen rows of the collapse list
    assert sum(c["value"] is None for c in cells) == 18  # six "–" entries × A, R, V
    oracle = {(c["table"], c["method"]) for c in cells if "oracle" in c["flags"]}
    assert oracle == {("fdcr-t4", "fdcr"), ("fdcr-t1", "fdcr:kmeans"), ("fdcr-t1", "fdcr:dbscan"),
                      ("fdcr-t1", "fdcr"), ("fdcr-t2", "fdcr:fcdc-only"),
                      ("fdcr-t3", "fdcr:fcdc-only"), ("fdcr-t3", "fdcr")}
    assert sum(c["metric"] == "A" and "oracle" in c["flags"] for c in cells) == 12 + 12 + 2 + 8


def test_v_is_the_mean_of_a_and_r():
    by = {}
    for c in published.cells():
        by.setdefault((c["table"], c["dataset"], c["beta"], c["upsilon"], c["row"]), {})[
            c["metric"]] = c["value"]
    checked = 0
    for vals in by.values():
        if vals["A"] is not None:
            assert abs(vals["V"] - (vals["A"] + vals["R"]) / 2) <= 0.0100001, vals
            checked += 1
    assert checked == (18 + 36 + 27 + 432 + 36 + 12 + 48 + 504) // 3 - 6  # six "–" entries


def test_repeated_numbers_agree():
    def get(table, method, ds, beta, ups):
        return [c["value"] for c in published.cells(table) if c["method"] == method
                and (c["dataset"], c["beta"], c["upsilon"]) == (ds, beta, ups)]

    assert get("sdfc-t2", "sdfc:fdreg-only", "mnist", 0.5, 30) == \
        get("sdfc-t3", "sdfc:fdreg-only", "mnist", 0.5, 30)
    assert get("fdcr-t1", "fdcr", "cifar10", 0.3, 30) == get("fdcr-t4", "fdcr", "cifar10", 0.3, 30)
    assert get("fdcr-t3", "fedavg", "fashion-mnist", 0.5, 30) == [87.15, 0.26, 43.70]
    sage = [c for c in published.cells("fdcr-t4") if c["method"] == "sageflow"
            and c["dataset"] == "fashion-mnist" and c["beta"] == 0.5 and c["upsilon"] == 30]
    assert [c["text"] for c in sage] == ["88.05", "1.169", "44.60"]  # uneven precision kept


def test_shipped_data_equals_a_fresh_parse_of_the_spec():
    """Re-parses the spec when it sits beside the project; the totals above hold either way."""
    if not SPEC.is_file():
        assert published.load()["tables"] == ROWS
        return
    fresh = published.parse_spec(SPEC.read_text(encoding="utf-8"))
    assert fresh == published.load()


def test_every_method_id_is_a_defense():
    from fisherguard.defenses import registry

    names = set(registry.available())
    assert {d for d, _ in published.METHODS.values()} <= names
    assert {c["method"] for c in published.cells()} <= set(published.METHODS)


# --------------------------------------------------------------------------- cell verdicts


def _ours(A, R, sA=0.5, sR=1.0, n=3, **kw):
    return Ours(A=A, R=R, s_A=sA, s_R=sR, n=n, **kw)


def test_tolerances():
    assert delta_a("cifar10") == 3.0 and delta_a("usps") == 2.0
    assert delta_r(19.99) == 5.0 and delta_r(20.0) == 10.0 and delta_r(79.99) == 10.0
    assert delta_r(80.0) == 5.0


def test_cell_within_and_outside_tolerance():
    ok = cell_verdict(87.15, 0.26, _ours(85.20, 5.2), dataset="fashion-mnist")
    assert ok.status == "agree" and ok.scored
    a_miss = cell_verdict(87.15, 0.26, _ours(85.10, 0.3), dataset="fashion-mnist")
    assert a_miss.status == "disagree" and not a_miss.a_ok and a_miss.r_ok
    assert a_miss.cause == "unexplained"  # 2.05 ≥ 3·0.5
    # CIFAR-10 allows 3 points; a large std widens the band to 2·s
    assert cell_verdict(64.08, 41.22, _ours(61.2, 41.0), dataset="cifar10").a_ok
    assert cell_verdict(64.08, 41.22, _ours(58.0, 41.0, sA=3.5), dataset="cifar10").a_ok
    # mid-range R: 10 points
    assert cell_verdict(64.08, 41.22, _ours(64.0, 51.0), dataset="cifar10").r_ok
    assert not cell_verdict(64.08, 85.0, _ours(64.0, 79.0), dataset="cifar10").r_ok


def test_a_reduced_scale_cell_says_so_and_is_not_scored():
    full = cell_verdict(87.15, 0.26, _ours(85.20, 5.2), dataset="fashion-mnist")
    assert full.scored and "reduced" not in full.note
    red = cell_verdict(87.15, 0.26, _ours(85.20, 5.2, reduced_scale=(20, 2)),
                       dataset="fashion-mnist")
    assert not red.scored and "reduced scale (T = 20, E = 2)" in red.note


def test_missing_and_not_run_cells():
    assert cell_verdict(64.0, 40.0, None, dataset="cifar10").status == "not-run"
    dash = cell_verdict(None, None, _ours(50.0, 50.0), dataset="cifar10")
    assert dash.status == "not-scored" and not dash.scored


def test_collapse_and_named_causes():
    both = cell_verdict(10.0, 100.0, _ours(10.0, 100.0, collapsed=2), dataset="fashion-mnist",
                        flags=["collapse-by-A"])
    assert both.status == "collapse-agree" and not both.scored
    one = cell_verdict(10.0, 100.0, _ours(85.0, 1.0), dataset="fashion-mnist",
                       flags=["collapse-by-A"])
    assert (one.status, one.cause, one.scored) == ("disagree", "collapse", False)
    oracle = cell_verdict(65.60, 90.54, _ours(63.0, 45.0), dataset="cifar10", flags=["oracle"])
    assert oracle.cause == "oracle" and not oracle.scored
    code = cell_verdict(50.0, 50.0, _ours(60.0, 50.0), dataset="usps", flags=["baseline-code"],
                        preset="code")
    assert code.cause == "baseline-code" and code.scored
    assert not cell_verdict(50.0, 50.0, _ours(60.0, 50.0), dataset="usps",
                            flags=["baseline-code"]).scored  # paper preset: printed beside
    preset = cell_verdict(50.0, 50.0, _ours(60.0, 50.0), dataset="usps",
                          other_preset_agrees=True)
    assert preset.cause == "preset"
    noise = cell_verdict(50.0, 50.0, _ours(53.0, 50.0, sA=1.2), dataset="usps")
    assert noise.cause == "seed-noise"  # 3.0 > max(2, 2.4) but < 3·1.2
    jpeg = cell_verdict(64.0, 41.0, _ours(50.0, 41.0, dataset="cifar10-jpeg"), dataset="cifar10")
    assert jpeg.cause == "data-stand-in" and not jpeg.scored


# --------------------------------------------------------------------------- Kendall τ


def test_kendall_tau_hand_computed():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # one swapped pair of six: (5 − 1)/6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # τ-b with a tie in y: pairs C = 4, D = 1, tie_y = 1 → 3/√(6·5)
    assert kendall_tau([1, 2, 3, 4], [1, 1, 3, 2]) == pytest.approx(3 / math.sqrt(30))
    assert kendall_tau([1, 2], [5, 5]) is None and kendall_tau([1], [1]) is None


def test_column_rank_and_table_verdict():
    rows = [{"method": m, "pub_V": pv, "our_V": ov} for m, pv, ov in
            [("a", 90, 80), ("b", 70, 70), ("c", 60, 75), ("d", 50, 40), ("e", 40, 30)]]
    r = column_rank("x", rows)
    assert r.paper_best == "a" and r.our_top3 == ["a", "c", "b"] and r.ok
    assert r.tau == pytest.approx(0.8)
    rows[0]["our_V"] = 10  # the paper's best falls out of our top three
    assert column_rank("x", rows).ok is False
    cells = [{"method": "m", "fedavg": False, "verdict": cell_verdict(
        50.0, 50.0, _ours(50.0 + k, 50.0), dataset="usps")} for k in range(4)]
    tv = table_verdict(cells, [r], vanilla_ok=True)
    assert tv.a_share == 75.0 and tv.r_share == 100.0 and tv.unexplained == 1
    assert tv.verdict == "not reproduced"


# --------------------------------------------------------------------------- the report


def test_report_on_fixture_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    for s, (a, r) in enumerate([(64.0, 41.0), (63.5, 43.0), (64.8, 40.1)]):
        fake_run(runs, "fdcr-t3", "fedavg", "cifar10", 0.5, 30, s, A=a, R=r)
        fake_run(runs, "fdcr-t3", "fdcr", "cifar10", 0.5, 30, s, A=a - 1, R=r + 4)
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    for table in ("fdcr-t4", "fdcr-t3", "sdfc-t5", "sdfc-t3", "sdfc-t2", "sdfc-t4", "fdcr-t1",
                  "fdcr-t2"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{table}-paper.{ext}").is_file(), (table, ext)
    assert "fdcr-t3-paper.md" in (out / "index.md").read_text()
    md = (out / "fdcr-t3-paper.md").read_text()
    assert "| fedavg | 64.08 | 64.10 ± 0.66 | +0.02 | 41.22 | 41.37 ± 1.48 |" in md
    assert "disagree (oracle)" in md
    assert ("`fisherguard reproduce fdcr-t3 --datasets cifar10 --betas 0.5 --upsilons 30 "
            "--methods fdcr:fpra-only`") in md
    rows = list(csv.DictReader((out / "fdcr-t3-paper.csv").open()))
    assert len(rows) == 16
    fed = [r for r in rows if r["method"] == "fedavg" and r["beta"] == "0.5"]
    assert fed[0]["verdict"] == "agree" and fed[0]["A pub"] == "64.08"
    assert [r["cause"] for r in rows if r["method"] == "fdcr" and r["beta"] == "0.5"
            and r["dataset"] == "cifar10"] == ["oracle"]
    # the FedAvg rows of FDCR Table 4 use the same runs (same key, same family)
    t4 = list(csv.DictReader((out / "fdcr-t4-paper.csv").open()))
    assert [r["verdict"] for r in t4 if r["method"] == "fedavg" and r["dataset"] == "cifar10"
            and r["beta"] == "0.5" and r["upsilon"] == "30"] == ["agree"]
    assert "\\begin{tabular}" in (out / "fdcr-t3-paper.tex").read_text()


def test_report_plots_hook_is_optional(tmp_path, monkeypatch):
    from fisherguard.report import tables

    called = []
    import types
    import sys
    mod = types.ModuleType("fisherguard.report.plots")
    mod.write_plots = lambda dirs, out, **kw: called.append((list(dirs), out)) or []
    monkeypatch.setitem(sys.modules, "fisherguard.report.plots", mod)
    assert tables.plots_hook([tmp_path], tmp_path) == [] and called == [([tmp_path], tmp_path)]
    monkeypatch.setitem(sys.modules, "fisherguard.report.plots", None)  # import fails
    assert tables.plots_hook([tmp_path], tmp_path) == []


def test_only_runs_of_the_published_protocol_stand_beside_a_published_cell(tmp_path):
    import yaml

    from fisherguard.report.tables import collect_runs

    runs = tmp_path / "runs"
    fake_run(runs, "fdcr-t4", "fedavg", "usps", 0.5, 30, 0, A=95.0, R=6.0)
    for name, change in (("other-attack", {"attack": {"name": "sign-flip"}}),
                         ("subset", {"data": {"train_subset": 2000}}),
                         ("short", {"federation": {"rounds": 8}})):
        d = fake_run(runs / name, "fdcr-t4", "fedavg", "usps", 0.5, 30, 0, A=1.0, R=1.0)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        for section, values in change.items():
            cfg[section].update(values)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    left: dict[str, int] = {}
    got = collect_runs([runs], left)
    assert [r["A"] for r in got] == [95.0] and got[0]["_scale"] == (50, 10)
    assert sum(left.values()) == 3 and all("published protocol" in k for k in left)


def test_report_index_holds_each_results_directory_table_and_its_plots(tmp_path):
    """The generated document: every results directory's README link and seed table, and the
    plots in the formats asked for (``--plots overview --formats svg``)."""
    runs = tmp_path / "runs"
    for s, a in enumerate([64.0, 63.5, 64.8]):
        fake_run(runs, "fdcr-t3", "fedavg", "cifar10", 0.5, 30, s, A=a, R=41.0)
    (runs / "README.md").write_text("how\n")
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out), "--plots", "overview",
                 "--formats", "svg"]) == 0
    index = (out / "index.md").read_text()
    assert "## runs" in index and "[runs/README.md](../runs/README.md)" in index
    assert "| 64.10 ± 0.66 |" in index
    assert not list(out.glob("*.png")) and not list(out.glob("weights-*"))
    with pytest.raises(SystemExit):
        main(["report", str(runs), "--out", str(out), "--plots", "some"])
    assert main(["report", str(runs), "--out", str(out), "--formats", "gif"]) != 0


def test_oracle_run_stands_beside_fdcr_although_its_summary_names_it_for_display(tmp_path):
    """A real fdcr-oracle run's summary carries the display label (fdcr.ORACLE_LABEL), not the
    defense's name; the report files it by its config's name and shows the row."""
    from fisherguard.defenses.fdcr import ORACLE_LABEL

    runs = tmp_path / "runs"
    for s in range(3):
        fake_run(runs, "fdcr-t4", "fdcr", "usps", 0.5, 30, s, A=95.9, R=20.0)
    d = fake_run(runs, "fdcr-t4", "fdcr-oracle", "usps", 0.5, 30, 0, A=96.2, R=90.1)
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "defense": ORACLE_LABEL}))
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    rows = [r for r in csv.DictReader((out / "fdcr-t4-paper.csv").open())
            if r["dataset"] == "usps" and r["beta"] == "0.5" and r["upsilon"] == "30"]
    oracle = [r for r in rows if r["method"] == "fdcr-oracle"]
    assert len(oracle) == 1 and oracle[0]["R ours"].startswith("90.10")


def test_rank_line_says_when_the_papers_best_is_the_oracle_run():
    from fisherguard.report.tables import _rank_line
    from fisherguard.report.verdict import ColumnRank

    line = _rank_line(ColumnRank("usps", 0.5, 4, "fdcr-oracle", ["rlr", "fltrust", "bulyan"], True))
    assert "paper's best: fdcr-oracle (the published FDCR row" in line and "§5.3" in line
    plain = _rank_line(ColumnRank("usps", 0.5, 4, "rlr", ["rlr"], True))
    assert "paper's best: rlr; our top 3: rlr" in plain
