"""Figures of run directories: accuracy/ASR curves, aggregation weights, detection (TPR/FPR and
the suspicion score's AUC/AP), the matrix.

Every figure is written as PNG and SVG with the Agg backend, fixed sizes and no timestamps, so
the same run directories give the same bytes. Plots read run directories only; the attacker ids
of ``partition.json`` only colour clients, they change nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from fisherguard.results import RunDir, pivot_groups, slug

ATTACKER_COLOUR = "#d62728"
FORMATS = ("png", "svg")
# the formats write_plots was asked for (the plot functions save through _save)
_formats: ContextVar[tuple[str, ...]] = ContextVar("formats", default=FORMATS)
# ``write_plots(kinds=...)``: overview leaves out the per-run weight heatmaps (one per run)
KINDS = {"all": ("curves", "detection", "auc", "weights", "matrix"),
         "overview": ("curves", "detection", "auc", "matrix"), "none": ()}
# text as <text> elements (searchable SVG), fixed ids, no dates: the same input, the same bytes
_RC = {"svg.fonttype": "none", "svg.hashsalt": "fisherguard", "path.simplify": True,
       "font.size": 9, "axes.titlesize": 10}
_META = {"png": {"Software": None}, "svg": {"Date": None}}
_CONFIG_NOISE = ("runtime", "defense")  # what differs between runs of one experiment group


class Run:
    """One run directory as plots see it: summary, resolved config, round records, attackers."""

    def __init__(self, path: Path, name: str) -> None:
        import yaml

        self.path = Path(path)
        self.name = name
        self.summary: dict[str, Any] = json.loads((self.path / RunDir.SUMMARY_JSON).read_text())
        cfg_path = self.path / RunDir.CONFIG
        self.config: dict[str, Any] = (yaml.safe_load(cfg_path.read_text()) or {}
                                       if cfg_path.is_file() else {})
        if "attack" not in self.summary:  # as results.collect_summaries does for older runs
            self.summary["attack"] = (self.config.get("attack") or {}).get("name")
        self._rounds: list[dict[str, Any]] | None = None

    def rounds(self) -> list[dict[str, Any]]:
        """The round records (rounds.jsonl or rounds.jsonl.gz), read once."""
        if self._rounds is None:
            self._rounds = RunDir(self.path).rounds()
        return self._rounds

    def attackers(self) -> set[int]:
        """The attacker ids of partition.json (empty when absent); for colouring only."""
        p = self.path / "partition.json"
        if not p.is_file():
            return set()
        return {int(i) for i in json.loads(p.read_text()).get("attackers") or []}

    @property
    def defense_label(self) -> str:
        """The defense's display name: the label's last ``|`` part, else the defense key."""
        label = str(self.summary.get("label") or "")
        if " | " in label:
            return label.rsplit(" | ", 1)[1].strip()
        return str(self.summary.get("defense") or label or self.name)

    @property
    def seed(self) -> Any:
        """The run's seed (summary, else config)."""
        return self.summary.get("seed", (self.config.get("experiment") or {}).get("seed"))

    def group_key(self) -> str:
        """The experiment group: the resolved config apart from defense, runtime, name and seed."""
        if self.config:
            cfg = {k: v for k, v in self.config.items() if k not in _CONFIG_NOISE}
            exp = dict(cfg.get("experiment") or {})
            exp.pop("name", None)
            exp.pop("seed", None)
            cfg["experiment"] = exp
        else:
            cfg = {k: self.summary.get(k) for k in
                   ("dataset", "attack", "beta", "attack_fraction", "preset", "family")}
        return json.dumps(cfg, sort_keys=True, default=str)

    def group_title(self) -> str:
        """A short human title of the experiment group."""
        data = (self.config.get("data") or {}).get("dataset", self.summary.get("dataset"))
        attack = self.summary.get("attack")
        beta = (self.config.get("partition") or {}).get("beta", self.summary.get("beta"))
        frac = (self.config.get("attack") or {}).get("fraction",
                                                       self.summary.get("attack_fraction"))
        parts = [f"{attack}" if attack else "no attack", f"on {data}" if data else ""]
        if beta is not None:
            parts.append(f"β={beta}")
        if frac is not None:
            parts.append(f"attackers {frac}")
        return " ".join(p for p in parts if p)


# --------------------------------------------------------------------------- finding runs


def find_runs(run_dirs: list[Path] | Path) -> list[Run]:
    """Every run directory (one with summary.json) below the given paths, in order; none for []."""
    paths = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(p) for p in run_dirs]
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in paths:
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        found = sorted(p.parent for p in root.rglob(RunDir.SUMMARY_JSON))
        if not found:
            raise ValueError(f"{root} holds no run directory (no {RunDir.SUMMARY_JSON} below it)")
        for d in found:
            if d.resolve() in seen:  # a run below two of the given paths is plotted once
                continue
            seen.add(d.resolve())
            rel = d.relative_to(root)
            runs.append(Run(d, str(rel) if rel.parts else root.name))
    return runs


def _groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by experiment (config apart from the defense); (file stem, runs) per group."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group_key(), []).append(r)
    stems = [_stem(rs[0].group_title()) for rs in groups.values()]
    out = []
    for (key, rs), stem in zip(groups.items(), stems):
        if stems.count(stem) > 1:  # same title, other settings: a hash of the config tells apart
            stem = f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"
        out.append((stem, rs))
    return out


def _stem(text: str) -> str:
    """A file-name stem: results.slug restricted to ASCII (β becomes "beta")."""
    text = text.replace("β", "beta")
    return slug("".join(c if c.isascii() else "-" for c in text))


def _unique(stems: list[str]) -> list[str]:
    """File stems made unique by a counter suffix, in order."""
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return out


# --------------------------------------------------------------------------- saving


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write the figure as PNG and SVG (no timestamps, fixed ids); close it; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # the Agg canvas explicitly: no pyplot, no display, no global state
    paths = []
    with matplotlib.rc_context(_RC):
        for ext in _formats.get():
            p = out_dir / f"{stem}.{ext}"
            fig.savefig(p, format=ext, dpi=100, metadata=_META[ext])
            paths.append(p)
    return paths


def _num(x: Any) -> float:
    """A metric value as float; NaN for missing or non-numeric."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _series(run: Run, section: str, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one per-round quantity, NaN where a record lacks it."""
    xs, ys = [], []
    for rec in run.rounds():
        xs.append(int(rec.get("round", len(xs) + 1)))
        ys.append(_num((rec.get(section) or {}).get(key)))
    return xs, ys


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A stable colour and marker per defense label (sorted order), so equal lines still show."""
    cmap = matplotlib.colormaps["tab10"]
    return {lab: {"color": cmap(i % 10), "marker": _MARKERS[i % len(_MARKERS)],
                  "markersize": 7 - 3 * i / max(1, len(set(labels)) - 1)}
            for i, lab in enumerate(sorted(set(labels)))}


def _line_names(runs: list[Run]) -> list[str]:
    """Each run's line name: its defense label, or its run label where runs of one seed share
    a defense label (variants of one defense, e.g. FDCR's rules)."""
    names = [r.defense_label for r in runs]
    count: dict[tuple[str, str], int] = {}
    for r, n in zip(runs, names):
        count[(n, str(r.seed))] = count.get((n, str(r.seed)), 0) + 1
    return [str(r.summary.get("label") or r.name) if count[(n, str(r.seed))] > 1 else n
            for r, n in zip(runs, names)]


def _lines(runs: list[Run], section: str, keys: tuple[str, ...], title: str,
           ylabel: str, ylim: tuple[float, float] = (-3, 103)) -> Figure:
    """One panel per key, one line per run coloured by defense label."""
    names = _line_names(runs)
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(5.0 * len(keys), 3.6))
        axes = np.atleast_1d(fig.subplots(1, len(keys), sharex=True))
        styles = _styles(names)
        seeds: dict[str, set[Any]] = {}
        for r, name in zip(runs, names):
            seeds.setdefault(name, set()).add(r.seed)
        for ax, key in zip(axes, keys):
            for r, name in zip(runs, names):
                xs, ys = _series(r, section, key)
                label = name
                if len(seeds[label]) > 1:
                    label = f"{label} (seed {r.seed})"
                ax.plot(xs, ys, label=label, alpha=0.85, **styles[name])
            ax.set_title(key)
            ax.set_xlabel("round")
            ax.set_ylabel(f"{key} {ylabel}".rstrip())
            ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[-1].legend(fontsize=8, loc="best")
        fig.suptitle(title)
        fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the four plots


def plot_curves(runs: list[Run], out_dir: Path, stem: str) -> list[Path]:
    """A and ASR per round, one line per defense, for one experiment group."""
    title = f"A and ASR per round: {runs[0].group_title()}"
    return _save(_lines(runs, "metrics", ("A", "ASR"), title, "(%)"), out_dir, f"curves-{stem}")


def plot_detection(runs: list[Run], out_dir: Path, stem: str) -> list[Path]:
    """Detection TPR and FPR per round, one line per defense, for one experiment group."""
    title = f"Detection per round: {runs[0].group_title()}"
    fig = _lines(runs, "detection", ("TPR", "FPR"), title, "(%)")
    return _save(fig, out_dir, f"detection-{stem}")


def plot_scores(runs: list[Run], out_dir: Path, stem: str) -> list[Path]:
    """Per-round ROC AUC and AP of each defense's suspicion score against the attackers, one line
    per defense (docs/protocol.md §7.6); a dotted line marks the AUC of a random ranking."""
    title = f"Detection AUC of the suspicion score per round: {runs[0].group_title()}"
    fig = _lines(runs, "detection", ("AUC", "AP"), title, "", ylim=(-0.03, 1.03))
    fig.axes[0].axhline(0.5, color="#808080", linestyle=":", linewidth=1.0)
    return _save(fig, out_dir, f"auc-{stem}")


def _has_scores(run: Run) -> bool:
    """Whether any round record carries a detection AUC (a defense with a suspicion score)."""
    return any((rec.get("detection") or {}).get("AUC") is not None for rec in run.rounds())


def _has_detection(run: Run) -> bool:
    """Whether any round record carries a detection TPR or FPR."""
    return any((rec.get("detection") or {}).get(k) is not None
               for rec in run.rounds() for k in ("TPR", "FPR"))


def plot_weights(run: Run, out_dir: Path, stem: str) -> list[Path]:
    """Aggregation weight per client and round; attacker ids in red, flagged cells hatched."""
    recs = run.rounds()
    ids = sorted({int(i) for rec in recs for i in (rec.get("clients") or {}).get("ids") or []})
    row = {c: i for i, c in enumerate(ids)}
    rounds = [int(rec.get("round", j + 1)) for j, rec in enumerate(recs)]
    w = np.full((len(ids), len(recs)), np.nan)
    flagged: list[tuple[int, int]] = []
    for j, rec in enumerate(recs):
        cl = rec.get("clients") or {}
        cids = cl.get("ids") or []
        weights = cl.get("weights") or []
        flags = cl.get("flagged") or []
        for k, c in enumerate(cids):
            if k < len(weights):
                w[row[int(c)], j] = _num(weights[k])
            if k < len(flags) and flags[k]:
                flagged.append((row[int(c)], j))
    attackers = run.attackers()
    height = min(12.0, max(3.2, 1.6 + 0.22 * len(ids)))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(7.5, height))
        ax = fig.subplots()
        im = ax.imshow(w, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                       origin="upper")
        for i, j in flagged:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="white", linewidth=0.0))
        label_every = 1 if len(ids) <= 50 else max(1, len(ids) // 25)
        ticks = [i for i, c in enumerate(ids) if i % label_every == 0 or c in attackers]
        ax.set_yticks(ticks, [str(ids[i]) for i in ticks])
        for t, i in zip(ax.get_yticklabels(), ticks):
            if ids[i] in attackers:
                t.set_color(ATTACKER_COLOUR)
                t.set_fontweight("bold")
        col_every = 1 if len(rounds) <= 30 else max(1, len(rounds) // 15)
        cols = list(range(0, len(rounds), col_every))
        ax.set_xticks(cols, [str(rounds[j]) for j in cols])
        ax.set_xlabel("round")
        ax.set_ylabel("client id")
        ax.set_title(f"Aggregation weight per client: {run.summary.get('label', run.name)}")
        fig.colorbar(im, ax=ax, label="weight")
        handles = [Line2D([], [], linestyle="none", marker="s", color=ATTACKER_COLOUR,
                          label="attacker (id in red)"),
                   Patch(facecolor="#808080", edgecolor="white", hatch="///",
                         label="flagged by the defense")]
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0.0, 0.3 / height, 1.0, 1.0))  # room for the legend below
    return _save(fig, out_dir, f"weights-{stem}")


def matrix_cells(summaries: list[dict[str, Any]], rows: str = "attack",
                 cols: str = "defense") -> tuple[list[str], list[str], dict[tuple[str, str],
                                                                              dict[str, Any]]]:
    """results.pivot's cells: (row keys, column keys, {(row, col): mean A, ASR, collapsed})."""
    groups = pivot_groups(summaries, rows, cols)
    cells = {}
    for key, runs in groups.items():
        cell: dict[str, Any] = {"collapsed": any(bool(x.get("collapsed")) for x in runs)}
        for m in ("A", "ASR"):
            vals = [float(x[m]) for x in runs if x.get(m) is not None]
            cell[m] = float(np.mean(vals)) if vals else None
        cells[key] = cell
    return (list(dict.fromkeys(r for r, _ in groups)), list(dict.fromkeys(c for _, c in groups)),
            cells)


def plot_matrix(summaries: list[dict[str, Any]], out_dir: Path,
                stem: str = "matrix-attack-defense") -> list[Path]:
    """Defenses × attacks: colour = ASR, annotated "A/ASR", † and hatching for a collapsed run."""
    row_keys, col_keys, cells = matrix_cells(summaries)
    asr = np.full((len(row_keys), len(col_keys)), np.nan)
    for (r, c), cell in cells.items():
        if cell["ASR"] is not None:
            asr[row_keys.index(r), col_keys.index(c)] = cell["ASR"]
    width = min(16.0, max(5.0, 2.2 + 1.2 * len(col_keys)))
    height = min(20.0, max(3.0, 1.4 + 0.42 * len(row_keys)))
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height))
        ax = fig.subplots()
        cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#eeeeee")  # grey: no run
        im = ax.imshow(np.ma.masked_invalid(asr), aspect="auto", cmap=cmap, vmin=0.0,
                       vmax=100.0, interpolation="nearest")
        for (r, c), cell in cells.items():
            i, j = row_keys.index(r), col_keys.index(c)
            a = "–" if cell["A"] is None else f"{cell['A']:.1f}"
            s = "–" if cell["ASR"] is None else f"{cell['ASR']:.1f}"
            dark = cell["ASR"] is not None and cell["ASR"] > 60
            ax.text(j, i, f"{a}/{s}{'†' if cell['collapsed'] else ''}", ha="center",
                    va="center", fontsize=8, color="white" if dark else "black")
            if cell["collapsed"]:  # a collapsed model's low ASR is no protection: hatch it
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx",
                                       edgecolor="#777777", linewidth=0.0))
        ax.set_xticks(range(len(col_keys)), col_keys, rotation=30, ha="right")
        ax.set_yticks(range(len(row_keys)), row_keys)
        ax.set_xlabel("defense")
        ax.set_ylabel("attack")
        ax.set_title("ASR by attack × defense (cell: A/ASR; † and hatching: collapsed model)")
        fig.colorbar(im, ax=ax, label="ASR (%)")
        fig.tight_layout()
    return _save(fig, out_dir, stem)


# --------------------------------------------------------------------------- everything


def write_plots(run_dirs: list[Path] | Path, out_dir: Path, *, kinds: str = "all",
                formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Every applicable figure of the runs below ``run_dirs`` (``KINDS[kinds]``), in ``formats``
    (PNG and SVG by default); their paths."""
    if kinds not in KINDS:
        raise ValueError(f"plots: {kinds!r} is not one of {', '.join(KINDS)}")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"plot formats: choose from {', '.join(FORMATS)}, got {list(formats)}")
    token = _formats.set(tuple(formats))
    try:
        return _write_plots(run_dirs, Path(out_dir), KINDS[kinds])
    finally:
        _formats.reset(token)


def _write_plots(run_dirs: list[Path] | Path, out_dir: Path, kinds: tuple[str, ...]
                 ) -> list[Path]:
    # curves-<group>, detection-<group> (runs with detection), auc-<group> (runs whose defense
    # has a suspicion score), weights-<run> (runs with client
    # weights), matrix-attack-defense; ValueError when a given path holds no run directory
    runs = find_runs(run_dirs)
    paths: list[Path] = []
    for stem, group in _groups(runs):
        if "curves" in kinds and any(r.rounds() for r in group):
            paths += plot_curves(group, out_dir, stem)
        det = [r for r in group if _has_detection(r)]
        if det and "detection" in kinds:
            paths += plot_detection(det, out_dir, stem)
        scored = [r for r in group if _has_scores(r)]
        if scored and "auc" in kinds:
            paths += plot_scores(scored, out_dir, stem)
    with_weights = [r for r in runs if "weights" in kinds and
                    any((rec.get("clients") or {}).get("weights") for rec in r.rounds())]
    for r, stem in zip(with_weights, _unique([_stem(r.name) for r in with_weights])):
        paths += plot_weights(r, out_dir, stem)
    # the matrix of the runs that name an attack and a defense (a clean run has no attack row)
    summaries = [r.summary for r in runs
                 if r.summary.get("attack") is not None and r.summary.get("defense") is not None]
    if summaries and "matrix" in kinds:
        paths += plot_matrix(summaries, out_dir)
    return paths
