"""Every registered defense runs end to end through the in-process engine on generated data."""

import json
import math
import warnings

import pytest

from fisherguard import config
from fisherguard.defenses import registry
from fisherguard.engine.runner import run

pytestmark = pytest.mark.integration

BASE = {
    "data": {"dataset": "synthetic", "synthetic_train": 600, "synthetic_test": 200},
    "federation": {"clients": 5, "rounds": 2, "local_epochs": 1},
    "attack": {"fraction": 0.4},
    "server": {"val_size": 32},
}


@pytest.mark.parametrize("name", sorted(registry.available()))
def test_defense_runs_through_the_engine(name, tmp_path):
    cfg = config.resolve(config.apply_overrides(BASE, {"defense": name}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(cfg, tmp_path, progress=None)
    assert summary["complete"] and summary["rounds"] == 2
    rounds = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    for rec in rounds:
        w = rec["clients"]["weights"]
        assert len(w) == 5 and all(x >= 0 for x in w)
        assert math.isclose(sum(w), 1.0, abs_tol=1e-6) or rec["status"] != "ok"
        assert [x == 0 for x in w] == rec["clients"]["flagged"]
        assert all(0 <= rec["metrics"][m] <= 100 for m in ("A", "R", "ASR", "V"))
        # issue 21: the suspicion score's ranking, null for a defense without a score
        auc = rec["detection"]["AUC"]
        assert (auc is None) if registry.get(name).suspicion_score is None else 0 <= auc <= 1
    assert summary["AUC_rounds"] == (0 if registry.get(name).suspicion_score is None else 2)
    oracle = registry.get(name).needs_attacker_ids
    assert any("ground truth" in str(c.message) for c in caught) == oracle
    assert ("ground truth" in summary["defense"]) == oracle
