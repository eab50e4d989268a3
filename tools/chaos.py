"""``make chaos``: SIGKILL a tiny run at random moments, resume it, and compare (issue 19).

One uninterrupted reference run first (a seconds-long synthetic config, in a subprocess); then,
per trial, the same run started afresh in its own directory and SIGKILLed at a seeded random
moment: either a random time after start ("time") or inside a chosen results write ("write":
the test hook in ``fisherguard.results`` pauses every write halfway, and the kill is sent once the
chosen write of e.g. ``checkpoint.pt`` has begun). Some trials kill the resumed run once more.
After every kill each results file must parse (config.yaml, every JSON file, every line of
rounds.jsonl whole, summary.csv, checkpoint.pt); then ``--resume`` runs to the end and the
run must be bit-identical to the reference: the checkpoint (weights, defense and attack state)
tensor for tensor, partition.json, defense.json and config.yaml byte for byte, and rounds.jsonl
and the summaries equal once wall-clock timings (keys ``timing``, ``*_s``) are dropped.

Prints one line per kill (where it landed) and the kills tried / survived; exits 1 unless every
trial survived.

    python tools/chaos.py [--kills N] [--seed S] [--defense NAME] [--rounds R] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from fisherguard.results import WRITE_LOG, WRITE_PAUSE  # noqa: E402

# A run of a few seconds: generated data, 3 clients, one local epoch per round.
CONFIG = """\
experiment:
  name: chaos
  seed: 0
data:
  dataset: synthetic
  synthetic_train: 360
  synthetic_test: 60
partition:
  beta: 0.5
federation:
  clients: 3
  rounds: {rounds}
  local_epochs: 1
  batch_size: 32
  lr: 0.02
attack:
  fraction: 0.34
server:
  val_size: 24
defense: {defense}
runtime:
  threads: 1
"""

PAUSE_S = 0.4  # how long each write pauses halfway in "write" trials
RUN_TIMEOUT_S = 600


def _env(log: Path | None, pause: float = 0.0) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env.pop(WRITE_LOG, None)
    env.pop(WRITE_PAUSE, None)
    if log is not None:
        env[WRITE_LOG] = str(log)
        env[WRITE_PAUSE] = str(pause)
    return env


def _start(cfg: Path, out: Path, env: dict[str, str], errlog: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fisherguard", "run", str(cfg), "--out", str(out),
                             "--resume", "-q"], cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(errlog, "ab"))  # noqa: SIM115


def _finish(cfg: Path, out: Path, errlog: Path) -> None:
    p = _start(cfg, out, _env(None), errlog)
    try:
        rc = p.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise RuntimeError(f"run in {out.name} did not finish in {RUN_TIMEOUT_S} s") from None
    if rc != 0:
        tail = errlog.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"run in {out.name} exited {rc}:\n{tail}")


# ---------------------------------------------------------------------------------------------
# Checks


def check_files(run: Path) -> list[str]:
    """Every results file of the run directory parses; a list of problems (empty = all whole)."""
    problems = []
    for p in sorted(run.iterdir()):
        name = p.name
        if name.endswith(".tmp") or not p.is_file():
            continue  # an atomic write's temp file: never read, replaced by the next write
        try:
            if name == "config.yaml":
                if not isinstance(yaml.safe_load(p.read_text()), dict):
                    problems.append(f"{name}: not a mapping")
            elif name.endswith(".json"):
                json.loads(p.read_text())
            elif name.endswith(".jsonl"):
                text = p.read_text()
                if text and not text.endswith("\n"):
                    problems.append(f"{name}: last line cut short")
                for i, line in enumerate(text.splitlines()):
                    json.loads(line)
            elif name.endswith(".csv"):
                text = p.read_text()
                rows = list(csv.reader(io.StringIO(text)))
                if not text.endswith("\n") or len(rows) < 2 or any(len(r) != len(rows[0]) for r in rows):
                    problems.append(f"{name}: cut short ({len(text)} bytes)")
            elif name.endswith(".pt"):
                ck = torch.load(p, weights_only=False)
                if "weights" not in ck or "rounds_done" not in ck:
                    problems.append(f"{name}: keys {sorted(ck)}")
        except Exception as e:  # noqa: BLE001 - any parse failure is a damaged file
            problems.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    return problems


def _strip(x: Any) -> Any:
    """Drop wall-clock timings (keys ``timing`` and ``*_s``): they differ between any two runs."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "timing" and not k.endswith("_s")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _csv_rows(p: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")}
            for r in csv.DictReader(io.StringIO(p.read_text()))]


def compare(ref: Path, run: Path) -> list[str]:
    """Differences between a resumed run and the reference (empty = identical)."""
    diffs = []
    a = torch.load(ref / "checkpoint.pt", weights_only=False)
    b = torch.load(run / "checkpoint.pt", weights_only=False)
    for key in sorted(set(a) | set(b)):
        if not _same(a.get(key), b.get(key)):
            diffs.append(f"checkpoint.pt[{key!r}] differs")
    for name in ("config.yaml", "partition.json", "defense.json"):
        if (ref / name).read_bytes() != (run / name).read_bytes():
            diffs.append(f"{name} differs")
    ra = [_strip(json.loads(x)) for x in (ref / "rounds.jsonl").read_text().splitlines()]
    rb = [_strip(json.loads(x)) for x in (run / "rounds.jsonl").read_text().splitlines()]
    if ra != rb:
        first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
        diffs.append(f"rounds.jsonl differs (from round {first + 1}; {len(ra)} vs {len(rb)} rounds)")
    if _strip(json.loads((ref / "summary.json").read_text())) != _strip(
            json.loads((run / "summary.json").read_text())):
        diffs.append("summary.json differs")
    if _csv_rows(ref / "summary.csv") != _csv_rows(run / "summary.csv"):
        diffs.append("summary.csv differs")
    return diffs


# ---------------------------------------------------------------------------------------------
# Kills


@dataclass
class Kill:
    trial: int
    kind: str  # "time" or "write"
    target: str  # "after 3.2 s" or "checkpoint.pt write #2"
    landed: str = ""
    file_problems: list[str] = field(default_factory=list)


def _events(log: Path) -> list[tuple[float, str, str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((float(parts[0]), parts[1], parts[2]))
    return out


def _landing(log: Path, run: Path, rounds: int) -> str:
    """Where the kill landed, from the write log and the checkpoint left behind."""
    open_writes: dict[str, int] = collections.Counter()
    last = None
    for _, ev, name in _events(log):
        open_writes[name] += 1 if ev == "begin" else -1
        last = (ev, name)
    inside = [n for n, c in open_writes.items() if c > 0]
    done = 0
    try:
        done = int(torch.load(run / "checkpoint.pt", weights_only=False)["rounds_done"])
    except Exception:  # noqa: BLE001 - none yet, or (a failure reported elsewhere) damaged
        pass
    where = ("summary" if done >= rounds else f"round {done + 1}"
             if (run / "checkpoint.pt").exists() else "start-up or round 1")
    if inside:
        return f"inside {', '.join(inside)} write ({where})"
    if last is None:
        return "before any write (start-up)"
    return f"after {last[1]} write ({where})"


def kill_once(cfg: Path, run: Path, rng: random.Random, kind: str, span: float,
              writes: dict[str, int], work: Path, k: Kill, rounds: int,
              targets: list[str] | None = None) -> None:
    log = work / f"{run.name}-{k.kind}-{rng.random():.6f}.log"
    errlog = work / f"{run.name}.stderr"
    if kind == "time":
        delay = rng.uniform(0.0, span)
        k.target = f"after {delay:.2f} s"
        p = _start(cfg, run, _env(log, 0.0), errlog)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            pass
    else:
        names = sorted(n for n in writes if not targets or n in targets)
        weights = [4.0 if n == "checkpoint.pt" else 2.0 if n == "rounds.jsonl" else 1.0 for n in names]
        name = rng.choices(names, weights)[0]
        nth = rng.randint(1, writes[name])
        k.target = f"{name} write #{nth}"
        p = _start(cfg, run, _env(log, PAUSE_S), errlog)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while p.poll() is None and time.monotonic() < deadline:
            begun = sum(1 for _, ev, n in _events(log) if ev == "begin" and n == name)
            if begun >= nth:
                break
            time.sleep(0.01)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        k.landed = _landing(log, run, rounds)
    else:
        k.landed = f"missed (exited {p.returncode} first)"
    k.file_problems = check_files(run) if run.exists() else []


# ---------------------------------------------------------------------------------------------
# The Flower deployment: SIGKILL its server side (the SuperLink and the ServerApp below it)


FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flower_trials(n: int, seed: int, rounds: int, defense: str, work: Path) -> tuple[int, int]:
    """``n`` deployments (SuperLink + one SuperNode per client on 127.0.0.1) whose SuperLink
    tree is SIGKILLed at a random moment, then deployed again with resume; each must end equal,
    bit for bit, to an uninterrupted deployment. Returns (kills that landed, trials survived)."""
    from fisherguard import config
    from fisherguard.engine.flower import launch

    os.environ.update(FLOWER_ENV)
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = config.resolve(yaml.safe_load(CONFIG.format(rounds=rounds, defense=defense)))
    ref = work / "flower-reference"
    t0 = time.monotonic()
    with launch.options(run_timeout=RUN_TIMEOUT_S):
        launch.deploy(cfg, ref, progress=None)
    span = time.monotonic() - t0
    print(f"flower: {defense}, {rounds} rounds, reference deployment {span:.1f} s", flush=True)
    landed = survived = 0
    for i in range(n):
        rng = random.Random(f"flower-{seed}-{i}")
        out = work / f"flower-trial-{i:03d}"
        delay = rng.uniform(0.2 * span, 0.9 * span)
        seen: dict[str, str] = {}

        def killer(procs: launch.Processes, where: Path) -> None:
            time.sleep(delay)
            ck = where / "checkpoint.pt"
            if procs.procs["superlink"].poll() is None:
                seen["rounds"] = str(len((where / "rounds.jsonl").read_text().splitlines())
                                     if (where / "rounds.jsonl").exists() else 0)
                seen["checkpoint"] = "yes" if ck.exists() else "no"
                procs.kill("superlink")
                seen["killed"] = "yes"

        try:
            with launch.options(run_timeout=RUN_TIMEOUT_S):
                launch.deploy(cfg, out, progress=None, during=killer)
        except Exception as e:  # noqa: BLE001 - the killed deployment is expected to fail
            seen["error"] = type(e).__name__
        problems = check_files(out) if out.exists() else []
        try:
            with launch.options(run_timeout=RUN_TIMEOUT_S):
                launch.deploy(cfg, out, resume=True, progress=None)
            diffs = compare(ref, out)
        except Exception as e:  # noqa: BLE001
            diffs = [f"resume failed: {type(e).__name__}: {str(e)[:300]}"]
        killed = seen.get("killed") == "yes"
        landed += killed
        ok = killed and not problems and not diffs
        survived += ok
        where = (f"after {seen.get('rounds')} round record(s)" if killed
                 else "missed (the run had ended)")
        print(f"flower trial {i:3d} SIGKILL superlink after {delay:.1f} s, {where}; files "
              f"{'ok' if not problems else 'DAMAGED: ' + '; '.join(problems)}; resumed: "
              f"{'identical' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}", flush=True)
    return landed, survived


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=12, help="trials (each kills at least once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defense", default="foolsgold", help="a stateful one by default")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--write-share", type=float, default=0.5,
                    help="share of trials that kill inside a results write")
    ap.add_argument("--second-kill", type=float, default=0.3,
                    help="chance that the resumed run is killed once more")
    ap.add_argument("--targets", help="write kills only inside these files' writes, e.g. "
                    "checkpoint.pt,rounds.jsonl (default: any results file)")
    ap.add_argument("--flower", type=int, default=0, metavar="N",
                    help="also N Flower deployment trials (the SuperLink SIGKILLed, then resumed)")
    ap.add_argument("--keep", help="keep the run directories here (default: a temporary one)")
    args = ap.parse_args(argv)
    targets = args.targets.split(",") if args.targets else None

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fg-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "chaos.yaml"
    cfg.write_text(CONFIG.format(rounds=args.rounds, defense=args.defense))
    try:
        t0 = time.monotonic()
        if not args.kills:  # Flower trials only
            f_landed, f_survived = flower_trials(args.flower, args.seed, args.rounds,
                                                 args.defense, work)
            print(f"flower: kills landed {f_landed} of {args.flower}; trials survived "
                  f"{f_survived}/{args.flower}")
            print(f"{f_survived} passed, {args.flower - f_survived} failed")
            return 0 if f_survived == args.flower else 1
        ref = work / "reference"
        ref_log = work / "reference.log"
        p = _start(cfg, ref, _env(ref_log, 0.0), work / "reference.stderr")
        if p.wait(timeout=RUN_TIMEOUT_S) != 0:
            print((work / "reference.stderr").read_text()[-2000:], file=sys.stderr)
            return 2
        span = time.monotonic() - t0
        writes = collections.Counter(n for _, ev, n in _events(ref_log) if ev == "begin")
        print(f"chaos: {args.defense}, {args.rounds} rounds, reference run {span:.1f} s, "
              f"{sum(writes.values())} results writes ({', '.join(f'{n} {c}' for n, c in sorted(writes.items()))}); "
              f"{args.kills} trials, seed {args.seed}", flush=True)
        kills: list[Kill] = []
        survived = 0
        for i in range(args.kills):
            rng = random.Random(f"{args.seed}-{i}")
            run = work / f"trial-{i:03d}"
            trial: list[Kill] = []
            n_kills = 2 if rng.random() < args.second_kill else 1
            for j in range(n_kills):
                kind = "write" if rng.random() < args.write_share else "time"
                k = Kill(i, kind, "")
                kill_once(cfg, run, rng, kind, span, writes, work, k, args.rounds, targets)
                trial.append(k)
            try:
                _finish(cfg, run, work / f"{run.name}.stderr")
                diffs = compare(ref, run)
            except Exception as e:  # noqa: BLE001 - a resume that fails is a trial that failed
                diffs = [f"resume failed: {e}"]
            ok = not diffs and not any(k.file_problems for k in trial)
            survived += ok
            for k in trial:
                print(f"trial {i:3d} {k.kind:5s} {k.target:24s} landed {k.landed:45s} "
                      f"files {'ok' if not k.file_problems else 'DAMAGED: ' + '; '.join(k.file_problems)}",
                      flush=True)
            print(f"trial {i:3d} resumed: {'identical' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}",
                  flush=True)
            kills.extend(trial)
            if ok and not args.keep:
                shutil.rmtree(run, ignore_errors=True)
        f_landed = f_survived = 0
        if args.flower:
            f_landed, f_survived = flower_trials(args.flower, args.seed, args.rounds,
                                                 args.defense, work)
            print(f"flower: kills landed {f_landed} of {args.flower}; trials survived "
                  f"{f_survived}/{args.flower}")
        inside = collections.Counter(k.landed.split(" (")[0] for k in kills)
        print("landed: " + "; ".join(f"{n} × {w}" for w, n in sorted(inside.items())))
        missed = sum(k.landed.startswith("missed") for k in kills)
        print(f"kills tried {len(kills)} in {args.kills} trials ({len(kills) - missed} landed, "
              f"{missed} missed: the run had ended); trials survived {survived}/{args.kills} "
              f"({time.monotonic() - t0:.0f} s)")
        passed = survived + f_survived
        print(f"{passed} passed, {args.kills + args.flower - passed} failed")
        return 0 if passed == args.kills + args.flower else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
