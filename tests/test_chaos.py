"""A kill at any moment leaves every results file whole, and a resumed run is the same run (issue 19).

The unit tests stop a write halfway (the chaos hook's pause, made to raise as if the process died
there) and check that the file still holds its old, complete content. The integration test is a
small sample of ``make chaos`` (tools/chaos.py): a SIGKILL of a real run inside a checkpoint
write, then ``--resume`` and a bit-for-bit comparison with the uninterrupted run.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from fisherguard import results
from fisherguard.results import RunDir, write_csv

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


class Died(BaseException):
    """Stands for SIGKILL: raised where the hook pauses, halfway through a write."""


@pytest.fixture
def dies_halfway(monkeypatch, tmp_path):
    monkeypatch.setenv(results.WRITE_LOG, str(tmp_path / "writes.log"))
    monkeypatch.setenv(results.WRITE_PAUSE, "0")

    def die(_s: float) -> None:
        raise Died

    def arm() -> None:
        monkeypatch.setattr(results.time, "sleep", die)

    return arm


def test_a_kill_inside_a_round_append_leaves_whole_lines(tmp_path, dies_halfway) -> None:
    run = RunDir(tmp_path / "run")
    run.start("experiment: {name: x}\n", resume=False)
    run.append_round({"round": 1, "metrics": {"A": 50.0}})
    before = (run.path / RunDir.ROUNDS).read_bytes()
    dies_halfway()
    with pytest.raises(Died):
        run.append_round({"round": 2, "metrics": {"A": 60.0}, "pad": "x" * 1000})
    # the plain append left half of round 2's line here
    assert (run.path / RunDir.ROUNDS).read_bytes() == before
    assert [r["round"] for r in run.rounds()] == [1]


def test_append_drops_a_line_an_older_version_left_cut_short(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("experiment: {name: x}\n", resume=False)
    run.append_round({"round": 1})
    with open(run.path / RunDir.ROUNDS, "a") as f:
        f.write('{"round": 2, "metr')
    run.append_round({"round": 2})
    lines = (run.path / RunDir.ROUNDS).read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]


def test_a_kill_inside_a_summary_or_checkpoint_write_keeps_the_old_file(tmp_path, dies_halfway) -> None:
    run = RunDir(tmp_path / "run")
    run.start("experiment: {name: x}\n", resume=False)
    run.write_summary({"label": "x", "A": 1.0})
    run.save_checkpoint({"rounds_done": 1, "weights": torch.arange(4.0)})
    run.write_text("partition.json", "[1, 2]")
    old = {p.name: p.read_bytes() for p in run.path.iterdir()}
    dies_halfway()
    for write in (lambda: run.write_summary({"label": "y", "A": 2.0, "pad": "z" * 500}),
                  lambda: write_csv(run.path / RunDir.SUMMARY_CSV, [{"label": "y" * 500}]),
                  lambda: run.save_checkpoint({"rounds_done": 2, "weights": torch.ones(100)}),
                  lambda: run.write_text("partition.json", "[3, 4, 5, 6]")):
        with pytest.raises(Died):
            write()
    for name, data in old.items():
        assert (run.path / name).read_bytes() == data, name
    rows = list(csv.DictReader(io.StringIO((run.path / RunDir.SUMMARY_CSV).read_text())))
    assert rows[0]["label"] == "x"
    assert run.load_checkpoint()["rounds_done"] == 1


def _chaos_module():
    spec = importlib.util.spec_from_file_location("fg_chaos", ROOT / "tools" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_check_files_finds_cut_short_files(tmp_path) -> None:
    chaos = _chaos_module()
    (tmp_path / "rounds.jsonl").write_text('{"round": 1}\n{"round": 2, "me')
    (tmp_path / "summary.json").write_text('{"A": ')
    (tmp_path / "summary.csv").write_text("label,A\r\nx,")
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half")  # a temp file is not a results file
    problems = chaos.check_files(tmp_path)
    assert [p.split(":")[0] for p in problems] == ["rounds.jsonl", "rounds.jsonl", "summary.csv",
                                                   "summary.json"]


@pytest.mark.integration
def test_a_sigkilled_run_resumes_bit_identical(tmp_path, capsys) -> None:
    """A sample of ``make chaos`` (three process starts, most of this test's time): one SIGKILL
    inside a checkpoint write leaves every file whole, and the resume ends with the reference
    run's exact results. ``make chaos`` runs many, at random moments and in every results file."""
    chaos = _chaos_module()
    rc = chaos.main(["--kills", "1", "--seed", "0", "--rounds", "2", "--defense", "foolsgold",
                     "--write-share", "1", "--second-kill", "0", "--targets", "checkpoint.pt",
                     "--keep", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "kills tried 1 in 1 trials (1 landed, 0 missed" in out, out
    assert "trials survived 1/1" in out and "landed inside checkpoint.pt write" in out, out
