"""fisherguard on real Flower runtimes: simulation equivalence with the in-process engine, a
loopback deployment (SuperLink + 3 SuperNodes), and a SuperNode killed mid-round.

The deployment tests share one deployment (the ``shared_deployment`` fixture,
tests/flower_deployment.py; tests/test_flower_tls.py checks its TLS and node authentication):
starting a SuperLink and its SuperNodes is the expensive part, so it runs once. Every process a
test or that deployment starts carries a unique environment tag; none may be left, and everything
is bounded by timeouts after which it is killed by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisherguard import metrics
from fisherguard.engine.flower import launch
from flower_deployment import COMPARED_ROUNDS, KILLED

pytestmark = pytest.mark.flower

HERE = Path(__file__).resolve().parent
MARK = "FISHERGUARD_TEST_TAG"


def _rounds(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines() if x.strip()]


def test_one_round_on_flower_simulation_equals_the_in_process_round(tmp_path, tag):
    """FedAvg, FDCR and SDFC after one round, A3FL and IBA (trigger shipped to the attacker's
    node) after two: same global weights (Ray in a loopback-only netns). In the same Flower run,
    K = 200 with 10 clients sampled a round, SDFC and FDCR (cumulative) over two rounds: the same
    sampled ids, per-client weights and flags, `sampling` blocks, final weights and per-client
    defense state (clients that skipped a round included) as in-process (issue 18)."""
    ns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    cmd = ns + ["sh", "-c", 'ip link set lo up && exec "$0" "$1" "$2"', sys.executable,
                str(HERE / "flower_sim_equivalence.py"), str(tmp_path)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        launch.terminate({p.pid} | launch.descendants(p.pid) | launch.tagged(tag, MARK))
        p.communicate()
        pytest.fail("the simulation equivalence run did not finish within 420 s")
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, out[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["engines"] == ["flower-sim"] * 7
    for d in ("fedavg", "fdcr", "sdfc", "a3fl", "iba"):
        r = res[d]
        assert r["moved"] > 1e-4, (d, r)  # a round really trained
        assert r["max_abs"] <= 1e-5, (d, r)
        assert r["flags"][0] == r["flags"][1], (d, r)
        assert r["replies"] == 3, (d, r)
    for d in ("sampled-sdfc", "sampled-fdcr"):
        r = res[d]
        ids_in, ids_fl = r["ids"]
        assert ids_in == ids_fl and [len(i) for i in ids_in] == [10, 10], (d, r["ids"])
        # some clients take part in both rounds, some only in one: state carried and kept
        assert set(ids_in[0]) & set(ids_in[1]) and set(ids_in[0]) - set(ids_in[1]), ids_in
        # attackers among the sampled clients
        assert any(set(i) & set(r["attackers"]) for i in ids_in), (ids_in, r["attackers"])
        assert r["weight_gap"] <= 1e-5, (d, r)
        assert r["flags"][0] == r["flags"][1], (d, r)
        sa, sb = r["sampling"]
        assert sa == sb and all(x is not None and x["clients"] == 200 and x["sampled"] == 10
                                for x in sa), (d, sa, sb)
        assert r["replies"] == [10, 10], (d, r)
        assert r["moved"] > 1e-4, (d, r)
        assert r["max_abs"] <= 1e-5, (d, r)
        assert r["state_gap"] <= 1e-5, (d, r)  # same clients held, same values
        assert r["state_clients"] == len(set(ids_in[0]) | set(ids_in[1])), (d, r)


def test_deployment_superlink_and_three_supernodes_run_fdcr(shared_deployment):
    """FDCR over HTTPS on 127.0.0.1 (the shared deployment, tests/flower_deployment.py): rounds 1-2,
    every node replying, as in-process to float tolerance."""
    d = shared_deployment
    s, ref, out = d.result(), d.ref, d.out
    assert s["complete"] and s["engine"] == "flower-deployment"
    for f in ("config.yaml", "rounds.jsonl", "checkpoint.pt", "summary.json", "summary.csv",
              "partition.json"):
        assert (out / f).exists(), f
    rounds, ref_rounds = _rounds(out)[:COMPARED_ROUNDS], _rounds(d.tmp / "inprocess")
    assert [r["round"] for r in rounds] == [1, 2] == [r["round"] for r in ref_rounds]
    assert all(r["replies"]["received"] == 3 for r in rounds)
    assert [r["clients"]["flagged"] for r in rounds] == \
        [r["clients"]["flagged"] for r in ref_rounds]
    # the deployment's state after round 2, copied before round 3 went on (checkpoint.pt)
    assert d.seen.get("checkpoint-rounds") == COMPARED_ROUNDS, d.seen.get("during-error")
    a = d.seen["weights"]
    b = torch.load(d.tmp / "inprocess" / "checkpoint.pt", weights_only=False)["weights"]
    assert float((a - b).abs().max()) <= 1e-5
    assert metrics.summarize(rounds)["A"] == pytest.approx(ref["A"], abs=1e-6)
    # `fisherguard table` reads it like any run
    from fisherguard.cli import main
    assert main(["table", str(out)]) == 0


def test_a_supernode_killed_mid_round_leaves_the_run_going(shared_deployment):
    """Round 3 of the shared deployment loses client 2 (SIGKILL to its SuperNode tree): it is
    recorded missing, the run finishes with the others, and rounds 1-2 as written before the kill
    are kept unchanged."""
    d = shared_deployment
    s, seen = d.result(), d.seen
    assert seen.get("killed") == "yes", seen.get("during-error")
    rounds = _rounds(d.out)
    assert s["complete"] and [r["round"] for r in rounds] == [1, 2, 3]
    # killed in round 3: exactly rounds 1-2 were written then, and they are kept as written
    assert len(seen["written"]) == 2
    assert (d.out / "rounds.jsonl").read_text().splitlines()[:2] == seen["written"]
    assert rounds[1]["replies"]["received"] == 3
    assert rounds[2]["replies"]["received"] == 2
    assert rounds[2]["clients"]["reasons"][KILLED] == "missing"
    assert rounds[2]["clients"]["flagged"][KILLED] is True
