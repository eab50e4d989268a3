"""A Flower deployment that cannot run says so (issue 19, item 5), without processes: the ServerApp
fails a bad run config with an ordinary exception (which Flower logs into the `flwr run --stream`
output and turns into a `finished:failed` run) instead of a silent SystemExit, too few SuperNodes
stop the run after a bounded wait with a message naming both numbers, and `fisherguard
flower-check` validates the run config before `flwr run`, in the exit status."""

from __future__ import annotations

import os
import time

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import yaml  # noqa: E402

from fisherguard import config  # noqa: E402
from fisherguard.cli import main as cli_main  # noqa: E402
from fisherguard.engine.flower import server_app  # noqa: E402
from fisherguard.engine.flower.strategy import ERROR_FILE, DefenseStrategy, TooFewReplies  # noqa: E402

pytestmark = pytest.mark.flower

QUICK = ("experiment: {name: q, seed: 0}\ndata: {dataset: synthetic, synthetic_train: 300, "
         "synthetic_test: 50}\nfederation: {clients: 3, rounds: 1, local_epochs: 1}\n"
         "server: {val_size: 16}\n")


class _Context:
    def __init__(self, run_config: dict) -> None:
        self.run_config = run_config


class _Grid:
    """Two SuperNodes connected; nobody answers a message."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(101, 101 + nodes))

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        return []


def test_a_bad_run_config_fails_the_server_app_loudly(tmp_path, capsys):
    rc = {"config-yaml": QUICK, "set": "defense=nope", "out": str(tmp_path / "o")}
    # an Exception (Flower records and streams it), not SystemExit (which Flower let through silently)
    with pytest.raises(server_app.RunFailed, match="unknown defense 'nope'"):
        server_app.main(_Grid(3), _Context(rc))
    assert "fisherguard: error: defense: unknown defense 'nope'" in capsys.readouterr().err
    assert "unknown defense 'nope'" in (tmp_path / "o" / ERROR_FILE).read_text()


def test_too_few_supernodes_stop_the_run_fast_naming_needed_and_connected(tmp_path, capsys):
    cfg = config.resolve(config.apply_overrides(yaml.safe_load(QUICK), {}))
    s = DefenseStrategy(cfg, tmp_path / "run", progress=None)
    t0 = time.monotonic()
    with pytest.raises(TooFewReplies) as e:
        s.connect(_Grid(2), timeout=600.0, wait_s=1.0)
    assert time.monotonic() - t0 < 10  # not the 600 s round timeout
    msg = str(e.value)
    assert "federation.clients=3 needs 3 SuperNodes" in msg and "2 connected" in msg
    assert msg in capsys.readouterr().err
    assert msg in (tmp_path / "run" / ERROR_FILE).read_text()


def test_flower_check_validates_the_run_config_before_flwr_run(tmp_path, capsys):
    c = tmp_path / "c.yaml"
    c.write_text(QUICK)
    assert cli_main(["flower-check", f'config="{c}" set="defense=nope"']) == 2
    assert "unknown defense 'nope'" in capsys.readouterr().err
    assert cli_main(["flower-check", f'config="{c}" set="federation.rounds=x"']) == 2
    assert "federation.rounds: expected integer, got 'x'" in capsys.readouterr().err
    assert cli_main(["flower-check", f'config="{c}" rounds=3']) == 2
    assert "unknown key 'rounds'" in capsys.readouterr().err
    out = tmp_path / "o"
    assert cli_main(["flower-check", f'config="{c}" out="{out}"']) == 0
    assert "federation.clients=3 needs 3 SuperNodes" in capsys.readouterr().out
    assert not out.exists()  # checking writes nothing


def test_a_sampled_round_targets_the_sampled_clients_only(tmp_path):
    """Client sampling (issue 18) on Flower: a round's targets (the nodes its TRAIN messages go
    to) are the seeded sample, the same clients the in-process engine trains."""
    from fisherguard.sampling import sample_clients

    raw = yaml.safe_load(QUICK)
    raw["federation"].update({"clients": 8, "clients_per_round": 3})
    cfg = config.resolve(raw)
    s = DefenseStrategy(cfg, tmp_path / "run", progress=None)
    grid = _Grid(8)
    s.nodes = {c: 101 + c for c in range(8)}
    for rnd in (1, 2):
        start = s.begin_round(rnd, grid)  # configure_train sends to ``_sent``
        want = sample_clients(0, rnd - 1, 8, 3)
        assert sorted(s._sent) == want and start.ids == want


def test_spare_simulated_nodes_serve_no_client_and_deployment_nodes_must_fit(tmp_path):
    """One simulation holding runs of K = 3 and K = 200 has 200 nodes (``simulate_many``): on
    flower-sim a node past the run's K is a spare (its hello names it, it never trains), while a
    deployment node whose node config does not fit K is refused, as before."""
    from types import SimpleNamespace

    from fisherguard.engine.flower.client_app import client_id

    def node(cid: int, parts: int) -> SimpleNamespace:
        return SimpleNamespace(node_config={"partition-id": cid, "num-partitions": parts})

    assert client_id(node(2, 3), 3) == 2
    assert client_id(node(2, 200), 3, spare_ok=True) == 2
    assert client_id(node(150, 200), 3, spare_ok=True) == 150
    for cid, parts in ((2, 200), (150, 200), (3, 3)):
        with pytest.raises(ValueError, match="does not fit"):
            client_id(node(cid, parts), 3)
    with pytest.raises(ValueError, match="does not fit"):
        client_id(node(200, 200), 3, spare_ok=True)
    cfg = config.resolve(yaml.safe_load(QUICK))
    for engine, spare in (("flower-sim", True), ("flower-deployment", False)):
        s = DefenseStrategy(cfg.replace({"runtime.engine": engine}), tmp_path / engine,
                            progress=None)
        assert s._config(0)["spare-nodes"] is spare


def test_a_simulation_asks_its_nodes_once_across_experiments(tmp_path, monkeypatch):
    """Experiments in one Flower simulation (``runs-json``) share its nodes: the second one
    reuses the partition-ids the first one's ``hello`` learnt (200 nodes answering take seconds);
    a deployment, or a simulation whose nodes changed, asks again."""
    cfg = config.resolve(yaml.safe_load(QUICK))
    asked = []

    def hello(self, grid, node_ids, timeout):  # the nodes answer: node 101 + i serves client i
        asked.append(len(node_ids))
        return {n - 101: n for n in node_ids}

    monkeypatch.setattr(DefenseStrategy, "_hello", hello)
    grid = _Grid(5)
    known = {101 + i: i for i in range(5)}  # what an earlier experiment's hello learnt
    sim = DefenseStrategy(cfg.replace({"runtime.engine": "flower-sim"}), tmp_path / "sim",
                          progress=None)
    sim.connect(grid, timeout=1.0, wait_s=1.0, known=known)
    assert asked == [] and sim.nodes == {0: 101, 1: 102, 2: 103}
    dep = DefenseStrategy(cfg.replace({"runtime.engine": "flower-deployment"}), tmp_path / "dep",
                          progress=None)
    dep.connect(grid, timeout=1.0, wait_s=1.0, known=dict(known))
    assert asked == [5] and dep.nodes == sim.nodes
    changed = {101: 0, 102: 1, 999: 2}
    DefenseStrategy(cfg.replace({"runtime.engine": "flower-sim"}), tmp_path / "sim2",
                    progress=None).connect(grid, timeout=1.0, wait_s=1.0, known=changed)
    assert asked == [5, 5] and changed == known  # asked again, and learnt the nodes there now
