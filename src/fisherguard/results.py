"""Run directories: resolved config, one JSON line per round, checkpoint for resume, summary tables.

Reports read run directories only, so they do not care which engine produced them.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Sequence

import torch


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (different config, damaged checkpoint)."""


class RunInUse(ResumeError):
    """Another live process is writing this run directory (``RunDir.lock``)."""


class MixedRunsError(ValueError):
    """Runs that differ in more than the seed would be averaged into one table cell."""


def _results_part(cfg_text: str) -> Any:
    """The config without what never changes results: the ``runtime`` section and the run's name,
    then the identity rules (``add_identity_rule``) applied."""
    import yaml

    return _normalised(yaml.safe_load(cfg_text) or {})


# Rules that put a run's config into the form runs are compared in (``fisherguard.config``
# registers the one that reads a key an older config.yaml lacks with the value those runs used).
_IDENTITY_RULES: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
LEGACY: dict[str, Any] = {}  # dotted key → the value of every run made before the key existed

# Random-stream details: like the seed, they change a run's draws but not its setting, so runs
# are matched and named without them (a resume still compares them, ``RunDir.start``).
RNG_DETAILS = ("experiment.streams",)


def add_identity_rule(rule: Callable[[dict[str, Any]], dict[str, Any]],
                      legacy: Mapping[str, Any] | None = None) -> None:
    if rule not in _IDENTITY_RULES:
        _IDENTITY_RULES.append(rule)
    LEGACY.update(legacy or {})


def identity_part(cfg: str | dict[str, Any]) -> Any:
    """What a run is matched, grouped and named by (report cells, ``reproduce`` run keys, seed
    groups): the results part without ``RNG_DETAILS``, and without keys that still hold the value
    runs had before the key existed, so such runs keep their names and matches."""
    import yaml

    part = _normalised(yaml.safe_load(cfg) or {} if isinstance(cfg, str) else cfg)
    if not isinstance(part, dict):
        return part
    for dotted in RNG_DETAILS:
        sec, key = dotted.split(".")
        if isinstance(part.get(sec), dict):
            part[sec].pop(key, None)
    for dotted, value in LEGACY.items():
        sec, key = dotted.split(".")
        if isinstance(part.get(sec), dict) and key in part[sec] and part[sec][key] == value:
            del part[sec][key]
    return part


def _normalised(cfg: Any) -> Any:
    import copy

    if not isinstance(cfg, dict):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.pop("runtime", None)
    if isinstance(cfg.get("experiment"), dict):
        cfg["experiment"].pop("name", None)
    for rule in _IDENTITY_RULES:
        cfg = rule(cfg)
    return cfg


_ABSENT = object()


def _shown_value(v: Any) -> str:
    return "(not set)" if v is _ABSENT else json.dumps(v)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The dotted keys whose values differ between two config trees, with (old, new) values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += config_differences(old.get(k, _ABSENT), new.get(k, _ABSENT),
                                      f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [(prefix or "(config)", old, new)]


# The runtime settings that change float rounding (the ensembles a client trains in, or the
# trainer): part of a run's identity, so a resume must keep them. ``threads`` and ``workers`` never
# change the numbers (tests/test_determinism.py) and stay free, as do ``retain_memory`` and
# ``engine``. Not in ``_results_part``, whose hash names run directories.
NUMERIC_RUNTIME = {"trainer": "auto", "group_size": 10}  # key → value of a config that omits it


def _numeric_runtime(cfg_text: str) -> dict[str, Any]:
    import yaml

    rt = (yaml.safe_load(cfg_text) or {}).get("runtime") or {}
    return {k: rt.get(k, default) for k, default in NUMERIC_RUNTIME.items()}



def slug(label: str) -> str:
    """A run label as a directory name: lower-case alphanumerics joined by single dashes."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in label)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "run"


class RunDir:
    CONFIG, ROUNDS, CHECKPOINT, SUMMARY_CSV, SUMMARY_JSON = (
        "config.yaml", "rounds.jsonl", "checkpoint.pt", "summary.csv", "summary.json")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    LOCK = ".lock"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for one writer; ``RunInUse`` when a live process holds it.

        Two processes resuming the same run would interleave its rounds and checkpoints (one
        campaign started twice, or split over terminals: each then skips the other's runs). An
        advisory ``flock`` on ``.lock``: the kernel drops it when its holder dies, so a killed run
        never leaves a stale lock. Where ``fcntl`` does not exist (Windows) nothing is locked.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on the platforms CI runs
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunInUse(f"{self.path} is being written by another process (pid {holder}); "
                               "wait for it to finish, or choose another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def start(self, cfg_text: str, *, resume: bool) -> int:
        """Prepare the directory for a run of this resolved config (YAML); return the finished rounds.

        0 unless resuming; the config file is the run's identity (the name and the runtime
        settings that never change the numbers aside: see ``NUMERIC_RUNTIME``).
        """
        self.check_start(cfg_text, resume=resume)
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file = self.path / self.CONFIG
        if resume and cfg_file.exists():
            _atomic_write(cfg_file, cfg_text.encode())
            ck = self.load_checkpoint()
            done = 0 if ck is None else int(ck["rounds_done"])
            self._truncate_rounds(done)
            return done
        _atomic_write(cfg_file, cfg_text.encode())
        (self.path / self.ROUNDS).write_text("")
        return 0

    def started(self) -> bool:
        """Whether a run here finished a round (a round record or a checkpoint exists).

        A run that stopped before its first round (bad data, a bad defense option, killed during
        start-up) leaves only ``config.yaml`` and an empty ``rounds.jsonl``: nothing to keep, so
        it may start over without ``--resume``.
        """
        return bool(self.rounds()) or (self.path / self.CHECKPOINT).exists()

    def check_start(self, cfg_text: str, *, resume: bool) -> None:
        """Raise ``ResumeError`` when ``start`` would refuse; writes nothing."""
        cfg_file = self.path / self.CONFIG
        if resume and cfg_file.exists():
            diffs = config_differences(_results_part(cfg_file.read_text()), _results_part(cfg_text))
            if diffs:
                shown = "; ".join(f"{k}: {_shown_value(a)} in the run, {_shown_value(b)} now"
                                  + (f" (--set {k}={LEGACY[k]} continues it as it began)"
                                     if k in LEGACY else "")
                                  for k, a, b in diffs[:5])
                more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
                raise ResumeError(f"{cfg_file} holds a different config: {shown}{more}. Resume "
                                  "needs the same config and overrides (or choose another --out); "
                                  "only experiment.name and runtime.threads, workers, "
                                  "retain_memory and engine may change")
            old_rt, new_rt = _numeric_runtime(cfg_file.read_text()), _numeric_runtime(cfg_text)
            keys = [f"runtime.{k}" for k in NUMERIC_RUNTIME if old_rt[k] != new_rt[k]]
            if keys:
                was = ", ".join(f"{k}={old_rt[k.split('.')[1]]!r}" for k in keys)
                raise ResumeError(f"{cfg_file} was run with {was}: {', '.join(keys)} changes the "
                                  "float rounding of training, so a resume must keep it (--set "
                                  f"{keys[0]}={old_rt[keys[0].split('.')[1]]}); runtime.threads "
                                  "and runtime.workers may change")
            return
        if not resume and self.started():
            raise ResumeError(f"{self.path} already holds a run; pass --resume to continue it or "
                              "choose another --out")

    def _truncate_rounds(self, done: int) -> None:
        # A round logged after the last checkpoint (killed in between) is redone, so drop it.
        kept = [r for r in self.rounds() if r["round"] <= done]
        _atomic_write(self.path / self.ROUNDS, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append_round(self, record: dict[str, Any]) -> None:
        """Add one round's line; the file is rewritten atomically, so a kill at any moment leaves
        the old lines or the old lines plus the new one, never a line cut short (issue 19's chaos
        runs caught a plain append doing that)."""
        p = self.path / self.ROUNDS
        old = p.read_bytes() if p.exists() else b""
        old = old[:old.rfind(b"\n") + 1]  # a line cut short by a kill of an older version: dropped
        _atomic_write(p, old + (json.dumps(_jsonable(record)) + "\n").encode())

    def rounds(self) -> list[dict[str, Any]]:
        """The round records; an exported run keeps them gzip'd (``rounds.jsonl.gz``)."""
        p = self.path / self.ROUNDS
        gz = self.path / (self.ROUNDS + ".gz")
        if p.exists():
            text = p.read_text()
        elif gz.exists():
            text = gzip.decompress(gz.read_bytes()).decode()
        else:
            return []
        out = []
        for line in text.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a kill; the checkpoint decides what is redone
        return out

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """``checkpoint.pt``, atomically. Streamed into the temporary file: a copy in memory would
        add twice the defense's state to the peak (0.74 GB a copy for SDFC at K = 1000); the
        chaos tests' write hook (``WRITE_LOG``) goes through bytes so it can pause halfway."""
        _atomic_write(self.path / self.CHECKPOINT, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / self.CHECKPOINT
        if not p.exists():
            return None
        try:
            return torch.load(p, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise ResumeError(f"{p} is damaged ({e}); delete the run directory to start over") from None

    def write_text(self, name: str, text: str) -> None:
        """A file of the run directory, written atomically (complete or not there at all)."""
        _atomic_write(self.path / name, text.encode())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """A small JSON file of the run (e.g. the defense's hyperparameters), written atomically."""
        _atomic_write(self.path / name, json.dumps(_jsonable(data), indent=2).encode())

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a finished run (``complete``); None when there is none, it is partial,
        or it cannot be read."""
        try:
            summary = json.loads((self.path / self.SUMMARY_JSON).read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) and summary.get("complete", False) else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / self.SUMMARY_JSON, json.dumps(_jsonable(summary), indent=2).encode())
        write_csv(self.path / self.SUMMARY_CSV, [summary])

    # what a finished run keeps as evidence under results/: no checkpoint, no CSV duplicate
    EVIDENCE = ("config.yaml", "summary.json", "partition.json", "defense.json")

    def export(self, dest: str | Path) -> Path:
        """Copy a finished run's evidence to ``dest``: the resolved config, summary, partition and
        defense parameters, and the round records gzip'd with a fixed timestamp (same bytes for
        the same records). ResumeError when the run is not finished."""
        if self.finished_summary() is None:
            raise ResumeError(f"{self.path} is not a finished run (no complete summary.json)")
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.EVIDENCE:
            if (self.path / name).exists():
                _atomic_write(out / name, (self.path / name).read_bytes())
        text = "".join(json.dumps(r) + "\n" for r in self.rounds())
        _atomic_write(out / (self.ROUNDS + ".gz"), gzip.compress(text.encode(), mtime=0))
        return out


def export_runs(src: str | Path, dest: str | Path) -> tuple[list[Path], list[Path]]:
    """Export every finished run below ``src`` to the same relative place below ``dest``; return
    (exported, skipped unfinished)."""
    done, skipped = [], []
    root = Path(src)
    for summary in sorted(root.rglob(RunDir.SUMMARY_JSON)):
        run = RunDir(summary.parent)
        try:
            done.append(run.export(Path(dest) / summary.parent.relative_to(root)))
        except ResumeError:
            skipped.append(summary.parent)
    return done, skipped


# A test hook for the chaos harness (tools/chaos.py), inert unless its variables are set:
# FISHERGUARD_TEST_WRITE_LOG names a file that gets "<time> begin|end <file name>" around every
# results write, and FISHERGUARD_TEST_WRITE_PAUSE (seconds) pauses each write halfway, so that a
# SIGKILL can be made to land inside one.
WRITE_LOG, WRITE_PAUSE = "FISHERGUARD_TEST_WRITE_LOG", "FISHERGUARD_TEST_WRITE_PAUSE"


def _write_event(event: str, path: Path) -> None:
    log = os.environ.get(WRITE_LOG)
    if log:
        with open(log, "a") as f:
            f.write(f"{time.time():.6f} {event} {path.name}\n")


def _write_chunks(f: Any, path: Path, data: bytes) -> None:
    """``f.write(data)`` and flush; with the test hook set, logged and paused halfway."""
    if not os.environ.get(WRITE_LOG):
        f.write(data)
        f.flush()
        return
    _write_event("begin", path)
    half = len(data) // 2
    f.write(data[:half])
    f.flush()
    time.sleep(float(os.environ.get(WRITE_PAUSE) or 0))
    f.write(data[half:])
    f.flush()
    _write_event("end", path)


def _atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` (bytes, or a writer that streams into the open file) to a temporary file,
    fsync it and rename it over ``path``. The chaos hook pauses halfway through bytes, so with it
    set a writer is rendered into memory first."""
    if callable(data) and os.environ.get(WRITE_LOG):
        buf = io.BytesIO()
        data(buf)
        data = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
            f.flush()
        else:
            _write_chunks(f, path, data)
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


COLUMNS = ("label", "defense", "seeds", "A", "R", "ASR", "V", "collapsed", "degraded", "TPR", "FPR",
           "AUC", "AP", "wall_time_s")


_SOFTWARE: dict[str, Any] = {}


def software() -> dict[str, Any]:
    """Which code made a run: fisherguard's and torch's versions and, from a git checkout, the
    commit and whether the package's sources differed from it (None when not known). Results are
    pooled by config (``run_identity``), so this is what tells two code versions' runs apart."""
    import subprocess
    from importlib import metadata

    if not _SOFTWARE:
        try:
            version: str | None = metadata.version("fisherguard")
        except metadata.PackageNotFoundError:  # sources on PYTHONPATH, not installed
            version = None
        here = Path(__file__).resolve().parent
        commit: str | None = None
        dirty: bool | None = None
        try:
            git = ["git", "-C", str(here)]
            got = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=10)
            if got.returncode == 0:
                commit = got.stdout.strip() or None
                st = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--",
                                           "."], capture_output=True, text=True, timeout=10)
                dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
        _SOFTWARE.update(fisherguard=version, torch=torch.__version__, commit=commit,
                         dirty=dirty)
    return dict(_SOFTWARE)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys([c for c in COLUMNS if any(c in r for r in rows)]
                              + [k for r in rows for k in r if not k.startswith("_")]))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: _jsonable(r.get(k)) for k in cols})
    _atomic_write(path, buf.getvalue().encode())  # a kill mid-write left a cut-short CSV


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS, *,
                 markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of run summaries."""
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                         + ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |"
                            for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    head = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    lines = [head, "-" * len(head)]
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


SEED_METRICS = ("A", "R", "ASR", "V", "TPR", "FPR", "AUC", "AP")
# shown only when a summary carries them (summaries from before issue 21 have no AUC or AP)
OPTIONAL_SEED_METRICS = ("AUC", "AP")

# What a summary without a resolved config beside it is known by (older or hand-made summaries).
SUMMARY_IDENTITY = ("label", "defense", "attack", "dataset", "preset", "family", "beta",
                    "attack_fraction")


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict) and x:
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: x}


def run_identity(summary: dict[str, Any]) -> dict[str, Any]:
    """What a run is apart from its seed: its resolved config (``_config``, which
    ``collect_summaries`` and ``run_all`` attach) without the runtime section, the run's name and
    ``experiment.seed``, as dotted keys; a summary without a config is known by its own
    ``SUMMARY_IDENTITY`` fields."""
    cfg = summary.get("_config")
    if cfg is None:
        return {f"summary.{k}": summary.get(k) for k in SUMMARY_IDENTITY}
    flat = _flat(identity_part(cfg))
    flat.pop("experiment.seed", None)
    return flat


def same_but_seed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The two run summaries come from configs that differ in the seed alone (and share a label):
    the one rule for pooling runs into a mean over seeds (``aggregate_seeds``, ``pivot``)."""
    return str(a.get("label")) == str(b.get("label")) and run_identity(a) == run_identity(b)


def distinguishing_keys(summaries: list[dict[str, Any]]) -> list[str]:
    """The dotted config keys whose values are not the same in all these runs (seed aside), in
    the order the first config holds them."""
    ids = [run_identity(s) for s in summaries]
    keys = list(dict.fromkeys(k for i in ids for k in i))
    return [k for k in keys if any(i.get(k, _ABSENT) != ids[0].get(k, _ABSENT) for i in ids)]




def _seed_groups(summaries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The runs in groups that differ in the seed alone, in the order first found."""
    groups: list[list[dict[str, Any]]] = []
    for s in summaries:
        for g in groups:
            if same_but_seed(g[0], s):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "–"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def aggregate_seeds(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of runs that differ in the seed alone (``same_but_seed``): mean ± sample
    std (ddof = 1) over seeds; collapse as †k/n (docs/protocol.md §7.4–§7.5); the mean wall time
    per run. Groups sharing a label are told apart by the config keys that differ between them,
    e.g. ``krum (defense.name=median, federation.rounds=10)``. Rows in the order first found."""
    import numpy as np

    groups = _seed_groups(summaries)
    by_label: dict[str, list[list[dict[str, Any]]]] = {}
    for g in groups:
        by_label.setdefault(str(g[0]["label"]), []).append(g)
    rows = []
    for runs in groups:
        label = str(runs[0]["label"])
        peers = by_label[label]
        if len(peers) > 1:
            keys = distinguishing_keys([g[0] for g in peers])
            ident = run_identity(runs[0])
            label += " (" + ", ".join(f"{k.removeprefix('summary.')}="
                                      f"{_show(ident.get(k, _ABSENT))}" for k in keys) + ")"
        row: dict[str, Any] = {"label": label, "defense": runs[0].get("defense"),
                               "seeds": ",".join(str(r.get("seed")) for r in runs)}
        for m in SEED_METRICS:
            if m in OPTIONAL_SEED_METRICS and not any(m in r for r in runs):
                continue
            vals = [float(r[m]) for r in runs if r.get(m) is not None]
            if not vals:
                row[m] = None
            elif len(vals) == 1:
                row[m] = f"{vals[0]:.2f}"
            else:
                row[m] = f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
        k = sum(bool(r.get("collapsed")) for r in runs)
        row["collapsed"] = f"†{k}/{len(runs)}{_histogram_note(runs)}" if k else "no"
        row["degraded"] = "degraded" if _degraded(runs, groups) else ""
        row["wall_time_s"] = float(np.mean([float(r.get("wall_time_s") or 0.0) for r in runs]))
        rows.append(row)
    return rows


def _histogram_note(runs: list[dict[str, Any]]) -> str:
    """' (H …, max q …)': the mean prediction entropy and largest class share beside a collapsed
    cell (docs/protocol.md §7.4), from the summaries that have them."""
    parts = []
    for name, key in (("H", "entropy"), ("max q", "q_max")):
        vals = [float(r[key]) for r in runs if r.get(key) is not None]
        if vals:
            parts.append(f"{name} {sum(vals) / len(vals):.2f}")
    return f" ({', '.join(parts)})" if parts else ""


DEGRADED_POINTS = 10.0  # docs/protocol.md §7.4


def _setting(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's identity apart from its defense (and the keys only a defense makes matter)."""
    return {k: v for k, v in run_identity(summary).items()
            if not k.startswith(("defense.", "summary.defense", "summary.label"))
            and k not in ("experiment.streams", "federation.fisher_data")}


def _degraded(runs: list[dict[str, Any]], groups: list[list[dict[str, Any]]]) -> bool:
    """The advisory mark of docs/protocol.md §7.4: Ā more than 10 points below FedAvg's Ā in the
    same setting over the same seeds (False when no such FedAvg runs are among the summaries)."""
    if runs[0].get("defense") == "fedavg":
        return False
    mine = _setting(runs[0])
    seeds = [r.get("seed") for r in runs]
    for g in groups:
        if g[0].get("defense") != "fedavg" or _setting(g[0]) != mine:
            continue
        by_seed = {r.get("seed"): r.get("A") for r in g if r.get("A") is not None}
        if not all(s in by_seed for s in seeds) or any(r.get("A") is None for r in runs):
            continue
        ours = sum(float(r["A"]) for r in runs) / len(runs)
        base = sum(float(by_seed[s]) for s in seeds) / len(seeds)
        return ours < base - DEGRADED_POINTS
    return False


def failure_note(summaries: list[dict[str, Any]]) -> str | None:
    """A line under a table naming the runs in which clients failed (``nodes_failed``: missing or
    invalid uploads, left out of TPR/FPR; docs/protocol.md §7.6), or None."""
    hit = [s for s in summaries if s.get("nodes_failed")]
    if not hit:
        return None
    runs = ", ".join(f"{s.get('label')} seed {s.get('seed')} ({s.get('failed_client_rounds')})"
                     for s in hit)
    return (f"clients failed (failed client-rounds, left out of TPR/FPR; see summary.json "
            f"'failures') in: {runs}")


def collect_summaries(root: str | Path, *, finished_only: bool = False) -> list[dict[str, Any]]:
    """Every run summary below ``root`` (any engine), in directory order, with its resolved config
    beside it as ``_config`` (None without one; ``run_identity``); a summary written before
    summaries named their attack gets it from that config. ``finished_only`` keeps the finished
    runs (``RunDir.finished_summary``) and passes over the others."""
    import yaml

    out = []
    for p in sorted(Path(root).rglob(RunDir.SUMMARY_JSON)):
        if finished_only:
            found = RunDir(p.parent).finished_summary()
            if found is None:
                continue
            s = found
        else:
            s = json.loads(p.read_text())
        cfg_path = p.parent / RunDir.CONFIG
        cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else None
        s["_config"] = cfg
        s["_dir"] = str(p.parent)
        if "attack" not in s and cfg is not None:
            s["attack"] = (cfg.get("attack") or {}).get("name")
        label = str(s.get("label", ""))
        if " | " in label:  # a matrix variant: "row | column"
            s["row"], s["column"] = label.split(" | ", 1)
        out.append(s)
    if not out:
        raise FileNotFoundError(f"no {RunDir.SUMMARY_JSON} below {root}")
    return out


def pivot_groups(summaries: list[dict[str, Any]], rows: str = "attack", cols: str = "defense"
                 ) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The runs of each (``rows`` value, ``cols`` value) cell, in the order first seen; the
    grouping of ``pivot`` and of the report's heatmap."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        if s.get(rows) is None or s.get(cols) is None:
            raise ValueError(f"summary {s.get('label')!r} has no {rows!r} or {cols!r}")
        cells.setdefault((str(s[rows]), str(s[cols])), []).append(s)
    return cells


# ``pivot`` metrics read from a run's round records rather than its summary (so that runs made
# before they existed table alike): the percentage of attacker / benign client-rounds refused
# (weight 0 with a reason), and which reasons and clipped counts fired on each.
RECORD_METRICS = ("att_refused", "ben_refused", "fired")


def rule_firings(rounds: list[dict[str, Any]], attackers: Sequence[int]) -> dict[str, Any]:
    """How often each refusal reason (a client at weight 0) and each clipped count fired, on
    attacker and on benign client-rounds, with the client-round totals (docs/algorithms.md §8)."""
    att = set(int(a) for a in attackers)
    fired: dict[str, dict[str, int]] = {"attacker": {}, "benign": {}}
    totals = {"attacker": 0, "benign": 0}
    refused = {"attacker": 0, "benign": 0}
    for r in rounds:
        clients = r.get("clients") or {}
        ids = [int(c) for c in clients.get("ids") or []]
        reasons = clients.get("reasons") or [None] * len(ids)
        clipped = set(int(c) for c in ((r.get("diagnostics") or {}).get("count_clipped") or []))
        for c, why in zip(ids, reasons):
            side = "attacker" if c in att else "benign"
            totals[side] += 1
            codes = ([why] if why else []) + (["count_clipped"] if c in clipped else [])
            refused[side] += bool(why)
            for code in codes:
                fired[side][code] = fired[side].get(code, 0) + 1
    return {"fired": fired, "client_rounds": totals, "refused": refused}


def _rule_firings(run_dir: str | Path) -> dict[str, Any]:
    """``rule_firings`` of a run directory, its attackers read from the run's partition."""
    d = Path(run_dir)
    part = d / "partition.json"
    attackers = (json.loads(part.read_text()).get("attackers") or []) if part.is_file() else []
    return rule_firings(RunDir(d).rounds(), attackers)


def _record_cell(metric: str, got: list[dict[str, Any]]) -> str:
    """A RECORD_METRICS cell from the ``rule_firings`` of a pivot cell's runs (seeds)."""
    import numpy as np

    if not got:
        return "–"
    if metric in ("att_refused", "ben_refused"):
        side = "attacker" if metric == "att_refused" else "benign"
        vals = [100.0 * g["refused"][side] / g["client_rounds"][side]
                for g in got if g["client_rounds"][side]]
        return f"{np.mean(vals):.1f}" if vals else "–"
    parts = []
    for side, tag in (("attacker", "att"), ("benign", "ben")):
        total = sum(g["client_rounds"][side] for g in got)
        codes: dict[str, int] = {}
        for g in got:
            for code, n in g["fired"][side].items():
                codes[code] = codes.get(code, 0) + n
        if codes:
            parts.append(f"{tag} " + ", ".join(f"{c} {n}/{total}" for c, n in sorted(codes.items())))
    return "; ".join(parts) or "none"


@dataclass(frozen=True)
class MatrixOrder:
    """Row and column labels of matrix configs in their order, and the cells they exclude (with why)."""

    rows: list[str]
    columns: list[str]
    excluded: dict[tuple[str, str], str]

    @staticmethod
    def sort(found: list[str], wanted: list[str]) -> list[str]:
        """``found`` in ``wanted``'s order, the labels ``wanted`` lacks after, as found (a stable sort)."""
        rank = {k: i for i, k in enumerate(wanted)}
        return sorted(found, key=lambda k: rank.get(k, len(rank)))

    @classmethod
    def from_configs(cls, paths: Sequence[str | Path]) -> MatrixOrder:
        """Read each config's ``matrix`` section (rows, columns, exclude) as written."""
        import yaml

        rows: list[str] = []
        columns: list[str] = []
        excluded: dict[tuple[str, str], str] = {}
        for path in paths:
            try:
                raw = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"cannot read {path}: {e}") from None
            matrix = raw.get("matrix") if isinstance(raw, dict) else None
            if not isinstance(matrix, dict):
                raise ValueError(f"{path} has no matrix: section to take the order from")
            for key, out in (("rows", rows), ("columns", columns)):
                for item in matrix.get(key) or []:
                    label = str(item.get("label")) if isinstance(item, dict) else str(item)
                    if label not in out:
                        out.append(label)
            for e in matrix.get("exclude") or []:
                if isinstance(e, dict):
                    for c in e.get("columns") or []:
                        excluded[(str(e.get("row")), str(c))] = str(e.get("why") or "")
        return cls(rows, columns, excluded)

    def notes(self, rows: Sequence[str], columns: Sequence[str]) -> str:
        """The excluded cells among ``rows`` × ``columns``, a line per reason and set of
        columns: ``excl. rows × columns: why``."""
        by_why: dict[str, dict[str, list[str]]] = {}
        for (r, c), why in self.excluded.items():
            if r not in rows or c not in columns:
                continue
            by_why.setdefault(why, {}).setdefault(r, []).append(c)
        lines = []
        for why, cols_of in by_why.items():
            groups: dict[tuple[str, ...], list[str]] = {}
            for r, cs in cols_of.items():
                groups.setdefault(tuple(cs), []).append(r)
            lines += [f"excl. {', '.join(rs)} × {', '.join(cs)}: {why}" for cs, rs in groups.items()]
        return "\n".join(lines)


def pivot(summaries: list[dict[str, Any]], *, rows: str = "attack", cols: str = "defense",
          metrics: tuple[str, ...] = ("A", "ASR"), markdown: bool = False,
          only: list[str] | None = None, order: MatrixOrder | None = None,
          compact: bool = False) -> str:
    """One line per ``rows`` value, one column group per ``cols`` value: each metric's mean over
    seeds, † when a run collapsed, and the mean wall time per run (a defenses × attacks matrix);
    RECORD_METRICS come from the runs' round records (attacker identities from the partition).
    ``order`` puts rows and columns in a matrix config's order (the rest after, as found), marks
    its excluded cells ``excl.`` and lists why under the table, for the cells shown. ``compact``: one cell per column, its metrics joined by
    " / " at one decimal, no wall times, and "(k seeds)" where a cell has fewer seeds than the
    table's fullest. MixedRunsError when a cell holds runs that differ in more than the seed
    (``same_but_seed``)."""
    import numpy as np

    cells = pivot_groups(summaries, rows, cols)
    for (r, c), runs in cells.items():
        mixed = [x for x in runs if not same_but_seed(runs[0], x)]
        if mixed:
            keys = distinguishing_keys([runs[0], *mixed])
            raise MixedRunsError(f"the cell {rows}={r}, {cols}={c} holds runs that differ in more "
                             f"than the seed ({', '.join(k.removeprefix('summary.') for k in keys)}"
                             f"): {runs[0].get('label')!r} and {mixed[0].get('label')!r}; "
                             "table the directories apart")
    row_keys = list(dict.fromkeys(r for r, _ in cells))
    col_keys = list(dict.fromkeys(c for _, c in cells))
    if order is not None:
        row_keys, col_keys = order.sort(row_keys, order.rows), order.sort(col_keys, order.columns)
    excluded = order.excluded if order is not None else {}
    if only:  # these columns, in this order
        unknown = [c for c in only if c not in col_keys]
        if unknown:
            raise ValueError(f"no {cols} {unknown[0]!r} among the runs; have {', '.join(col_keys)}")
        col_keys = list(only)
    if compact:
        head = [f"{rows} ({' / '.join(metrics)})"] + list(col_keys)
    else:
        head = [rows] + [f"{c} {m}" for c in col_keys for m in metrics] + [f"{c} s" for c in col_keys]
    most = max((len(v) for v in cells.values()), default=0)
    table = []
    for r in row_keys:
        line = [r]
        for c in col_keys:
            runs = cells.get((r, c), [])
            mark = "†" if any(x.get("collapsed") for x in runs) else ""
            # each run's records are read once per cell, whichever record metrics are asked
            firings = ([_rule_firings(x["_dir"]) for x in runs if x.get("_dir")]
                       if any(m in RECORD_METRICS for m in metrics) else [])
            parts = []
            for m in metrics:
                if m in RECORD_METRICS:
                    parts.append(_record_cell(m, firings))
                    continue
                vals = [float(x[m]) for x in runs if x.get(m) is not None]
                parts.append(f"{np.mean(vals):.{1 if compact else 2}f}{mark}" if vals
                             else "excl." if not runs and (r, c) in excluded else "–")
            if not compact:
                line.extend(parts)
            elif not runs:
                line.append("excl." if (r, c) in excluded else "–")
            else:
                seeds = f" ({len(runs)} seed{'s' * (len(runs) > 1)})" if len(runs) < most else ""
                line.append(" / ".join(parts) + seeds)
        for c in col_keys if not compact else []:
            runs = cells.get((r, c), [])
            line.append(f"{np.mean([float(x['wall_time_s']) for x in runs]):.0f}" if runs else "–")
        table.append(line)
    notes = order.notes(row_keys, col_keys) if order is not None else ""
    tail = f"\n\n{notes}" if notes else ""
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(out + ["| " + " | ".join(x) + " |" for x in table]) + tail
    widths = [max(len(h), *(len(x[i]) for x in table)) for i, h in enumerate(head)]
    fmt = lambda xs: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(xs, widths)))
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(x) for x in table]) + tail
