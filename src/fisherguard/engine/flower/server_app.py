"""fisherguard's ServerApp: resolve the run config, learn the nodes, run ``DefenseStrategy``.

Run-config keys (``[tool.flwr.app.config]``, overridden with ``flwr run --run-config``) mirror
the YAML config and ``fisherguard run``: ``config`` (a YAML path) or ``config-yaml`` (its text),
``variant`` (a label, for configs with variants), ``set`` (``section.key=value`` overrides,
space-separated), ``out`` (results directory), ``label``, ``resume``, ``min-replies``,
``round-timeout`` (seconds a round waits for replies), ``node-wait`` (seconds the run waits for
one SuperNode per client before it starts; fewer stop it with a message naming both numbers) and
``threads`` (torch threads per client).
``runs-json`` (a JSON list of such settings) runs several experiments one after another in one
Flower run, sharing its start-up (the launcher uses it for sweeps and the equivalence test).
"""

from __future__ import annotations

import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from fisherguard.engine.flower import require_flwr

require_flwr()
from flwr.app import Context, Message  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fisherguard import config as config_mod  # noqa: E402
from fisherguard.engine.flower.strategy import ERROR_FILE, DefenseStrategy, TooFewReplies  # noqa: E402
from fisherguard.results import ResumeError, RunDir  # noqa: E402
from fisherguard.seeding import derive_seed  # noqa: E402

app = ServerApp()

# the defaults shipped in the app's pyproject.toml; `flwr run` accepts only keys listed there
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "", "config-yaml": "", "variant": "", "set": "", "out": "", "label": "",
    "resume": False, "min-replies": 1, "round-timeout": 600.0, "node-wait": 60.0, "threads": 1,
    "runs-json": "",
}


class RunFailed(RuntimeError):
    """The ServerApp stops a run: a bad run config, missing data, too few SuperNodes.

    An ordinary exception on purpose: Flower's ``flwr-serverapp`` catches ``Exception`` (not
    ``SystemExit``), flushes the app's output into the log stream ``flwr run --stream`` shows,
    and marks the run ``finished:failed`` (``flwr ls``). A ``SystemExit`` skipped all of that:
    the message was lost and the run ended silently.
    """


@dataclass
class Settings:
    """A Flower run's settings, read from the run config with errors that name the key."""

    cfg: config_mod.Config
    out: Path
    label: str
    resume: bool
    min_replies: int
    round_timeout: float
    threads: int
    node_wait: float = 60.0

    @classmethod
    def all_from_run_config(cls, rc: dict[str, Any], engine: str) -> list["Settings"]:
        """One ``Settings`` per experiment: the run config's own, or each item of ``runs-json``."""
        rc = {**RUN_CONFIG_DEFAULTS, **dict(rc)}
        if not str(rc["runs-json"]).strip():
            return [cls.from_run_config(rc, engine)]
        try:
            items = json.loads(str(rc["runs-json"]))
        except json.JSONDecodeError as e:
            raise config_mod.ConfigError(f"run config `runs-json`: not valid JSON: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items) or not items:
            raise config_mod.ConfigError("run config `runs-json`: expected a list of run-config tables")
        unknown = sorted({k for i in items for k in i} - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise config_mod.ConfigError(f"run config `runs-json`: unknown key {unknown[0]!r}")
        return [cls.from_run_config({**rc, **i, "runs-json": ""}, engine) for i in items]

    @classmethod
    def from_run_config(cls, rc: dict[str, Any], engine: str) -> "Settings":
        rc = {**RUN_CONFIG_DEFAULTS, **dict(rc)}
        overrides = [config_mod.parse_override(o) for o in shlex.split(str(rc["set"]))]
        stem = None
        if str(rc["config-yaml"]).strip():
            text, where = str(rc["config-yaml"]), "config-yaml"
        elif str(rc["config"]).strip():
            path = Path(str(rc["config"])).expanduser()
            if not path.is_file():
                raise config_mod.ConfigError(f"run config `config`: {path.resolve()} does not exist "
                                             "(give an absolute path; the ServerApp's working "
                                             "directory is the SuperLink's)")
            text, where, stem = path.read_text(), str(path), path.stem
        else:
            raise config_mod.ConfigError("run config: set `config` (a YAML path) or `config-yaml`")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise config_mod.ConfigError(f"{where}: not valid YAML: {e}") from None
        variants = config_mod.variants_of(raw, overrides)
        wanted = str(rc["variant"]).strip()
        if wanted:
            chosen = [v for v in variants if v.label == wanted]
            if not chosen:
                raise config_mod.ConfigError(f"run config `variant`: no variant {wanted!r}; labels: "
                                             f"{', '.join(v.label for v in variants)}")
            variant = chosen[0]
        elif len(variants) == 1:
            variant = variants[0]
        else:
            raise config_mod.ConfigError("the config has variants; choose one with `variant`: "
                                         f"{', '.join(v.label for v in variants)}")
        # the results say which engine produced them
        cfg = variant.config.replace({"runtime.engine": engine})
        out = Path(str(rc["out"])) if str(rc["out"]).strip() else (
            Path("runs") / f"{stem or cfg.experiment.name}-{engine}")
        ints = {}
        for key in ("min-replies", "threads"):
            v = rc[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise config_mod.ConfigError(f"run config `{key}`: expected an integer >= 1, got {v!r}")
            ints[key] = v
        secs = {}
        for key in ("round-timeout", "node-wait"):
            v = rc[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise config_mod.ConfigError(f"run config `{key}`: expected seconds > 0, got {v!r}")
            secs[key] = float(v)
        return cls(cfg=cfg, out=out.resolve(), label=str(rc["label"]) or variant.label,
                   resume=bool(rc["resume"]), min_replies=ints["min-replies"],
                   round_timeout=secs["round-timeout"], threads=ints["threads"],
                   node_wait=secs["node-wait"])


def engine_of(grid: Grid) -> str:
    """``flower-sim`` under Flower's simulation runtime (an in-memory grid), else deployment."""
    return "flower-sim" if type(grid).__name__ == "InMemoryGrid" else "flower-deployment"


REPLY_POLL_S = 0.2  # seconds between reply polls of a deployment's grid (flwr 1.42's: 3)


def poll_replies_often(grid: Grid, every: float = REPLY_POLL_S) -> Grid:
    """Let ``grid.send_and_receive`` look for replies every ``every`` seconds.

    flwr 1.42's deployment grid (``superlink.grid.http_grid.HttpGrid.send_and_receive``) pushes
    the messages, then pulls replies and sleeps 3 s between pulls, so every exchange (a round, a
    hello, a plan's Fishers) waited up to 3 s after the last reply came. This is the same loop
    on the grid's own ``push_messages`` / ``pull_messages``, same timeout semantics, a shorter
    sleep (one small local request per poll). The replies are the same; only when they are
    noticed changes."""

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        ids = set(grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        out: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids:
                break
            time.sleep(every)
        return out

    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    return grid


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the config(s), then run each one's remaining rounds through ``DefenseStrategy``."""
    if engine_of(grid) == "flower-deployment":
        poll_replies_often(grid)
    try:
        runs = Settings.all_from_run_config(context.run_config, engine_of(grid))
    except ValueError as e:  # ConfigError and DefenseConfigError: a clear line
        out = str(context.run_config.get("out", "")).strip()
        raise fail(e, Path(out) if out else None) from None
    known: dict[int, int] = {}  # node id → partition-id, learnt once per simulation
    for s in runs:
        run_one(grid, s, known)


def fail(e: BaseException | str, out: Path | None) -> RunFailed:
    """Say why the run stops where the user sees it (the ``flwr run --stream`` output, and
    ``out/flower-error.txt`` for the launcher) and return the exception to raise."""
    text = str(e)
    print(f"fisherguard: error: {text}", file=sys.stderr, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(f"{text}\n")
    return RunFailed(text)


def run_one(grid: Grid, s: Settings, known: dict[int, int] | None = None) -> None:
    """One experiment on the grid's nodes, written to ``s.out`` as the in-process engine would;
    ``known``: the nodes' partition-ids from an earlier experiment (``DefenseStrategy.connect``)."""
    # FedAvg's node sampling uses Python's global `random` (docs/flower.md §8.3)
    random.seed(derive_seed(s.cfg.experiment.seed, "flower-sampling"))
    try:
        strategy = DefenseStrategy(s.cfg, s.out, label=s.label, resume=s.resume,
                                   min_replies=s.min_replies, threads=s.threads)
    except (ValueError, OSError, ResumeError) as e:  # missing data, a run already there, …
        raise fail(e, s.out) from None
    print(f"fisherguard: {s.label} on {s.cfg.runtime.engine}, results in {s.out}",
          file=sys.stderr)
    try:
        if strategy.remaining:
            strategy.connect(grid, s.round_timeout, wait_s=s.node_wait, known=known)
            strategy.start(grid, initial_arrays=strategy.global_arrays(),
                           num_rounds=strategy.remaining, timeout=s.round_timeout)
    except TooFewReplies as e:
        raise RunFailed(str(e)) from None  # already printed and written by the strategy
    finally:
        if strategy.run_dir.rounds():  # a summary of no rounds would hide the reason
            strategy.finish()
    print(f"fisherguard: finished {s.label}; results in {s.out}", file=sys.stderr)


def check_run_config(text: str) -> list[str]:
    """``fisherguard flower-check``: validate a deployment's run config (the string given to
    ``flwr run --run-config``, or a .toml file) here, before ``flwr run``, and return what the
    run needs. ``flwr run`` exits 0 whatever the ServerApp does (flwr 1.42), so this is where a
    bad config can reach the exit status; the ServerApp repeats every check."""
    from flwr.common.config import parse_config_args

    from fisherguard.data.locate import find_files

    try:
        rc = parse_config_args([text])
    except Exception as e:  # noqa: BLE001 - click's and tomli's errors alike
        raise config_mod.ConfigError(f"run config: {getattr(e, 'message', e)}") from None
    unknown = sorted(set(rc) - set(RUN_CONFIG_DEFAULTS))
    if unknown:
        raise config_mod.ConfigError(f"run config: unknown key {unknown[0]!r}; keys: "
                                     f"{', '.join(RUN_CONFIG_DEFAULTS)}")
    lines = []
    for s in Settings.all_from_run_config(rc, "flower-deployment"):
        RunDir(s.out).check_start(s.cfg.to_yaml(), resume=s.resume)
        if s.cfg.data.dataset != "synthetic":
            find_files(s.cfg.data.dataset, s.cfg.data.data_dir)
        k = s.cfg.federation.clients
        lines.append(f"ok: {s.label}: federation.clients={k} needs {k} SuperNodes "
                     f"(--node-config 'partition-id=0..{k - 1} num-partitions={k}'), "
                     f"{s.cfg.federation.rounds} rounds, results in {s.out}")
    return lines
