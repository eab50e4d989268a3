"""One Flower deployment shared by the deployment tests (tests/test_flower_runtime.py and
tests/test_flower_tls.py): each SuperLink + SuperNodes start-up costs about a minute on 2 cores,
so the default recipe (TLS, SuperNode authentication) runs once and every behaviour is checked
on it.

3 SuperNodes run 3 rounds of FDCR on 127.0.0.1. While rounds 1-2 go, two intruders try to join
(a SuperNode with a key the SuperLink never saw, one with no key) and TLS is probed; then, once
round 2 is written (its checkpoint saved), the round-2 state is copied and SuperNode 2 is killed
(SIGKILL to its tree) in round 3. The in-process engine runs the same config for 2 rounds: rounds
1-2 of the deployment must equal it; round 3 must record client 2 missing and finish with the
others. Every process started carries a unique tag; none may be left after the run.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import traceback
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MARK = "FISHERGUARD_TEST_TAG"

DEPLOY = {"experiment": {"name": "deploy", "seed": 1},
          "data": {"dataset": "synthetic", "synthetic_train": 900, "synthetic_test": 100},
          "federation": {"clients": 3, "rounds": 3, "local_epochs": 1, "batch_size": 32},
          "attack": {"fraction": 0.34}, "server": {"val_size": 32}, "defense": "fdcr",
          "runtime": {"threads": 1}}
COMPARED_ROUNDS = 2  # rounds 1-2 have every node; the in-process reference runs these
KILLED = 2  # the client whose SuperNode dies in round 3


@dataclass
class Deployment:
    tmp: Path  # the in-process reference in tmp/inprocess, the deployment in tmp/flower, logs
    summary: dict[str, Any] | None  # launch.deploy's summary (None: it raised `error`)
    ref: dict[str, Any]  # the in-process run's summary (2 rounds)
    seen: dict[str, Any]  # what the side thread saw (TLS probes, intruders, the kill)
    error: BaseException | None = None

    @property
    def out(self) -> Path:
        return self.tmp / "flower"

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    def result(self) -> dict[str, Any]:
        """The deployment's summary; the run's own error, if it failed, fails the test."""
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def _get(url: str, ctx: ssl.SSLContext | None) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
            return f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"failed: {getattr(e, 'reason', e)}"


def _intruders(procs, tmp: Path, seen: dict) -> None:
    """TLS probes and two unregistered SuperNodes; then the SuperLink's node list."""
    from fisherguard.engine.flower import launch
    from fisherguard.engine.flower.keys import make_keys, make_node_key

    port, keys = procs.info["port"], procs.info["keys"]
    seen["keys"] = keys
    url = f"127.0.0.1:{port}/health"
    seen["https+ca"] = _get(f"https://{url}", ssl.create_default_context(cafile=str(keys.ca_cert)))
    seen["http"] = _get(f"http://{url}", None)
    other = make_keys(tmp / "other-ca", 0)  # a CA the SuperLink's certificate is not from
    seen["https+other-ca"] = _get(f"https://{url}",
                                  ssl.create_default_context(cafile=str(other.ca_cert)))
    k = len(procs.info["nodes"])
    rogue_key = make_node_key(tmp / "rogue")  # never registered
    rogue = launch.start_supernode(procs, port, 1, k, ca_cert=keys.ca_cert, key=rogue_key,
                                   name="supernode-rogue")
    keyless = launch.start_supernode(procs, port, 0, k, ca_cert=keys.ca_cert,
                                     name="supernode-keyless")
    for name, p in (("rogue", rogue), ("keyless", keyless)):
        try:
            seen[f"{name}-rc"] = p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            seen[f"{name}-rc"] = "still running after 90 s"
        seen[f"{name}-log"] = (procs.logdir / f"supernode-{name}.log").read_text(errors="replace")
    seen["nodes"] = launch.list_supernodes(procs, procs.info["connection"])
    seen["registered"] = dict(procs.info["nodes"])


def _kill_in_round_three(procs, out: Path, seen: dict) -> None:
    """Once round 2 is written and checkpointed: keep both, then SIGKILL SuperNode 2."""
    import torch

    deadline = time.monotonic() + 240
    rounds, ckpt = out / "rounds.jsonl", out / "checkpoint.pt"
    while time.monotonic() < deadline:
        if rounds.exists() and rounds.read_text().count("\n") >= COMPARED_ROUNDS and ckpt.exists():
            state = torch.load(ckpt, weights_only=False)  # written atomically (tmp + rename)
            if state["rounds_done"] >= COMPARED_ROUNDS:
                seen["checkpoint-rounds"] = state["rounds_done"]
                seen["weights"] = state["weights"]
                seen["written"] = rounds.read_text().splitlines()
                time.sleep(1.0)  # round 3's requests are out
                procs.kill(f"supernode-{KILLED}")
                seen["killed"] = "yes"
                return
        time.sleep(0.2)


def run_shared_deployment(tmp: Path) -> Deployment:
    from fisherguard import config
    from fisherguard.engine.flower import FLOWER_ENV, launch
    from fisherguard.engine.runner import run

    cfg = config.resolve(DEPLOY)
    ref = run(cfg.replace({"federation.rounds": COMPARED_ROUNDS}), tmp / "inprocess",
              progress=None)
    seen: dict[str, Any] = {}

    def during(procs, out: Path) -> None:
        try:
            _intruders(procs, tmp, seen)
            _kill_in_round_three(procs, out, seen)
        except BaseException:  # noqa: BLE001 - reported by the tests that need it
            seen["during-error"] = traceback.format_exc()

    value = uuid.uuid4().hex
    summary, error = None, None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MARK, value)
        for k, v in FLOWER_ENV.items():
            mp.setenv(k, v)
        try:
            # round 3 ends when the killed node misses its heartbeats (~60 s), not at the timeout
            with launch.options(run_timeout=400.0, round_timeout=120.0, min_replies=2,
                                keep_logs=tmp / "logs"):
                summary = launch.deploy(cfg, tmp / "flower", progress=None, during=during)
        except Exception as e:  # noqa: BLE001 - each test that needs the run fails with it
            error = e
        finally:
            left = launch.tagged(value, MARK)
            if left:
                launch.terminate(left, grace=2.0)
    assert not left, f"processes left running: {sorted(left)}"
    return Deployment(tmp=tmp, summary=summary, ref=ref, seen=seen, error=error)
