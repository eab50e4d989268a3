"""A Flower simulation run stopped by SIGHUP (the terminal closed) or SIGTERM ends every process it
started and removes its temporary folder (issue 19, item 6).

The run is ``fisherguard run --engine flower-sim`` in a subprocess inside a loopback-only network
namespace (docs/flower.md §8.0); the signal goes out once the SuperLink has started its
``flower-superexec``, before Ray starts. Every process below the run is recorded just before the
signal (and every process carrying the test's environment tag is checked after): none may survive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fisherguard.engine.flower import FLOWER_ENV, launch

pytestmark = pytest.mark.flower

MARK = "FISHERGUARD_TEST_TAG"
CONFIG = ("experiment: {name: sig, seed: 0}\n"
          "data: {dataset: synthetic, synthetic_train: 200, synthetic_test: 50}\n"
          "federation: {clients: 2, rounds: 1, local_epochs: 1}\n"
          "server: {val_size: 16}\nruntime: {threads: 1}\n")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_a_signal_stops_every_process_of_a_flower_sim_run(tmp_path, sig):
    tag = uuid.uuid4().hex
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    env = {**os.environ, **FLOWER_ENV, MARK: tag, "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    ns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    cmd = ns + ["sh", "-c", 'ip link set lo up && exec "$0" -m fisherguard run "$1" --engine '
                'flower-sim --out "$2" -q', sys.executable, str(cfg), str(tmp_path / "out")]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:
            started = launch.descendants(p.pid)
            if any("flower-superexec" in _cmdline(c) for c in started):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no flower-superexec below the run within 90 s:\n{p.communicate()[0][-2000:]}")
        assert list(tmp.glob("fisherguard-flower-sim-*")), "the run's temporary folder"
        started = launch.descendants(p.pid) | launch.tagged(tag, MARK)
        os.kill(p.pid, sig)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the run did not end within 30 s of the signal")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(launch._alive(c) for c in started):
            time.sleep(0.1)
        left = {c for c in started if launch._alive(c)} | launch.tagged(tag, MARK)
        assert not left, f"still running after {sig.name}: " + "; ".join(
            f"{c} {_cmdline(c)[:80]}" for c in sorted(left))
        assert not list(tmp.glob("fisherguard-flower-sim-*")), "the temporary folder was left"
        assert p.returncode == 128 + sig, out[-2000:]
        assert f"stopped by {sig.name}" in out
    finally:
        rest = {p.pid} | launch.descendants(p.pid) | launch.tagged(tag, MARK) | started
        launch.terminate({c for c in rest if launch._alive(c)}, grace=2.0)
        if p.poll() is None:
            p.wait(timeout=10)
