"""fisherguard.report.plots on hand-written runs: 2 defenses × 2 attacks, 3 rounds, K = 4."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fisherguard.report.plots import ATTACKER_COLOUR, find_runs, matrix_cells, write_plots

pytestmark = pytest.mark.integration  # matplotlib renders take ~20 s in all

ATTACKS = ("badnets", "dba")
DEFENSES = {"fedavg": "FedAvg", "multi-krum": "Multi-Krum"}
ATTACKER = 3  # of clients 0..3
GROUP = "on-synthetic-beta-0-5-attackers-0-25"  # the file stem after the attack's name
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(attack: str, defense: str) -> list[dict]:
    """Three rounds; Multi-Krum removes the attacker from round 2 on and reports detection."""
    out = []
    for t in (1, 2, 3):
        krum = defense == "multi-krum"
        flagged = [False, False, False, krum and t > 1]
        weights = [1 / 3, 1 / 3, 1 / 3, 0.0] if flagged[3] else [0.25] * 4
        out.append({
            "round": t,
            "metrics": {"A": 20.0 * t, "ASR": 90.0 - (25.0 * t if krum else 5.0 * t)},
            "detection": ({"TPR": 100.0 if t > 1 else 0.0, "FPR": 0.0, "removed": int(t > 1),
                           "attacker_share": 25.0} if krum else None),
            "clients": {"ids": [0, 1, 2, 3], "weights": weights, "flagged": flagged,
                        "reasons": ["not_selected" if f else None for f in flagged],
                        "num_samples": [100.0, 120.0, 80.0, 100.0]},
            "attack": {"name": attack, "active": True},
        })
    return out


def _run(root: Path, attack: str, defense: str) -> Path:
    d = root / f"{attack}-{defense}"
    d.mkdir(parents=True)
    d.joinpath("config.yaml").write_text(
        "experiment: {name: demo, seed: 0}\ndata: {dataset: synthetic}\n"
        "partition: {beta: 0.5}\nfederation: {clients: 4, rounds: 3}\n"
        f"attack: {{name: {attack}, fraction: 0.25}}\ndefense: {{name: {defense}}}\n"
        "runtime: {threads: 1}\n")
    recs = _records(attack, defense)
    d.joinpath("rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"label": f"{attack} | {DEFENSES[defense]}", "defense": defense, "rounds": 3,
               "A": recs[-1]["metrics"]["A"], "ASR": recs[-1]["metrics"]["ASR"],
               "collapsed": attack == "dba" and defense == "fedavg", "seed": 0,
               "dataset": "synthetic", "complete": True}
    if attack == "badnets":  # the dba summaries are older ones: the attack comes from config.yaml
        summary["attack"] = attack
    d.joinpath("summary.json").write_text(json.dumps(summary))
    d.joinpath("partition.json").write_text(json.dumps({"sizes": [100, 120, 80, 100],
                                                        "attackers": [ATTACKER]}))
    return d


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for a in ATTACKS:
        for d in DEFENSES:
            _run(root, a, d)
    return root


@pytest.fixture(scope="module")
def written(runs_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("plots")
    return out, write_plots(runs_root, out)


def _stems() -> set[str]:
    stems = {"matrix-attack-defense"}
    for a in ATTACKS:
        stems |= {f"curves-{a}-{GROUP}", f"detection-{a}-{GROUP}"}
        stems |= {f"weights-{a}-{d}" for d in DEFENSES}
    return stems


def test_every_plot_is_written_in_both_formats(written):
    out, paths = written
    expected = {out / f"{s}.{ext}" for s in _stems() for ext in ("png", "svg")}
    assert set(paths) == expected and len(paths) == len(expected)
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 2048, p.name
        if p.suffix == ".png":
            assert data.startswith(PNG_MAGIC), p.name
        else:
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data, p.name
        assert re.fullmatch(r"[a-z0-9-]+\.(png|svg)", p.name), p.name  # slug-safe names


def test_curves_have_both_panels_and_every_defense(written):
    out, _ = written
    for a in ATTACKS:
        svg = (out / f"curves-{a}-{GROUP}.svg").read_text()
        for text in (">A<", ">ASR<", ">FedAvg<", ">Multi-Krum<", ">round<", a, "β=0.5"):
            assert text in svg, (a, text)


def test_detection_only_for_runs_that_carry_it(written):
    out, _ = written
    svg = (out / f"detection-badnets-{GROUP}.svg").read_text()
    assert ">TPR<" in svg and ">FPR<" in svg and ">Multi-Krum<" in svg
    assert "FedAvg" not in svg  # its records have no detection


def test_weights_mark_the_attacker_and_hatch_flagged_clients(written):
    out, _ = written
    for d in DEFENSES:
        svg = (out / f"weights-badnets-{d}.svg").read_text()
        ticks = dict((m.group(2), m.group(1)) for m in
                     re.finditer(r'<text style="([^"]*)"[^>]*>(\d)</text>', svg))
        assert ATTACKER_COLOUR in ticks[str(ATTACKER)]
        assert all(ATTACKER_COLOUR not in ticks[str(c)] for c in range(4) if c != ATTACKER)
        assert "attacker (id in red)" in svg and "client id" in svg
        # hatching is an SVG pattern, used once per flagged cell (two for Multi-Krum) and legend
        uses = len(re.findall(r"fill: url\(#h", svg))
        assert uses == (1 + 2 if d == "multi-krum" else 1), (d, uses)


def test_matrix_is_attacks_by_defenses_with_a_over_asr(written):
    out, _ = written
    svg = (out / "matrix-attack-defense.svg").read_text()
    for text in (">badnets<", ">dba<", ">fedavg<", ">multi-krum<", "ASR (%)", ">attack<",
                 ">defense<"):
        assert text in svg, text
    assert ">60.0/75.0<" in svg and ">60.0/15.0<" in svg  # badnets: FedAvg, Multi-Krum
    assert ">60.0/75.0†<" in svg  # dba | FedAvg collapsed


def test_matrix_cells_average_seeds_like_pivot():
    s = [{"attack": "x", "defense": "d", "A": 10.0, "ASR": 50.0, "collapsed": False},
         {"attack": "x", "defense": "d", "A": 20.0, "ASR": 70.0, "collapsed": True},
         {"attack": "y", "defense": "d", "A": 30.0, "ASR": None}]
    rows, cols, cells = matrix_cells(s)
    assert rows == ["x", "y"] and cols == ["d"]
    assert cells[("x", "d")] == {"A": 15.0, "ASR": 60.0, "collapsed": True}
    assert cells[("y", "d")] == {"A": 30.0, "ASR": None, "collapsed": False}
    with pytest.raises(ValueError, match="no 'attack'"):
        matrix_cells([{"label": "z", "defense": "d"}])


def test_same_runs_give_the_same_bytes(runs_root, tmp_path):
    # one run has every kind of plot (curves, detection, hatched weights, matrix)
    first = write_plots([runs_root / "badnets-multi-krum"], tmp_path / "a")
    again = write_plots(runs_root / "badnets-multi-krum", tmp_path / "b")
    assert len(first) == 8 and [p.name for p in again] == [p.name for p in first]
    for p, q in zip(first, again):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_exported_runs_read_gzip_records(runs_root, written, tmp_path):
    from fisherguard.results import export_runs

    done, _ = export_runs(runs_root / "badnets-multi-krum", tmp_path / "exported" / "r")
    assert done and not (done[0] / "rounds.jsonl").exists()
    paths = write_plots(tmp_path / "exported", tmp_path / "out")
    assert {p.name for p in paths} >= {"weights-r.png", "weights-r.svg"}
    for ext in ("png", "svg"):  # the same figure as from the live run directory
        ref = written[0] / f"weights-badnets-multi-krum.{ext}"
        assert (tmp_path / "out" / f"weights-r.{ext}").read_bytes() == ref.read_bytes()


def test_no_run_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        write_plots(empty, tmp_path / "out")
    with pytest.raises(ValueError, match="not a directory"):
        write_plots([tmp_path / "missing"], tmp_path / "out")
    assert write_plots([], tmp_path / "out") == []  # nothing given (e.g. no complete run)


def test_find_runs_names_runs_by_their_relative_path(runs_root):
    runs = find_runs(runs_root)
    assert [r.name for r in runs] == [f"{a}-{d}" for a in ATTACKS for d in DEFENSES]
    assert {r.summary["attack"] for r in runs} == set(ATTACKS)  # the older ones from config.yaml
    assert runs[0].attackers() == {ATTACKER}
    assert find_runs(runs_root / "dba-fedavg")[0].name == "dba-fedavg"
    # as fisherguard report's hook calls it: run directories themselves, and overlapping paths
    both = find_runs([runs_root / "dba-fedavg", runs_root / "dba-multi-krum", runs_root])
    assert [r.name for r in both][:2] == ["dba-fedavg", "dba-multi-krum"] and len(both) == 4


def test_auc_plot_per_round_per_method_only_for_scored_runs(tmp_path):
    # issue 21: FDCR and Krum records carry detection AUC/AP (one round undefined), FedAvg none
    root = tmp_path / "runs"
    aucs = {"fdcr": [1.0, 0.571, None], "krum": [0.5, 0.75, 1.0], "fedavg": None}
    for d, auc in aucs.items():
        run = root / d
        run.mkdir(parents=True)
        run.joinpath("config.yaml").write_text(
            "experiment: {name: t, seed: 0}\ndata: {dataset: synthetic}\n"
            f"federation: {{clients: 4, rounds: 3}}\ndefense: {{name: {d}}}\n")
        recs = [{"round": t + 1, "metrics": {"A": 50.0, "ASR": 10.0},
                 "detection": {"TPR": 0.0, "FPR": 0.0, "removed": 0,
                               "AUC": None if auc is None else auc[t],
                               "AP": None if auc is None or auc[t] is None else auc[t] / 2}}
                for t in range(3)]
        run.joinpath("rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        run.joinpath("summary.json").write_text(json.dumps(
            {"label": d.upper(), "defense": d, "rounds": 3, "A": 50.0, "ASR": 10.0, "seed": 0,
             "complete": True}))
    paths = write_plots(root, tmp_path / "out")
    auc = sorted(p.name for p in paths if p.name.startswith("auc-"))
    assert auc == ["auc-no-attack-on-synthetic.png", "auc-no-attack-on-synthetic.svg"]
    svg = (tmp_path / "out" / auc[1]).read_text()
    for text in (">AUC<", ">AP<", ">fdcr<", ">krum<", ">round<", "suspicion score"):
        assert text in svg, text
    assert ">fedavg<" not in svg
    assert (tmp_path / "out" / auc[0]).read_bytes().startswith(PNG_MAGIC)


def test_variants_of_one_defense_get_their_run_labels(tmp_path):
    from fisherguard.report.plots import _line_names

    for name, label, seed in (("a", "FDCR robust-z", 0), ("b", "FDCR cumulative", 0),
                              ("c", "FDCR robust-z", 1), ("d", "FedAvg", 0)):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("summary.json").write_text(json.dumps(
            {"label": label, "defense": "fedavg" if label == "FedAvg" else "fdcr", "seed": seed}))
    runs = find_runs(tmp_path)
    assert _line_names(runs) == ["FDCR robust-z", "FDCR cumulative", "fdcr", "fedavg"]
