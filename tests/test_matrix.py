"""`fisherguard matrix`: the defenses × attacks plan under its budget protocol, and a tiny run."""

from __future__ import annotations

import pytest

from fisherguard.attacks import registry as attacks
from fisherguard.cli import main
from fisherguard.report import matrix
from fisherguard.report.reproduce import PlanError

pytestmark = pytest.mark.unit


def test_every_shipped_attack_and_honest_defense_is_in_the_plan_once():
    names = matrix.attack_names()
    assert len(names) == len(set(names)) == len(attacks.available()) - 1  # all but "none"
    assert "badnets+pgd" in names and "pgd" not in names  # a training change rides on BadNets
    assert "badnets+f-zero" in names and "alie" in names and "a3fl" in names
    assert "edge-case" in names and "label-flip" in names  # they poison data themselves
    ds = matrix.defense_names()
    assert ds[:3] == ["fedavg", "fdcr", "sdfc"] and "fdcr-oracle" not in ds
    runs = matrix.plan()
    assert len(runs) == len(names) * len(ds) and len({r.key for r in runs}) == len(runs)


def test_the_protocol_and_budgets_are_the_stated_ones():
    cfg = matrix.config_for("a3fl", "fdcr")
    assert (cfg.data.dataset, cfg.federation.clients, cfg.partition.beta) == ("usps", 10, 0.5)
    assert (cfg.federation.local_epochs, cfg.federation.rounds, cfg.attack.fraction) == (2, 20, 0.3)
    assert dict(cfg.attack.options) == {"trigger_epochs": 5, "adv_epochs": 1}
    assert dict(matrix.config_for("badnets+pgd", "fedavg").attack.options) == {}
    assert "usps" in matrix.protocol_text(matrix.plan(defenses_=["fedavg"], attacks_=["alie"]))


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(PlanError, match="no defense 'krum2'; choose from fedavg"):
        matrix.plan(defenses_=["krum2"])
    with pytest.raises(PlanError, match="no attack 'pgd'"):
        matrix.plan(attacks_=["pgd"])


@pytest.mark.integration
def test_a_tiny_matrix_runs_reports_and_skips_what_is_done(tmp_path, capsys):
    args = ["matrix", "--attacks", "sign-flip", "--defenses", "fedavg,median",
            "--out", str(tmp_path), "--jobs", "2",
            "--set", "data.dataset=synthetic", "--set", "data.synthetic_train=400",
            "--set", "data.synthetic_test=100", "--set", "federation.clients=4",
            "--set", "federation.rounds=1", "--set", "federation.local_epochs=1",
            "--set", "server.val_size=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ran 2" in out and "failed 0" in out
    head = [ln for ln in out.splitlines() if ln.startswith("attack")][0].split()
    assert head[:5] == ["attack", "fedavg", "A", "fedavg", "ASR"]
    assert (tmp_path / "matrix-attack-defense.png").stat().st_size > 2000
    assert main(args) == 0
    assert "already done 2" in capsys.readouterr().out
