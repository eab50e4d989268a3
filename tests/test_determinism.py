"""The same seed gives the same numbers, bit for bit, whatever the thread or worker count.

The in-process engine computes on one intra-op thread in every process and trains fixed groups
(``grouped.make_groups``) that workers take whole, so ``runtime.threads`` and ``runtime.workers``
change speed only. ``runtime.group_size`` and ``runtime.trainer`` change float rounding: they are
part of a run's identity and a resume that changes them is refused, naming the key.
"""

import json

import pytest
import torch

from fisherguard import config
from fisherguard.engine.runner import run
from fisherguard.results import ResumeError

pytestmark = pytest.mark.integration

# four clients in groups of two, so two workers each take a whole group; FDCR adds the Fisher,
# the server's clustering and its aggregation to what must not depend on the layout
BASE = {
    "experiment": {"name": "det", "seed": 2},
    "data": {"dataset": "synthetic", "synthetic_train": 900, "synthetic_test": 200},
    "partition": {"beta": 0.5},
    "federation": {"clients": 4, "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32},
    "attack": {"fraction": 0.25},
    "defense": "fdcr",
    "server": {"val_size": 32},
    "runtime": {"group_size": 2},
}


def cfg(**sets):
    return config.resolve(config.apply_overrides(BASE, sets))


def outcome(out):
    """Final weights and every round record without its timings."""
    weights = torch.load(out / "checkpoint.pt", weights_only=False)["weights"]
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for r in records:
        for key in ("wall_time_s", "timing"):
            r.pop(key, None)
        for s in r["clients"].get("timing", []) or []:
            s.clear()
    return weights, records


def test_threads_and_workers_give_bit_identical_runs(tmp_path):
    layouts = {"t1-w1": {"runtime.threads": 1, "runtime.workers": 1},
               "t2-w1": {"runtime.threads": 2, "runtime.workers": 1},
               "t1-w2": {"runtime.threads": 1, "runtime.workers": 2},
               "t2-w2": {"runtime.threads": 2, "runtime.workers": 2}}
    got = {}
    for name, sets in layouts.items():
        run(cfg(**sets), tmp_path / name, progress=None)
        got[name] = outcome(tmp_path / name)
    ref_w, ref_rounds = got["t1-w1"]
    for name, (w, rounds) in got.items():
        assert torch.equal(w, ref_w), (name, float((w - ref_w).abs().max()))
        assert rounds == ref_rounds, name
    assert torch.get_num_threads() >= 1  # the run gave back the caller's thread count


def test_resume_on_other_threads_and_workers_equals_uninterrupted(tmp_path):
    run(cfg(), tmp_path / "whole", progress=None)
    out = tmp_path / "resumed"
    run(cfg(**{"runtime.threads": 2, "runtime.workers": 2}), out, progress=None, stop_after=1)
    run(cfg(**{"runtime.threads": 1, "runtime.workers": 1}), out, resume=True, progress=None)
    w, rounds = outcome(out)
    ref_w, ref_rounds = outcome(tmp_path / "whole")
    assert torch.equal(w, ref_w)
    assert rounds == ref_rounds


@pytest.mark.parametrize("key,value", [("group_size", 3), ("trainer", "sequential")])
def test_resume_refuses_a_runtime_setting_that_changes_the_numbers(tmp_path, key, value):
    out = tmp_path / "r"
    run(cfg(), out, progress=None, stop_after=1)
    with pytest.raises(ResumeError, match=f"runtime.{key}"):
        run(cfg(**{f"runtime.{key}": value}), out, resume=True, progress=None)


def test_resume_names_the_key_of_a_different_config(tmp_path):
    out = tmp_path / "r"
    run(cfg(**{"federation.rounds": 1}), out, progress=None)
    with pytest.raises(ResumeError, match="attack.fraction"):
        run(cfg(**{"attack.fraction": 0.5}), out, resume=True, progress=None)
