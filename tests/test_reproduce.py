"""`fisherguard reproduce`: the grids of the published tables, run keys, skipping finished runs."""

from __future__ import annotations

import pytest

from fisherguard.cli import main
from fisherguard.report import reproduce
from report_fixture import fake_run

pytestmark = pytest.mark.unit

T4_METHODS = ["fedavg", "multi-krum", "foolsgold", "rlr", "dnc", "mma", "trimmed-mean", "bulyan",
              "rfa", "fltrust", "sageflow", "finetuning", "crfl", "fdcr"]
T5_METHODS = ["foolsgold", "dnc", "sageflow", "trimmed-mean", "bulyan", "rfa", "rsa", "rlr", "crfl",
              "fltrust", "finetuning", "sdfc", "fedavg"]


@pytest.mark.parametrize("table, datasets, betas, upsilons, methods", [
    ("fdcr-t4", ["cifar10", "fashion-mnist", "usps"], [0.5, 0.3], [30, 20], T4_METHODS),
    ("fdcr-t3", ["cifar10", "fashion-mnist"], [0.5, 0.3], [30],
     ["fedavg", "fdcr:fcdc-only", "fdcr:fpra-only", "fdcr"]),
    ("sdfc-t5", ["mnist", "fashion-mnist", "cifar10"], [0.5, 1.0], [30, 50], T5_METHODS),
    ("sdfc-t3", ["mnist", "fashion-mnist", "cifar10"], [0.5], [30],
     ["fedavg", "sdfc:fdreg-only", "sdfc:fdagg-only", "sdfc"]),
])
def test_p0_grids(table, datasets, betas, upsilons, methods):
    g = reproduce.grid(table)
    assert (g["dataset"], g["beta"], g["upsilon"], g["method"]) == (datasets, betas, upsilons,
                                                                    methods)
    assert len(reproduce.columns(table)) == len(datasets) * len(betas) * len(upsilons)


def test_fdcr_t4_usps_30_column_plan(tmp_path):
    runs = reproduce.plan("FDCR Table 4", datasets=["usps"], upsilons=[30], betas=[0.5],
                          out=tmp_path)
    assert len(runs) == 14 * 3
    assert [r.method for r in runs[::3]] == T4_METHODS
    cfg = runs[0].config
    assert (cfg.data.dataset, cfg.attack.fraction, cfg.partition.beta, cfg.experiment.family,
            cfg.federation.rounds, cfg.federation.local_epochs, cfg.runtime.threads) == \
        ("usps", 0.3, 0.5, "fdcr", 50, 10, 1)
    assert {r.config.experiment.seed for r in runs} == {0, 1, 2}
    assert all(r.status == "pending" for r in runs)


def test_whole_p0_plan_counts():
    # cheap tables in full; the two large ones by one column × one seed
    assert len(reproduce.plan("fdcr-t3")) == 2 * 2 * 4 * 3
    assert len(reproduce.plan("sdfc-t3")) == 3 * 4 * 3
    assert len(reproduce.plan("sdfc-t5", datasets=["mnist"], betas=[1.0], upsilons=[50],
                              seeds=[0])) == 13


def test_presets_and_scales():
    [code] = reproduce.plan("fdcr-t4", datasets=["fashion-mnist"], betas=[0.5], upsilons=[20],
                            methods=["fdcr"], seeds=[1], presets=["code"])
    assert (code.config.experiment.preset, code.config.federation.rounds) == ("code", 100)
    [red] = reproduce.plan("fdcr-t4", datasets=["fashion-mnist"], betas=[0.5], upsilons=[20],
                           methods=["fdcr"], seeds=[1], scale="reduced")
    assert (red.config.federation.rounds, red.config.federation.local_epochs) == (20, 2)
    assert red.key != code.key
    [sd] = reproduce.plan("sdfc-t3", datasets=["mnist"], methods=["sdfc:fdagg-only"], seeds=[0])
    assert sd.config.experiment.family == "sdfc" and sd.config.defense.options == {
        "use_fdreg": False}


def test_shared_runs_have_one_key():
    a = reproduce.plan("fdcr-t3", datasets=["cifar10"], betas=[0.3], methods=["fedavg"])
    b = reproduce.plan("fdcr-t4", datasets=["cifar10"], betas=[0.3], upsilons=[30],
                       methods=["fedavg"])
    assert [r.key for r in a] == [r.key for r in b]
    c = reproduce.plan("sdfc-t3", datasets=["cifar10"], methods=["fedavg"])  # other trigger
    assert not {r.key for r in a} & {r.key for r in c}


def test_bad_requests():
    with pytest.raises(reproduce.PlanError):
        reproduce.plan("fdcr-t9")
    with pytest.raises(reproduce.PlanError):
        reproduce.plan("sdfc-t1")
    with pytest.raises(reproduce.PlanError):
        reproduce.plan("fdcr-t3", datasets=["usps"])
    with pytest.raises(reproduce.PlanError):
        reproduce.plan("sdfc-t5", methods=["fdcr-oracle"])
    assert reproduce.plan("fdcr-t4", datasets=["usps"], betas=[0.5], upsilons=[20],
                          methods=["fdcr-oracle"], seeds=[0])[0].config.defense.name \
        == "fdcr-oracle"


def test_dry_run_skips_a_finished_run(tmp_path, capsys):
    out = tmp_path / "runs"
    done = fake_run(out, "fdcr-t3", "fdcr", "cifar10", 0.5, 30, 1, A=60.0, R=50.0)
    partial = fake_run(out, "fdcr-t3", "fdcr", "cifar10", 0.5, 30, 2, A=60.0, R=50.0,
                       complete=False)
    args = ["reproduce", "fdcr-t3", "--datasets", "cifar10", "--betas", "0.5", "--methods",
            "fdcr", "--out", str(out)]
    assert main(args + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "total 3 runs: 1 done, 1 partial, 1 pending"
    assert f"{done.name}  cifar10  fdcr  seed 1  done" in lines
    assert f"{partial.name}  cifar10  fdcr  seed 2  partial" in lines
    runs = reproduce.plan("fdcr-t3", datasets=["cifar10"], betas=[0.5], methods=["fdcr"],
                          seeds=[1, 2], out=out)
    counts = reproduce.execute(runs, echo=lambda s: None)  # nothing pending: nothing runs
    assert counts == {"ran": 0, "failed": 0, "already done": 1, "partial skipped": 1}


@pytest.mark.integration
def test_reproduce_runs_a_tiny_grid_once(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["reproduce", "fdcr-t3", "--datasets", "cifar10", "--betas", "0.5", "--methods",
            "fedavg", "--seeds", "0", "--out", str(out), "--set", "data.dataset=synthetic",
            "--set", "federation.rounds=1", "--set", "federation.local_epochs=1",
            "--set", "data.synthetic_train=400", "--set", "data.synthetic_test=100",
            "--set", "server.val_size=16"]
    assert main(args) == 0
    assert "ran 1" in capsys.readouterr().out
    assert main(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "total 1 runs: 1 done, 0 partial, 0 pending"


def test_a_bad_number_list_is_one_clear_line(capsys):
    from fisherguard.cli import main

    assert main(["reproduce", "fdcr-t4", "--upsilons", "0.3", "--dry-run"]) == 2
    assert "--upsilons expects comma-separated integers, got '0.3' (Υ in percent" in \
        capsys.readouterr().err
