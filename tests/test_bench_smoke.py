"""The engine benchmarks still run end to end (`make bench-full` is never part of `make test`).

A one-round, one-epoch run of `bench.py --full` on 2 000 Fashion-MNIST images: it must finish,
print the round's split and target 2's lines, and write its JSON lines. It checks that the
benchmark works, never how fast anything is.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
FLOOR = BENCH.with_name("kernel_floor.py")


def test_bench_full_runs_a_tiny_round_and_reports_its_split(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--full", "--rounds", "1", "--epochs", "1",
         "--train-subset", "2000", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert "NOTE: not the target configuration" in text  # a shortened run gets no PASS/MISS
    for line in ("batch staging, summed over groups", "backward, summed over groups",
                 "workers idle (gap to the slowest)", "target 2  client Fisher"):
        assert line in text, line
    names = {json.loads(x)["name"] for x in out.read_text().splitlines() if x.strip()}
    assert {"target3/wall", "target4/wall_over_compute_bound",
            "target2/fisher_local_epochs_full_run"} <= names


def test_kernel_floor_times_the_rest_of_the_step_against_target_2s_budget(tmp_path):
    out = tmp_path / "floor.jsonl"
    proc = subprocess.run([sys.executable, str(FLOOR), "--groups", "2", "--reps", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for part in ("pool1 + ReLU", "pool2 + ReLU", "linear layers + ReLU", "cross-entropy",
                 "optimiser step", "batch staging", "target 2 (training <= 1.3x the kernel floor)",
                 "without the pools and their ReLU"):
        assert part in proc.stdout, part
    rows = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    rest = rows["floor/g2/rest"]
    floor = rows["floor/g2/run"]["per_sample_s"]
    assert rest["budget"] == pytest.approx(0.3 * floor)
    assert 0 < rest["without_pools"] < rest["value"]
