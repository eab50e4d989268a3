"""The engine benchmark still runs end to end (`make bench-full` is never part of `make test`).

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
