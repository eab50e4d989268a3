import pytest

from fisherguard.cli import main

pytestmark = pytest.mark.unit


def _tiny_config(tmp_path, *labels):
    """A one-round synthetic config, with a clean variant per label (none: a single run)."""
    p = tmp_path / "c.yaml"
    variants = "".join(f"  - {{label: {lb}, set: {{attack.fraction: 0.0}}}}\n" for lb in labels)
    p.write_text("data: {dataset: synthetic, synthetic_train: 300, synthetic_test: 100}\n"
                 "federation: {clients: 3, rounds: 1, local_epochs: 1}\nserver: {val_size: 16}\n"
                 + (f"variants:\n{variants}" if labels else ""))
    return p


def test_defenses_lists_every_registered_defense(capsys):
    from fisherguard.defenses import registry

    assert main(["defenses"]) == 0
    out = capsys.readouterr().out
    for name, cls in registry.available().items():
        assert name in out and cls.paper in out and cls.summary
    assert "fedavg" in out


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("federation: {rounds: -1}\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fisherguard: error: federation.rounds: must be > 0, got -1"


@pytest.mark.integration  # a CLI run that trains
def test_run_prints_the_table_and_writes_results(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("data: {dataset: synthetic, synthetic_train: 600, synthetic_test: 200}\n"
                 "federation: {clients: 4, rounds: 2, local_epochs: 1}\nserver: {val_size: 32}\n"
                 "variants:\n  - {label: clean, set: {attack.fraction: 0.0}}\n"
                 "  - {label: attacked, set: {attack.fraction: 0.5}}\n")
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "-q", "--set", "experiment.seed=1"]) == 0
    text = capsys.readouterr().out
    assert "label" in text and "clean" in text and "attacked" in text and "ASR" in text
    assert (out / "clean" / "rounds.jsonl").exists() and (out / "summary.csv").exists()
    assert "attacked" in (out / "summary.txt").read_text()
    import json
    import re

    import torch

    sw = json.loads((out / "clean" / "summary.json").read_text())["software"]  # which code ran
    assert sw["torch"] == torch.__version__ and set(sw) == {"fisherguard", "torch", "commit", "dirty"}
    assert sw["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", sw["commit"])
    assert "software" not in text  # provenance stays out of the table


@pytest.mark.integration  # a CLI run that trains
def test_keep_going_reports_a_failed_run_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    from fisherguard.engine import runner

    p = _tiny_config(tmp_path, "first", "bad", "last")
    real = runner.run

    def run(cfg, where, **kw):
        if kw.get("label") == "bad":
            where.mkdir(parents=True, exist_ok=True)  # as a run that fails after it started
            raise RuntimeError("boom in round 1")
        return real(cfg, where, **kw)

    monkeypatch.setattr(runner, "run", run)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):  # without the flag the campaign stops there
        main(["run", str(p), "--out", str(out), "-q"])
    assert not (out / "last").exists()
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(out), "--keep-going", "--resume"]) == 1
    cap = capsys.readouterr()
    assert "first" in cap.out and "last" in cap.out
    assert "run 1/3: first" in cap.err and "run 3/3: last" in cap.err  # the campaign's progress
    assert "1 of 3 runs failed" in cap.err and "bad: RuntimeError: boom in round 1" in cap.err
    assert (out / "last" / "summary.json").exists() and not (out / "bad" / "summary.json").exists()
    fresh = tmp_path / "fresh"  # a campaign in which every run fails still ends with its report
    assert main(["run", str(p), "--out", str(fresh), "--keep-going", "--only", "bad"]) == 1
    assert "1 of 1 runs failed" in capsys.readouterr().err and not (fresh / "summary.csv").exists()


def test_missing_dataset_names_the_fetch_command(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{dataset: mnist, data_dir: '{tmp_path / 'empty'}'}}\n")
    assert main(["run", str(p), "--out", str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert "fisherguard data fetch mnist" in err and "Traceback" not in err


@pytest.mark.integration  # a CLI run that trains
def test_seeds_give_mean_and_std_and_table_rereads_run_dirs(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("data: {dataset: synthetic, synthetic_train: 600, synthetic_test: 200}\n"
                 "federation: {clients: 4, rounds: 1, local_epochs: 1}\nserver: {val_size: 32}\n")
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "-q", "--seeds", "0,1"]) == 0
    text = capsys.readouterr().out
    assert "±" in text and "0,1" in text
    assert (out / "seed-0" / "summary.json").exists() and (out / "seed-1" / "summary.json").exists()
    assert main(["table", str(out)]) == 0
    assert "±" in capsys.readouterr().out
    assert main(["run", str(p), "--seeds", "0,x"]) == 2
    assert "--seeds expects" in capsys.readouterr().err


def test_aggregate_seeds_uses_sample_std_and_marks_collapse():
    from fisherguard.results import aggregate_seeds

    rows = aggregate_seeds([{"label": "m", "seed": s, "A": a, "R": 0.0, "ASR": 1.0, "V": 1.0,
                             "TPR": None, "FPR": 0.0, "collapsed": c}
                            for s, a, c in ((0, 1.0, False), (1, 2.0, True), (2, 3.0, False))])
    assert rows[0]["A"] == "2.00 ± 1.00" and rows[0]["collapsed"] == "†1/3" and rows[0]["TPR"] is None


def _summary(root, name, attack, defense, a, asr, wall, *, seed=0, collapsed=False,
             with_attack=True):
    import json

    d = root / name
    d.mkdir(parents=True)
    s = {"label": f"{attack} | {defense}", "defense": defense, "A": a, "ASR": asr,
         "wall_time_s": wall, "collapsed": collapsed, "seed": seed}
    if with_attack:
        s["attack"] = attack
    else:  # an older summary: the attack comes from the resolved config beside it
        (d / "config.yaml").write_text(f"attack:\n  name: {attack}\n")
    (d / "summary.json").write_text(json.dumps(s))


def test_table_by_attack_is_one_line_per_attack_with_a_column_pair_per_defense(tmp_path, capsys):
    _summary(tmp_path, "a", "badnets", "fedavg", 50.0, 20.0, 60.0)
    _summary(tmp_path, "b", "badnets", "fedavg", 54.0, 30.0, 80.0, seed=1)  # mean over seeds
    _summary(tmp_path, "c", "badnets", "fdcr", 40.0, 10.0, 100.0, with_attack=False)
    _summary(tmp_path, "d", "sign-flip", "fedavg", 10.0, 0.0, 50.0, collapsed=True)
    assert main(["table", str(tmp_path), "--by", "attack", "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| attack | fedavg A | fedavg ASR | fdcr A | fdcr ASR | fedavg s | fdcr s |"
    assert lines[2] == "| badnets | 52.00 | 25.00 | 40.00 | 10.00 | 70 | 100 |"
    assert lines[3] == "| sign-flip | 10.00† | 0.00† | – | – | 50 | – |"
    assert main(["table", str(tmp_path), "--by", "attack", "--metrics", "ASR"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head == ["attack", "fedavg", "ASR", "fdcr", "ASR", "fedavg", "s", "fdcr", "s"]
    assert main(["table", str(tmp_path), "--by", "attack", "--defenses", "fdcr,fedavg"]) == 0
    head = capsys.readouterr().out.splitlines()[0].split()
    assert head[:5] == ["attack", "fdcr", "A", "fdcr", "ASR"]
    assert main(["table", str(tmp_path), "--by", "row", "--markdown"]) == 0  # "row | column"
    assert capsys.readouterr().out.splitlines()[0] == (
        "| row | fedavg A | fedavg ASR | fdcr A | fdcr ASR | fedavg s | fdcr s |")
    assert main(["table", str(tmp_path), "--by", "attack", "--defenses", "krum"]) == 2
    assert "--defenses: no defense 'krum' among the runs" in capsys.readouterr().err


@pytest.mark.integration  # a CLI run that trains
def test_export_keeps_the_evidence_of_finished_runs_only(tmp_path, capsys):
    import gzip
    import json

    from fisherguard.results import RunDir

    p = tmp_path / "c.yaml"
    p.write_text("data: {dataset: synthetic, synthetic_train: 600, synthetic_test: 200}\n"
                 "federation: {clients: 4, rounds: 2, local_epochs: 1}\nserver: {val_size: 32}\n")
    runs, dest = tmp_path / "runs", tmp_path / "results"
    assert main(["run", str(p), "--out", str(runs / "done"), "-q"]) == 0
    unfinished = runs / "half"
    (unfinished).mkdir()
    (unfinished / "summary.json").write_text(json.dumps({"complete": False}))
    capsys.readouterr()
    assert main(["export", str(runs), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "exported" in out and "skipped" in out and "half" in out
    got = sorted(x.name for x in (dest / "done").iterdir())
    assert got == ["config.yaml", "defense.json", "partition.json", "rounds.jsonl.gz",
                   "summary.json"]  # no checkpoint
    assert not (dest / "half").exists()
    assert RunDir(dest / "done").rounds() == RunDir(runs / "done").rounds()
    assert len(RunDir(dest / "done").rounds()) == 2
    first = (dest / "done" / "rounds.jsonl.gz").read_bytes()
    assert main(["export", str(runs), str(dest)]) == 0  # the same records give the same bytes
    assert (dest / "done" / "rounds.jsonl.gz").read_bytes() == first
    assert gzip.decompress(first).decode().count("\n") == 2
    assert main(["export", str(tmp_path / "nothing"), str(dest)]) == 2
    assert "no run directories" in capsys.readouterr().err


def _run_dir(root, name, label, cfg, a, *, seed=0, wall=10.0):
    """A finished run directory: its resolved config (with ``seed``) and its summary."""
    import json

    import yaml

    d = root / name
    d.mkdir(parents=True)
    cfg = {"experiment": {"name": label, "seed": seed}, **cfg, "runtime": {"workers": seed + 1}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    s = {"label": label, "defense": cfg["defense"]["name"], "attack": "badnets", "A": a,
         "ASR": 1.0, "wall_time_s": wall, "collapsed": False, "seed": seed}
    (d / "summary.json").write_text(json.dumps(s))


def test_table_groups_only_runs_that_differ_in_the_seed(tmp_path, capsys):
    # issue 19.1: one label over unrelated configs must not become one "mean ± std" row
    krum = {"defense": {"name": "krum"}, "federation": {"rounds": 5}}
    median = {"defense": {"name": "median"}, "federation": {"rounds": 10}}
    _run_dir(tmp_path, "x/krum", "krum", krum, 10.0)
    _run_dir(tmp_path, "x/median", "krum", median, 20.0)
    _run_dir(tmp_path, "y/seed-0", "fedavg", {"defense": {"name": "fedavg"}}, 50.0, seed=0)
    _run_dir(tmp_path, "y/seed-1", "fedavg", {"defense": {"name": "fedavg"}}, 52.0, seed=1,
             wall=30.0)
    assert main(["table", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(lines) == 3
    assert lines[0].startswith("krum (defense.name=krum, federation.rounds=5) ")
    assert lines[1].startswith("krum (defense.name=median, federation.rounds=10) ")
    assert "10.00" in lines[0] and "20.00" in lines[1] and "±" not in lines[0] + lines[1]
    assert lines[2].startswith("fedavg ") and "51.00 ± 1.41" in lines[2]
    assert lines[2].split()[2] == "0,1" and lines[2].split()[-1] == "20.00"  # mean wall time


def test_pivot_refuses_a_cell_of_runs_that_differ_in_more_than_the_seed(tmp_path, capsys):
    from fisherguard.results import MixedRunsError, collect_summaries, pivot, same_but_seed

    base = {"defense": {"name": "fdcr"}, "data": {"dataset": "usps"}}
    _run_dir(tmp_path, "a", "fdcr", base, 10.0)
    _run_dir(tmp_path, "b", "fdcr", base, 20.0, seed=1)
    runs = collect_summaries(tmp_path)
    assert same_but_seed(runs[0], runs[1])
    assert "fdcr A" in pivot(runs, rows="attack", cols="defense")
    _run_dir(tmp_path, "c", "fdcr", {**base, "data": {"dataset": "mnist"}}, 30.0)
    runs = collect_summaries(tmp_path)
    assert not same_but_seed(runs[0], runs[2])
    with pytest.raises(MixedRunsError, match="data.dataset"):
        pivot(runs, rows="attack", cols="defense")
    assert main(["table", str(tmp_path), "--by", "attack"]) == 2
    assert "differ in more than the seed" in capsys.readouterr().err


def test_table_counts_refusals_and_rules_fired_from_the_round_records(tmp_path, capsys):
    # issue 15: the outcome matrix's "reason codes that fired", per side, from the records
    import gzip
    import json

    from fisherguard.results import rule_firings

    def rounds(reasons, clipped=()):
        return {"clients": {"ids": [0, 1, 2, 3], "reasons": reasons},
                "diagnostics": {"count_clipped": list(clipped)}}

    recs = [rounds([None, "clustered_out", "spiky", None], clipped=[3]),
            rounds([None, None, "spiky", "constant"])]
    got = rule_firings(recs, attackers=[2, 3])
    assert got["client_rounds"] == {"attacker": 4, "benign": 4}
    assert got["refused"] == {"attacker": 3, "benign": 1}
    assert got["fired"] == {"attacker": {"spiky": 2, "count_clipped": 1, "constant": 1},
                            "benign": {"clustered_out": 1}}
    base = {"defense": {"name": "fdcr"}}
    for name, seed, recs_ in (("s0", 0, recs), ("s1", 1, [rounds([None] * 4)] * 2)):
        _run_dir(tmp_path, name, "fdcr", base, 10.0, seed=seed)
        (tmp_path / name / "partition.json").write_text(json.dumps({"attackers": [2, 3]}))
        (tmp_path / name / "rounds.jsonl.gz").write_bytes(
            gzip.compress("".join(json.dumps(r) + "\n" for r in recs_).encode()))
    assert main(["table", str(tmp_path), "--by", "attack", "--metrics",
                 "A,att_refused,ben_refused,fired"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    # refused: 75 % and 0 % of attacker client-rounds by seed, 25 % and 0 % of benign ones
    assert row.split()[:4] == ["badnets", "10.00", "37.5", "12.5"]
    assert row.split("  ")[-1].strip() == "10"  # wall time
    assert "att constant 1/8, count_clipped 1/8, spiky 2/8; ben clustered_out 1/8" in row


def test_table_order_follows_the_matrix_config_and_marks_its_excluded_cells(tmp_path, capsys):
    import json

    cfg = tmp_path / "m.yaml"
    cfg.write_text("matrix:\n  rows: [{label: zeta, set: {}}, {label: alpha, set: {}}]\n"
                   "  columns: [{label: second, set: {}}, {label: first, set: {}}]\n"
                   "  exclude: [{row: alpha, columns: [second], why: cannot run there}]\n")
    runs = tmp_path / "runs"
    for i, (row, col) in enumerate([("alpha", "first"), ("zeta", "first"), ("zeta", "second"),
                                    ("extra", "first")]):
        name = f"r{i}"
        _run_dir(runs, name, f"{row} | {col}", {"defense": {"name": "fdcr"}}, 10.0 + i)
        s = json.loads((runs / name / "summary.json").read_text())
        (runs / name / "summary.json").write_text(json.dumps({**s, "row": row, "column": col}))
    assert main(["table", str(runs), "--by", "row", "--metrics", "A"]) == 0
    found = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:] if ln.strip()]
    assert found == ["alpha", "zeta", "extra"]  # directory order without --order
    assert main(["table", str(runs), "--by", "row", "--metrics", "A", "--order", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["row", "second", "A", "first", "A"]
    assert [ln.split()[0] for ln in out[2:5]] == ["zeta", "alpha", "extra"]
    assert out[3].split()[1:3] == ["excl.", "10.00"]  # alpha × second: excluded, not missing
    assert out[4].split()[1] == "–"  # extra × second: a row the config does not have
    assert "excl. alpha × second: cannot run there" in out
    _run_dir(runs, "r9", "zeta | first", {"defense": {"name": "fdcr"}}, 20.0, seed=1)
    s = json.loads((runs / "r9" / "summary.json").read_text())
    (runs / "r9" / "summary.json").write_text(json.dumps({**s, "row": "zeta", "column": "first"}))
    assert main(["table", str(runs), "--by", "row", "--metrics", "A,ASR", "--order", str(cfg),
                 "--compact", "--markdown"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| row (A / ASR) | second | first |"
    assert out[2] == "| zeta | 12.0 / 1.0 (1 seed) | 15.5 / 1.0 |"  # seeds 0 and 1 pooled
    assert out[3] == "| alpha | excl. | 10.0 / 1.0 (1 seed) |"
    table = ["table", str(runs), "--by", "row", "--metrics", "A,ASR", "--order", str(cfg), "--compact",
             "--markdown", "--seeds"]
    assert main(table + ["0"]) == 0  # one seed's table: no pooling, no "(1 seed)"
    assert capsys.readouterr().out.splitlines()[2:4] == ["| zeta | 12.0 / 1.0 | 11.0 / 1.0 |",
                                                          "| alpha | excl. | 10.0 / 1.0 |"]
    assert main(table + ["1"]) == 0  # only what seed 1 has run
    assert capsys.readouterr().out.splitlines() == ["| row (A / ASR) | first |", "|---|---:|",
                                                    "| zeta | 20.0 / 1.0 |"]
    assert main(["table", str(runs), "--seeds", "2"]) == 2
    assert "--seeds: no run of seed 2 below" in capsys.readouterr().err
    assert main(["table", str(runs), "--by", "row", "--order", str(cfg), "--defenses", "first"]) == 0
    assert "excl." not in capsys.readouterr().out  # the excluded cell's column is not shown
    assert main(["table", str(runs), "--by", "row", "--order", str(tmp_path / "none.yaml")]) == 2
    assert "--order: cannot read" in capsys.readouterr().err
    assert main(["table", str(runs), "--order", str(cfg)]) == 2
    assert "--order needs --by" in capsys.readouterr().err
    assert main(["table", str(runs), "--by", "row", "--metrics", "A,ASRR"]) == 2
    err = capsys.readouterr().err
    assert "--metrics: no run below" in err and "has ASRR; known:" in err and "att_refused" in err
    assert main(["table", str(runs), "--by", "row", "--metrics", "A,defense"]) == 2  # text, no metric
    assert "has defense; known:" in capsys.readouterr().err


def test_table_says_when_clients_failed(tmp_path, capsys):
    import json

    _run_dir(tmp_path, "a", "fdcr", {"defense": {"name": "fdcr"}}, 10.0)
    assert main(["table", str(tmp_path)]) == 0
    assert "clients failed" not in capsys.readouterr().out
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    s.update(nodes_failed=True, failed_client_rounds=3, failures={"missing": 3})
    (tmp_path / "a" / "summary.json").write_text(json.dumps(s))
    assert main(["table", str(tmp_path)]) == 0
    assert "clients failed" in capsys.readouterr().out.splitlines()[-1]


def test_a_run_directory_has_one_writer_and_no_stale_lock(tmp_path):
    import os
    import subprocess
    import sys

    from fisherguard.results import RunDir, RunInUse

    where = tmp_path / "run"
    with RunDir(where).lock():
        with pytest.raises(RunInUse, match=rf"{where} is being written by another process \(pid {os.getpid()}\)"):
            with RunDir(where).lock():
                pass
    with RunDir(where).lock():  # released on exit
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom fisherguard.results import RunDir\n"
         f"with RunDir({str(where)!r}).lock():\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f"pid {holder.pid}"):
            with RunDir(where).lock():
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with RunDir(where).lock():  # a killed holder leaves no lock behind
        pass


@pytest.mark.integration  # a CLI run that trains
def test_a_run_another_process_is_writing_is_refused_or_skipped(tmp_path, capsys):
    import os

    from fisherguard.results import RunDir

    p = _tiny_config(tmp_path, "first", "busy")
    out = tmp_path / "out"
    with RunDir(out / "busy").lock():
        assert main(["run", str(p), "--out", str(out), "-q", "--only", "busy"]) == 2
        assert f"is being written by another process (pid {os.getpid()})" in capsys.readouterr().err
        assert main(["run", str(p), "--out", str(out), "--keep-going", "--resume"]) == 0
        cap = capsys.readouterr()
    assert "fisherguard: skipped busy" in cap.err
    assert "1 runs skipped, another process is writing them: busy" in cap.err
    assert (out / "first" / "summary.json").exists() and not (out / "busy" / "summary.json").exists()
    assert main(["run", str(p), "--out", str(out), "--keep-going", "--resume", "-q"]) == 0
    assert (out / "busy" / "summary.json").exists()


@pytest.mark.integration  # a CLI run that trains
def test_the_campaign_summary_covers_every_finished_run_not_only_this_invocations(tmp_path, capsys):
    import csv
    import json

    p = _tiny_config(tmp_path, "first", "second", "third")
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "-q", "--only", "second", "--seeds", "0,1"]) == 0
    assert main(["run", str(p), "--out", str(out), "-q", "--only", "first", "--seeds", "0"]) == 0
    capsys.readouterr()
    partial = out / "third" / "seed-0"  # a run cut short: not in the summary
    partial.mkdir(parents=True)
    (partial / "summary.json").write_text(json.dumps({"label": "third", "complete": False}))
    rows = list(csv.DictReader((out / "summary.csv").open()))
    # this invocation's run first, then the others in directory order
    assert [(r["label"], r["seed"]) for r in rows] == [("first", "0"), ("second", "0"), ("second", "1")]
    text = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in text[2:]] == ["first", "second"]  # a row a variant
    assert "±" in text[3] and "±" not in text[2]  # second pools its two seeds
    assert main(["run", str(p), "--out", str(out), "-q", "--only", "first", "--seeds", "0",
                 "--resume"]) == 0
    assert [r["label"] for r in csv.DictReader((out / "summary.csv").open())] == ["first", "second", "second"]


@pytest.mark.integration  # a CLI run that trains
def test_a_finished_run_skipped_by_resume_keeps_the_provenance_of_the_code_that_made_it(tmp_path, capsys):
    import json

    p = _tiny_config(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(p), "--out", str(out), "-q"]) == 0
    path = out / "summary.json"
    made = json.loads(path.read_text())
    assert "software" in made  # the code that made it
    older = dict(made, software=dict(made["software"], commit="0" * 40))
    path.write_text(json.dumps(older))
    assert main(["run", str(p), "--out", str(out), "-q", "--resume"]) == 0
    again = json.loads(path.read_text())
    assert again["software"]["commit"] == "0" * 40 and again["A"] == made["A"]
    del older["software"]  # a run made before summaries recorded their code gets none invented
    path.write_text(json.dumps(older))
    assert main(["run", str(p), "--out", str(out), "-q", "--resume"]) == 0
    assert "software" not in json.loads(path.read_text())
    capsys.readouterr()
