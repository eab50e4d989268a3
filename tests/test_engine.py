"""End-to-end runs of the in-process engine on generated data."""

import json

import pytest

from fisherguard import config
from fisherguard.engine.runner import run

pytestmark = pytest.mark.integration

BASE = {
    "experiment": {"name": "e2e", "seed": 0},
    "data": {"dataset": "synthetic", "synthetic_train": 3000, "synthetic_test": 500},
    "partition": {"beta": 0.5},
    # lr 0.05 gets SimpleCNN off its initial plateau within a few short rounds
    "federation": {"clients": 6, "rounds": 6, "local_epochs": 2, "lr": 0.05},
    "attack": {"fraction": 0.5},
    "defense": "fedavg",
    "server": {"val_size": 64},
}


def cfg(**sets):
    return config.resolve(config.apply_overrides(BASE, sets))


@pytest.fixture(scope="module")
def attacked_and_clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    attacked = run(cfg(), root / "attacked", progress=None)
    clean = run(cfg(**{"attack.fraction": 0.0}), root / "clean", progress=None)
    return root, attacked, clean


def test_attacked_fedavg_gets_a_clearly_higher_asr(attacked_and_clean):
    _, attacked, clean = attacked_and_clean
    assert clean["A"] > 30, clean  # the federation learns (chance is 10)
    assert attacked["ASR"] > clean["ASR"] + 30, (attacked["ASR"], clean["ASR"])
    assert attacked["R"] < clean["R"]


def test_run_directory_contents(attacked_and_clean):
    root, attacked, _ = attacked_and_clean
    d = root / "attacked"
    lines = (d / "rounds.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rec = json.loads(lines[0])
    assert rec["round"] == 1
    assert abs(sum(rec["clients"]["weights"]) - 1) < 1e-9
    assert set(rec["metrics"]) >= {"A", "R", "ASR", "V", "collapsed"}
    assert rec["detection"]["TPR"] == 0.0  # FedAvg removes nobody
    part = json.loads((d / "partition.json").read_text())
    assert part["attackers"] == [3, 4, 5] and sum(part["sizes"]) == part["client_pool"]
    assert (d / "summary.csv").read_text().startswith("label,defense,A,R,ASR,V,collapsed")


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    short = {"federation.rounds": 2}
    runs = [run(cfg(**short, **{"experiment.seed": s}), tmp_path / str(i), progress=None)
            for i, s in enumerate((0, 0, 1))]
    lines = [[_strip(x) for x in (tmp_path / str(i) / "rounds.jsonl").read_text().splitlines()]
             for i in range(3)]
    assert lines[0] == lines[1]
    assert lines[0] != lines[2]
    assert runs[0]["A"] == runs[1]["A"] and runs[0]["ASR"] == runs[1]["ASR"]


def _strip(line):
    return {k: v for k, v in json.loads(line).items() if k not in ("wall_time_s", "timing")}


def test_resume_after_kill_equals_uninterrupted(attacked_and_clean, tmp_path):
    root, attacked, _ = attacked_and_clean
    out = tmp_path / "resumed"
    run(cfg(), out, progress=None, stop_after=2)  # "killed" after round 2
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2
    # a half-written line from the kill must not survive the resume
    with open(out / "rounds.jsonl", "a") as f:
        f.write('{"round": 3, "metr')
    resumed = run(cfg(), out, resume=True, progress=None)
    a = [_strip(x) for x in (root / "attacked" / "rounds.jsonl").read_text().splitlines()]
    b = [_strip(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert a == b
    assert resumed["A"] == attacked["A"] and resumed["ASR"] == attacked["ASR"]


def test_resume_refuses_a_different_config(tmp_path):
    from fisherguard.results import ResumeError

    out = tmp_path / "r"
    run(cfg(**{"federation.rounds": 1}), out, progress=None)
    with pytest.raises(ResumeError, match="different config"):
        run(cfg(**{"federation.rounds": 2, "attack.fraction": 0.2}), out, resume=True, progress=None)
    with pytest.raises(ResumeError, match="--resume"):
        run(cfg(**{"federation.rounds": 1}), out, progress=None)


def test_resume_may_change_only_the_runtime_section_and_the_name(tmp_path):
    out = tmp_path / "r"
    run(cfg(**{"federation.rounds": 2}), out, progress=None, stop_after=1)
    done = run(cfg(**{"federation.rounds": 2, "runtime.workers": 2, "runtime.threads": 1,
                      "experiment.name": "renamed"}), out, resume=True, progress=None)
    assert done["complete"]
    assert "workers: 2" in (out / "config.yaml").read_text()
