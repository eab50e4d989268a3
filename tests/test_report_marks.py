"""Collapsed cells carry H and max q; the advisory 'degraded' mark (docs/protocol.md §7.4)."""

import pytest

from fisherguard.report import tables
from fisherguard.results import aggregate_seeds
from report_fixture import fake_run

pytestmark = pytest.mark.unit


def test_report_marks_collapsed_and_degraded_cells(tmp_path):
    runs = tmp_path / "runs"
    col = ("fdcr-t4", "fashion-mnist", 0.5, 30)
    for s in range(3):
        fake_run(runs, *col[:1], "fedavg", *col[1:], s, A=87.0, R=1.0, entropy=0.99, q_max=0.12)
        fake_run(runs, *col[:1], "trimmed-mean", *col[1:], s, A=10.0, R=100.0, collapsed=True,
                 entropy=0.02, q_max=0.99)
        fake_run(runs, *col[:1], "multi-krum", *col[1:], s, A=80.0, R=2.0)  # 7 below: not marked
        fake_run(runs, *col[:1], "dnc", *col[1:], s, A=70.0, R=2.0)  # 17 below FedAvg
    fake_run(runs, *col[:1], "rlr", *col[1:], 5, A=30.0, R=2.0)  # FedAvg has no seed 5
    built = tables.build("fdcr-t4", tables.collect_runs([runs], {}))
    rows = {c["method"]: tables._row(c) for c in built["presets"]["paper"]["cells"]
            if c["column"] == ("fashion-mnist", 0.5, 30)}
    assert rows["trimmed-mean"]["collapse"].startswith("†3/3 (H 0.02, max q 0.99)")
    assert rows["trimmed-mean"]["degraded"] == "degraded"
    assert rows["dnc"]["degraded"] == "degraded" and rows["dnc"]["collapse"] == ""
    assert rows["multi-krum"]["degraded"] == "" and rows["fedavg"]["degraded"] == ""
    assert rows["rlr"]["degraded"] == ""  # not the same seeds: no mark
    md = tables.render_markdown(built, "paper")
    assert "†3/3 (H 0.02, max q 0.99)" in md and "| degraded |" in md


def summary(label, defense, seed, A, *, collapsed=False, entropy=None, q_max=None):
    cfg = {"experiment": {"seed": seed}, "defense": {"name": defense, "options": {}}}
    return {"label": label, "defense": defense, "seed": seed, "A": A, "R": 1.0, "ASR": 1.0,
            "V": 50.0, "collapsed": collapsed, "entropy": entropy, "q_max": q_max,
            "_config": cfg, "wall_time_s": 1.0}


def test_run_table_marks_collapsed_and_degraded_rows():
    rows = aggregate_seeds(
        [summary("fedavg", "fedavg", s, 88.0) for s in (0, 1)]
        + [summary("median", "median", s, 10.0, collapsed=True, entropy=0.0, q_max=1.0)
           for s in (0, 1)]
        + [summary("krum", "krum", s, 85.0) for s in (0, 1)])
    by = {r["label"]: r for r in rows}
    assert by["median"]["collapsed"] == "†2/2 (H 0.00, max q 1.00)"
    assert by["median"]["degraded"] == "degraded"
    assert by["krum"]["degraded"] == "" and by["fedavg"]["degraded"] == ""
