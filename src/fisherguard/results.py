"""Run directories: resolved config, one JSON line per round, checkpoint for resume, summary tables.

Reports read run directories only, so they do not care which engine produced them.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import torch


class ResumeError(RuntimeError):
    """A run directory cannot be resumed (different config, damaged checkpoint)."""


def _results_part(cfg_text: str) -> Any:
    """The config without what never changes results: the ``runtime`` section and the run's name."""
    import yaml

    cfg = yaml.safe_load(cfg_text) or {}
    cfg.pop("runtime", None)
    if isinstance(cfg.get("experiment"), dict):
        cfg["experiment"].pop("name", None)
    return cfg


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

    def start(self, cfg_text: str, *, resume: bool) -> int:
        """Prepare the directory for a run of this resolved config (YAML); return the finished rounds.

        0 unless resuming; the config file is the run's identity (runtime and name aside).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file = self.path / self.CONFIG
        if resume and cfg_file.exists():
            if _results_part(cfg_file.read_text()) != _results_part(cfg_text):
                raise ResumeError(f"{cfg_file} holds a different config; resume needs the same "
                                  "config and overrides (or choose another --out); only the "
                                  "runtime section and experiment.name may change")
            _atomic_write(cfg_file, cfg_text.encode())
            ck = self.load_checkpoint()
            done = 0 if ck is None else int(ck["rounds_done"])
            self._truncate_rounds(done)
            return done
        if not resume and (self.path / self.ROUNDS).exists():
            raise ResumeError(f"{self.path} already holds a run; pass --resume to continue it or "
                              "choose another --out")
        _atomic_write(cfg_file, cfg_text.encode())
        (self.path / self.ROUNDS).write_text("")
        return 0

    def _truncate_rounds(self, done: int) -> None:
        # A round logged after the last checkpoint (killed in between) is redone, so drop it.
        kept = [r for r in self.rounds() if r["round"] <= done]
        _atomic_write(self.path / self.ROUNDS, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append_round(self, record: dict[str, Any]) -> None:
        with open(self.path / self.ROUNDS, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        buf = io.BytesIO()
        torch.save(state, buf)
        _atomic_write(self.path / self.CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / self.CHECKPOINT
        if not p.exists():
            return None
        try:
            return torch.load(p, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
            raise ResumeError(f"{p} is damaged ({e}); delete the run directory to start over") from None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        """A small JSON file of the run (e.g. the defense's hyperparameters), written atomically."""
        _atomic_write(self.path / name, json.dumps(_jsonable(data), indent=2).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / self.SUMMARY_JSON, json.dumps(_jsonable(summary), indent=2).encode())
        write_csv(self.path / self.SUMMARY_CSV, [summary])

    # what a finished run keeps as evidence under results/: no checkpoint, no CSV duplicate
    EVIDENCE = ("config.yaml", "summary.json", "partition.json", "defense.json")

    def export(self, dest: str | Path) -> Path:
        """Copy a finished run's evidence to ``dest``: the resolved config, summary, partition and
        defense parameters, and the round records gzip'd with a fixed timestamp (same bytes for
        the same records). ResumeError when the run is not finished."""
        summary = self.path / self.SUMMARY_JSON
        if not summary.exists() or not json.loads(summary.read_text()).get("complete", False):
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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
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


COLUMNS = ("label", "defense", "seeds", "A", "R", "ASR", "V", "collapsed", "TPR", "FPR", "wall_time_s")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys([c for c in COLUMNS if any(c in r for r in rows)]
                              + [k for r in rows for k in r]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _jsonable(r.get(k)) for k in cols})


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A plain-text table of run summaries."""
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    head = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    lines = [head, "-" * len(head)]
    for row in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


SEED_METRICS = ("A", "R", "ASR", "V", "TPR", "FPR")


def aggregate_seeds(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: mean ± sample std (ddof = 1) over seeds; collapse as †k/n (docs/protocol.md §7.4–§7.5)."""
    import numpy as np

    groups: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(str(s["label"]), []).append(s)
    rows = []
    for label, runs in groups.items():
        row: dict[str, Any] = {"label": label, "defense": runs[0].get("defense"),
                               "seeds": ",".join(str(r.get("seed")) for r in runs)}
        for m in SEED_METRICS:
            vals = [float(r[m]) for r in runs if r.get(m) is not None]
            if not vals:
                row[m] = None
            elif len(vals) == 1:
                row[m] = f"{vals[0]:.2f}"
            else:
                row[m] = f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
        k = sum(bool(r.get("collapsed")) for r in runs)
        row["collapsed"] = f"†{k}/{len(runs)}" if k else "no"
        row["wall_time_s"] = float(sum(float(r.get("wall_time_s") or 0.0) for r in runs))
        rows.append(row)
    return rows


def collect_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every run summary below ``root`` (any engine), in directory order; a summary written before
    summaries named their attack gets it from the resolved config beside it."""
    import yaml

    out = []
    for p in sorted(Path(root).rglob(RunDir.SUMMARY_JSON)):
        s = json.loads(p.read_text())
        cfg_path = p.parent / RunDir.CONFIG
        if "attack" not in s and cfg_path.is_file():
            s["attack"] = ((yaml.safe_load(cfg_path.read_text()) or {}).get("attack") or {}).get("name")
        label = str(s.get("label", ""))
        if " | " in label:  # a matrix variant: "row | column"
            s["row"], s["column"] = label.split(" | ", 1)
        out.append(s)
    if not out:
        raise FileNotFoundError(f"no {RunDir.SUMMARY_JSON} below {root}")
    return out


def pivot(summaries: list[dict[str, Any]], *, rows: str = "attack", cols: str = "defense",
          metrics: tuple[str, ...] = ("A", "ASR"), markdown: bool = False,
          only: list[str] | None = None) -> str:
    """One line per ``rows`` value, one column group per ``cols`` value: each metric's mean over
    seeds, † when a run collapsed, and the mean wall time per run (a defenses × attacks matrix)."""
    import numpy as np

    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        if s.get(rows) is None or s.get(cols) is None:
            raise ValueError(f"summary {s.get('label')!r} has no {rows!r} or {cols!r}")
        cells.setdefault((str(s[rows]), str(s[cols])), []).append(s)
    row_keys = list(dict.fromkeys(r for r, _ in cells))
    col_keys = list(dict.fromkeys(c for _, c in cells))
    if only:  # these columns, in this order
        unknown = [c for c in only if c not in col_keys]
        if unknown:
            raise ValueError(f"no {cols} {unknown[0]!r} among the runs; have {', '.join(col_keys)}")
        col_keys = list(only)
    head = [rows] + [f"{c} {m}" for c in col_keys for m in metrics] + [f"{c} s" for c in col_keys]
    table = []
    for r in row_keys:
        line = [r]
        for c in col_keys:
            runs = cells.get((r, c), [])
            mark = "†" if any(x.get("collapsed") for x in runs) else ""
            for m in metrics:
                vals = [float(x[m]) for x in runs if x.get(m) is not None]
                line.append(f"{np.mean(vals):.2f}{mark}" if vals else "–")
        for c in col_keys:
            runs = cells.get((r, c), [])
            line.append(f"{np.mean([float(x['wall_time_s']) for x in runs]):.0f}" if runs else "–")
        table.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        return "\n".join(out + ["| " + " | ".join(x) + " |" for x in table])
    widths = [max(len(h), *(len(x[i]) for x in table)) for i, h in enumerate(head)]
    fmt = lambda xs: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(xs, widths)))
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(x) for x in table])
