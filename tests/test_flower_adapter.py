"""The Flower adapter without processes: record layout, client plans, the strategy on hand-built
replies (hostile ones included), run-config parsing and the shipped Flower App."""

from __future__ import annotations

import json
import os
import sys

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.app import (Array, ArrayRecord, Error, Message, Metadata, MetricRecord,  # noqa: E402
                      RecordDict)

from fisherguard import config  # noqa: E402
from fisherguard.clients.fdreg import FDReg  # noqa: E402
from fisherguard.clients.l1pull import L1Pull  # noqa: E402
from fisherguard.defenses.base import ClientPlan  # noqa: E402
from fisherguard.engine.runner import run  # noqa: E402
from fisherguard.engine.flower import launch  # noqa: E402
from fisherguard.engine.flower.records import (BadRecord, Layout, attack_state_bytes,  # noqa: E402
                                               plan_from, plan_records, read_attack_state,
                                               read_flat, to_record)
from fisherguard.engine.flower.server_app import Settings  # noqa: E402
from fisherguard.engine.flower.strategy import ERROR_FILE, DefenseStrategy, TooFewReplies  # noqa: E402
from fisherguard.models import build_model  # noqa: E402

pytestmark = pytest.mark.flower

REPO = Path(__file__).resolve().parents[1]
LAYOUT = Layout.of(build_model("simplecnn", 3))

RAW = {"experiment": {"name": "adapter", "seed": 0},
       "data": {"dataset": "synthetic", "synthetic_train": 800, "synthetic_test": 100},
       "federation": {"clients": 5, "rounds": 2, "local_epochs": 1, "batch_size": 32},
       "attack": {"fraction": 0.2}, "server": {"val_size": 32}, "defense": "fdcr",
       "runtime": {"threads": 1}}


def cfg(**sets):
    return config.resolve(config.apply_overrides(RAW, sets))


# ---------------------------------------------------------------------- records


def test_weights_round_trip_exactly_through_an_arrayrecord():
    w = torch.randn(LAYOUT.size)
    rec = to_record(w, LAYOUT)
    assert list(rec.keys()) == list(LAYOUT.names)  # parameter names in docs/protocol.md §6 order
    assert torch.equal(read_flat(rec, LAYOUT), w)


@pytest.mark.parametrize("mutate,reason", [
    (lambda r: r.pop("cls.bias"), "bad_shape"),
    (lambda r: r.__setitem__("cls.bias", Array(np.zeros(11, np.float32))), "bad_shape"),
    (lambda r: r.__setitem__("cls.bias", Array(np.zeros(10, np.int64))), "bad_shape"),
    (lambda r: r.__setitem__("extra", Array(np.zeros(3, np.float32))), "bad_shape"),
])
def test_malformed_records_are_named_not_crashed(mutate, reason):
    rec = to_record(torch.zeros(LAYOUT.size), LAYOUT)
    mutate(rec)
    with pytest.raises(BadRecord) as e:
        read_flat(rec, LAYOUT)
    assert e.value.reason == reason
    with pytest.raises(BadRecord) as e:
        read_flat(None, LAYOUT)
    assert e.value.reason == "missing"


def test_client_plans_travel_as_the_same_regulariser_classes():
    p = LAYOUT.size
    h, a, s = torch.rand(p), torch.randn(p), torch.randn(p)
    for plan in (ClientPlan(regulariser=FDReg(h, a, 5.0)),
                 ClientPlan(regulariser=L1Pull(0.07, a), start_weights=s), None):
        content = RecordDict(plan_records(plan, LAYOUT))
        back = plan_from(content, LAYOUT)
        if plan is None:
            assert back is None
            continue
        assert type(back.regulariser) is type(plan.regulariser)
        assert back.regulariser.lam == plan.regulariser.lam
        assert torch.equal(back.regulariser.anchor, plan.regulariser.anchor)
        if isinstance(plan.regulariser, FDReg):
            assert torch.equal(back.regulariser.importance, h)
        if plan.start_weights is not None:
            assert torch.equal(back.start_weights, s)


class _Payload:
    def __reduce__(self):  # what a pickle that runs code looks like
        return (os.system, ("true",))


def test_attack_state_travels_as_tensors_and_refuses_code():
    state = {"stages": [{"delta": torch.rand(3, 32, 32)},
                        {"generator": {"w": torch.randn(4, 3), "b": torch.zeros(4)}}, {}]}
    back = read_attack_state(attack_state_bytes(state))
    assert torch.equal(back["stages"][0]["delta"], state["stages"][0]["delta"])
    assert torch.equal(back["stages"][1]["generator"]["w"], state["stages"][1]["generator"]["w"])
    assert back["stages"][2] == {}
    import io
    import pickle
    buf = io.BytesIO()
    torch.save({"x": _Payload()}, buf)
    with pytest.raises(pickle.UnpicklingError):
        read_attack_state(buf.getvalue())
    with pytest.raises(ValueError, match="must be bytes"):
        read_attack_state("delta")
    with pytest.raises(ValueError, match="must hold a dict"):
        read_attack_state(attack_state_bytes([1, 2]))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the strategy


def _reply(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"q{node}", group_id="1", created_at=0.0, ttl=3600.0,
                    message_type="train")
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=meta)
    return Message(content=content, metadata=meta)


def _good(strategy: DefenseStrategy, cid: int, w: torch.Tensor, f: torch.Tensor) -> RecordDict:
    return RecordDict({"arrays": to_record(w, strategy.layout), "fisher": to_record(f, strategy.layout),
                       "metrics": MetricRecord({"num-examples": 100, "partition-id": cid,
                                                "train-loss": 1.0})})


def begin(s: DefenseStrategy, server_round: int) -> DefenseStrategy:
    """The server's step of a round as ``begin_round`` runs it, every node online and no client
    answering a Fisher query (Flower builds messages only inside a run)."""
    s._sent = dict(s.nodes)
    s._start = s.server.begin(server_round - 1, lambda wanted, tag: {c: None for c in wanted})
    return s


@pytest.fixture()
def strategy(tmp_path):
    s = DefenseStrategy(cfg(), tmp_path / "run", progress=None, min_replies=2)
    s.nodes = {c: 100 + c for c in s.ids}
    return s


def test_hostile_replies_are_flagged_clients_never_a_crash(strategy):
    g = torch.Generator().manual_seed(0)
    w0 = strategy.weights
    good = [w0 + 0.01 * torch.randn(w0.numel(), generator=g) for _ in range(2)]
    fis = [torch.rand(w0.numel(), generator=g) + 0.1 for _ in range(2)]
    no_fisher = _good(strategy, 2, good[0], fis[0])
    del no_fisher["fisher"]
    nan = _good(strategy, 3, good[1], fis[1])
    nan["arrays"] = to_record(torch.full_like(w0, float("nan")), strategy.layout)
    replies = [_reply(100, _good(strategy, 0, good[0], fis[0])),
               _reply(101, _good(strategy, 1, good[1], fis[1])),
               _reply(102, no_fisher), _reply(103, nan),
               _reply(104, RecordDict({"arrays": ArrayRecord([np.zeros(3, np.float32)]),
                                       "metrics": MetricRecord({"num-examples": 5,
                                                                "partition-id": 4})})),
               _reply(999, _good(strategy, 0, good[0], fis[0]))]  # a node never asked
    arrays, metrics = begin(strategy, 1).aggregate_train(1, replies)
    rec = strategy.run_dir.rounds()[-1]
    assert rec["clients"]["reasons"][2:] == ["missing", "non_finite", "bad_shape"]
    assert rec["clients"]["flagged"][2:] == [True, True, True]
    assert rec["clients"]["weights"][2:] == [0.0, 0.0, 0.0]
    assert rec["engine"] == "inprocess" and rec["replies"]["received"] == 5
    assert torch.isfinite(read_flat(arrays, strategy.layout)).all()
    assert metrics["replies"] == 5


def test_error_replies_and_silence_count_as_missing(strategy):
    w0 = strategy.weights
    f = torch.rand(w0.numel()) + 0.1
    replies = [_reply(100 + c, _good(strategy, c, w0 + 0.01 * c, f)) for c in (0, 1)]
    replies.append(_reply(102, error="ClientApp raised"))
    begin(strategy, 1).aggregate_train(1, replies)  # 103 and 104 never answer
    rec = strategy.run_dir.rounds()[-1]
    assert rec["clients"]["reasons"][2:] == ["missing"] * 3
    assert rec["replies"]["errors"] == {"2": "ClientApp raised"}


def test_a_dead_node_is_a_failed_client_with_its_error_saved_not_a_false_positive(tmp_path):
    """Issue 19.2: the SuperLink answers for a killed SuperNode (source: the SuperLink, not the
    node); its error is saved under the client the message went to, and the missing client is
    no detection: FPR stays 0, the summary says nodes failed."""
    s = DefenseStrategy(cfg(defense="fedavg"), tmp_path / "run", progress=None, min_replies=2)
    s.nodes = {c: 100 + c for c in s.ids}
    begin(s, 1)
    s._messages = {c: Message(content=RecordDict(), metadata=Metadata(
        run_id=1, message_id=f"q{n}", src_node_id=0, dst_node_id=n, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=3600.0, message_type="train"))
        for c, n in s._sent.items()}
    w0 = s.weights
    f = torch.rand(w0.numel()) + 0.1
    replies = [_reply(100 + c, _good(s, c, w0 + 0.01 * c, f)) for c in (0, 1, 2, 4)]
    dead = Message(error=Error(code=5, reason="Error: Node Unavailable"), metadata=Metadata(
        run_id=1, message_id="e", src_node_id=1, dst_node_id=1, reply_to_message_id="q103",
        group_id="1", created_at=0.0, ttl=3600.0, message_type="train"))
    s.aggregate_train(1, replies + [dead])
    rec = s.run_dir.rounds()[-1]
    assert rec["replies"]["errors"] == {"3": "Error: Node Unavailable"}
    assert rec["clients"]["reasons"][3] == "missing" and rec["clients"]["flagged"][3]
    assert s.fed.attackers == [4]
    assert rec["detection"]["FPR"] == 0.0 and rec["detection"]["removed"] == 0
    assert rec["detection"]["failed"] == 1 and rec["detection"]["failures"] == {"missing": 1}
    summary = s.finish()
    assert summary["FPR"] == 0.0 and summary["nodes_failed"] is True
    assert summary["failed_client_rounds"] == 1


def test_too_few_replies_stop_with_a_clear_message_and_keep_finished_rounds(strategy):
    w0 = strategy.weights
    f = torch.rand(w0.numel()) + 0.1
    begin(strategy, 1).aggregate_train(1, [_reply(100 + c, _good(strategy, c, w0 + 0.01 * c, f))
                                 for c in range(5)])
    with pytest.raises(TooFewReplies, match=r"round 2: 1 of 5 clients replied, fewer than the "
                                            r"minimum of 2"):
        begin(strategy, 2).aggregate_train(2, [_reply(100, _good(strategy, 0, w0, f))])
    assert [r["round"] for r in strategy.run_dir.rounds()] == [1]
    assert "minimum of 2" in (strategy.run_dir.path / ERROR_FILE).read_text()
    assert strategy.run_dir.load_checkpoint()["rounds_done"] == 1


def test_the_strategy_aggregates_like_the_in_process_defense(strategy):
    """Same uploads → same ``Aggregate`` as calling the defense directly (one object, two engines)."""
    from fisherguard.defenses.base import RoundInput

    g = torch.Generator().manual_seed(1)
    w0 = strategy.weights.clone()
    ws = [w0 + 0.02 * torch.randn(w0.numel(), generator=g) for _ in range(5)]
    fs = [torch.rand(w0.numel(), generator=g) for _ in range(5)]
    arrays, _ = begin(strategy, 1).aggregate_train(1, [_reply(100 + c, _good(strategy, c, ws[c], fs[c]))
                                             for c in range(5)])
    ref = strategy.cfg.build_defense().aggregate(RoundInput(
        global_weights=w0, updates=torch.stack([w - w0 for w in ws]),
        num_samples=torch.full((5,), 100.0, dtype=torch.float64), client_ids=list(range(5)),
        lr=strategy.cfg.federation.lr, round_idx=0, fisher=torch.stack(fs), num_rounds=2))
    assert torch.equal(read_flat(arrays, strategy.layout), ref.new_weights)
    assert strategy.run_dir.rounds()[-1]["clients"]["flagged"] == ref.flagged.tolist()


# ---------------------------------------------------------------------- run config and the app


def test_run_config_mirrors_the_yaml_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg()))
    s = Settings.from_run_config({"config": str(path), "set": "federation.rounds=3 defense=sdfc",
                                  "out": str(tmp_path / "o"), "min-replies": 2}, "flower-sim")
    assert s.cfg.federation.rounds == 3 and s.cfg.defense.name == "sdfc"
    assert s.cfg.runtime.engine == "flower-sim" and s.min_replies == 2
    runs = Settings.all_from_run_config({"runs-json": json.dumps([
        {"config-yaml": config.dump(cfg()), "out": str(tmp_path / "a")},
        {"config-yaml": config.dump(cfg(defense="fedavg")), "out": str(tmp_path / "b")}])},
        "flower-deployment")
    assert [r.cfg.defense.name for r in runs] == ["fdcr", "fedavg"]


@pytest.mark.parametrize("rc,match", [
    ({}, "set `config`"),
    ({"config": "/nonexistent/c.yaml"}, "does not exist"),
    ({"config-yaml": "defense: nope"}, "defense"),
    ({"config-yaml": "defense: fedavg", "min-replies": 0}, "min-replies"),
    ({"config-yaml": "defense: fedavg", "round-timeout": -1.0}, "round-timeout"),
    ({"config-yaml": "defense: fedavg", "set": "federation.nope=1"}, "federation.nope"),
])
def test_bad_run_configs_are_named(rc, match):
    with pytest.raises(config.ConfigError, match=match):
        Settings.from_run_config(rc, "flower-sim")


def test_the_shipped_flower_app_is_the_generated_one_and_valid():
    from flwr.common.config import validate_config
    import tomllib

    shipped = (REPO / "flower-app" / "pyproject.toml").read_text()
    assert shipped == launch.app_pyproject()
    doc = tomllib.loads(shipped)
    ok, errors, _ = validate_config(doc, check_module=True)
    assert ok, errors
    assert not any("torch" in d for d in doc["project"]["dependencies"])


def test_flower_deployment_is_not_started_by_fisherguard_run(tmp_path):
    c = cfg(**{"runtime.engine": "flower-deployment"})
    with pytest.raises(config.ConfigError, match="flwr run"):
        run(c, tmp_path / "x", progress=None)


def test_cli_checks_the_flower_flags(tmp_path, capsys):
    from fisherguard.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg()))
    assert main(["run", str(path), "--engine", "flower-sim", "--min-replies", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--min-replies must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _all_defenses():
    from fisherguard.defenses import registry

    return sorted(registry.available())


@pytest.mark.parametrize("name", _all_defenses())
def test_every_defense_runs_behind_the_strategy(tmp_path, name):
    """Any registered defense aggregates Flower replies, a hostile one included, into a round record."""
    s = DefenseStrategy(cfg(defense=name), tmp_path / "run", progress=None, min_replies=2)
    s.nodes = {c: 100 + c for c in s.ids}
    g = torch.Generator().manual_seed(2)
    w0 = s.weights.clone()
    replies = [_reply(100 + c, _good(s, c, w0 + 0.02 * torch.randn(w0.numel(), generator=g),
                                     torch.rand(w0.numel(), generator=g) + 0.01))
               for c in range(4)]
    bad = _good(s, 4, w0, torch.rand(w0.numel(), generator=g))
    bad["arrays"] = to_record(torch.full_like(w0, float("inf")), s.layout)
    replies.append(_reply(104, bad))
    arrays, _ = begin(s, 1).aggregate_train(1, replies)
    rec = s.run_dir.rounds()[-1]
    assert torch.isfinite(read_flat(arrays, s.layout)).all()
    assert rec["clients"]["flagged"][4] and rec["clients"]["weights"][4] == 0.0
    assert rec["clients"]["reasons"][4] == "non_finite"
    weights = rec["clients"]["weights"]
    assert all(w >= 0 for w in weights)
    assert abs(sum(weights) - 1) < 1e-6 or sum(weights) == 0  # 0: the defense rejected everyone


def test_both_engines_write_one_round_record_schema(tmp_path, strategy):
    """The in-process engine and the Flower strategy write the same keys, each naming its engine."""
    import json

    run(cfg(**{"federation.rounds": 1}), tmp_path / "inprocess", progress=None)
    inproc = json.loads((tmp_path / "inprocess" / "rounds.jsonl").read_text().splitlines()[0])
    w0 = strategy.weights
    f = torch.rand(w0.numel(), generator=torch.Generator().manual_seed(0)) + 0.1
    begin(strategy, 1).aggregate_train(1, [_reply(100 + c, _good(strategy, c, w0 + 0.01 * c, f))
                                           for c in strategy.ids])
    flower = strategy.run_dir.rounds()[-1]
    assert set(flower) == set(inproc)
    assert set(flower["timing"]) == set(inproc["timing"]) and set(flower["replies"]) == set(inproc["replies"])
    assert inproc["engine"] == "inprocess" and inproc["replies"] == {"received": 5, "errors": {}}
    assert flower["engine"] == strategy.cfg.runtime.engine


def test_the_node_worker_needs_flwrs_clientapp_steps(monkeypatch):
    """The long-lived node worker reuses flwr internals; without them the launcher must know."""
    from fisherguard.engine.flower import clientapp_worker

    assert clientapp_worker.available()
    monkeypatch.setitem(sys.modules, "flwr.supernode.runtime.run_clientapp", None)
    assert not clientapp_worker.available()
