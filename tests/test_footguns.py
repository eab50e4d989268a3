"""Issue 19's footguns outside Flower: the data error names what `run` accepts, a run that never
finished a round restarts without --resume, the resume refusal names the differing key, plain-text
help for every subcommand, and the README's table of bad inputs stays true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fisherguard import config
from fisherguard.cli import main
from fisherguard.results import ResumeError, RunDir

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
QUICK = ("experiment: {name: q, seed: 0}\ndata: {dataset: synthetic, synthetic_train: 200, "
         "synthetic_test: 50}\nfederation: {clients: 2, rounds: 1, local_epochs: 1}\n"
         "server: {val_size: 16}\n")


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip()


def test_missing_data_names_the_run_option_and_a_failed_start_can_be_rerun(tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("FISHERGUARD_DATA", str(tmp_path / "empty"))
    c = tmp_path / "c.yaml"
    c.write_text(QUICK)
    argv = ["run", str(c), "--set", "data.dataset=mnist", "--out", str(tmp_path / "o"), "-q"]
    first = _err(capsys, argv)
    assert first.startswith("fisherguard: error: MNIST not found.")
    assert "--set data.data_dir=PATH" in first  # `run` has no --data-dir
    # the failed start wrote config.yaml and an empty rounds.jsonl; that is no run to protect
    assert _err(capsys, argv) == first


def test_a_run_with_a_finished_round_still_needs_resume(tmp_path):
    d = RunDir(tmp_path / "r")
    d.start("a: 1\n", resume=False)
    assert d.start("a: 1\n", resume=False) == 0  # nothing finished yet: starts over
    d.append_round({"round": 1})
    with pytest.raises(ResumeError, match="already holds a run; pass --resume"):
        d.start("a: 1\n", resume=False)


def test_the_resume_refusal_names_the_differing_keys(tmp_path):
    d = RunDir(tmp_path / "r")
    old = config.resolve(config.apply_overrides({"data": {"dataset": "synthetic"}}, {}))
    new = old.replace({"attack.fraction": 0.2, "federation.rounds": 7, "runtime.workers": 2})
    d.start(old.to_yaml(), resume=False)
    with pytest.raises(ResumeError) as e:
        d.start(new.to_yaml(), resume=True)
    msg = str(e.value)
    assert "federation.rounds: 50 in the run, 7 now" in msg
    assert "attack.fraction: 0.3 in the run, 0.2 now" in msg
    assert "runtime" not in msg.split("Resume needs")[0]  # runtime may change


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return capsys.readouterr().out


def test_help_is_plain_text_and_lists_every_subcommand(capsys):
    top = _help(capsys, [])
    names = re.search(r"\{([a-z,-]+)\}", top).group(1).split(",")
    assert {"run", "table", "export", "report", "reproduce", "matrix", "defenses", "attacks",
            "data", "flower-check"} <= set(names)
    texts = {"fisherguard": top}
    for name in names:
        texts[name] = _help(capsys, [name])
    for name in ("fetch", "verify", "list"):
        texts[f"data {name}"] = _help(capsys, ["data", name])
    for name, text in texts.items():
        assert "`" not in text and ":func:" not in text, (name, text)
    described = " ".join(top.split("positional arguments")[0].split())
    for name in names:  # the description names every subcommand, the README too
        assert re.search(rf"\b{re.escape(name)}\b", described.split("Commands:")[-1]), name
        assert f"fisherguard {name}" in README, name


# ---------------------------------------------------------------------- README's bad-input table


def _documented(msg: str) -> None:
    """``msg`` appears verbatim in the README's table of bad inputs."""
    table = README.split("### Bad inputs")[1].split("\n## ")[0]
    assert msg in table, f"README's bad-input table lacks:\n{msg}"


@pytest.mark.parametrize("sets,msg", [
    (["defense=nope"], "fisherguard: error: defense: unknown defense 'nope'; available: bulyan, "
     "crfl, dnc, fdcr, fdcr-oracle, fedavg, finetuning, fltrust, foolsgold, krum, median, mma, "
     "multi-krum, rfa, rlr, rsa, sageflow, sdfc, trimmed-mean"),
    (["federation.rounds=abc"], "fisherguard: error: federation.rounds: expected integer, got 'abc'"),
    (["attack.fraction=-0.1"], "fisherguard: error: attack.fraction: must be in [0, 1), got -0.1"),
])
def test_bad_config_messages_are_as_documented(tmp_path, capsys, sets, msg):
    c = tmp_path / "c.yaml"
    c.write_text(QUICK)
    argv = ["run", str(c), "--out", str(tmp_path / "o"), "-q"]
    for s in sets:
        argv += ["--set", s]
    assert _err(capsys, argv) == msg
    _documented(msg)


@pytest.mark.parametrize("bad", [[float("nan"), 0.0], [0.1, 0.2, 0.3]], ids=["nan", "shape"])
def test_bad_upload_reasons_are_as_documented(bad):
    import torch

    from fisherguard.defenses.base import RoundInput
    from fisherguard.defenses.fedavg import FedAvg

    ri = RoundInput.from_uploads(torch.zeros(2), [torch.tensor([0.1, 0.2]), torch.tensor(bad),
                                                  torch.tensor([0.3, 0.1])], [1, 1, 1], [0, 1, 2])
    out = FedAvg().aggregate(ri)
    assert out.client_weights[1] == 0
    _documented(f"flagged={out.flagged.tolist()} reasons={out.reasons}")
