"""The shipped sanity config (``configs/synthetic-quick.yaml``, "a seconds-long sanity run") must
learn: a first run that looks broken (A = 10, collapsed) must not ship (issue 19.4)."""

from pathlib import Path

import pytest

from fisherguard import config
from fisherguard.engine.runner import run

pytestmark = pytest.mark.integration

QUICK = Path(__file__).resolve().parents[1] / "configs" / "synthetic-quick.yaml"


def test_the_sanity_config_learns_in_seconds_without_an_attack(tmp_path):
    (variant,) = config.load(QUICK, ["attack.name=none", "runtime.threads=1"])
    s = run(variant.config, tmp_path / "run", progress=None)
    assert s["complete"] and not s["collapsed"]
    assert s["A"] >= 90.0, s  # the mean of the last five rounds
