"""``fisherguard report``: our runs beside the published tables, with verdicts, as MD, LaTeX, CSV.

Reads run directories only (docs/results.md §2); matches runs to published cells by family,
dataset, β, Υ, method (docs/results.md §1) and preset; judges cells and tables by
docs/results.md §5.1–§5.5.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import yaml

from fisherguard.report import published
from fisherguard.report.reproduce import PRIORITY, SCALES, columns, command, config_for, grid
from fisherguard.report.verdict import (CellVerdict, ColumnRank, Ours, TableVerdict,
                                        cell_verdict, column_rank, table_verdict)
from fisherguard.results import RunDir, collect_summaries, identity_part

log = logging.getLogger("fisherguard")
DEFAULT_OUT = Path("results") / "report"
NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
         "usps": "USPS"}
STAND_INS = {"cifar10-jpeg": "cifar10"}  # docs/results.md §5.5


def collect_runs(roots: Iterable[str | Path],
                 left_out: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Complete runs below ``roots`` made under the published protocol at a known scale, with
    their directory, defense options and scale; ``left_out`` counts the others by reason."""
    out = []
    for root in roots:
        summaries = collect_summaries(root)
        dirs = [p.parent for p in sorted(Path(root).rglob(RunDir.SUMMARY_JSON))]
        assert len(dirs) == len(summaries)  # collect_summaries walks the same sorted list
        for s, d in zip(summaries, dirs):
            cfg_file = d / RunDir.CONFIG
            cfg = (yaml.safe_load(cfg_file.read_text()) or {}) if cfg_file.is_file() else {}
            dfn = cfg.get("defense") or {}
            opts = dict(dfn.get("options") or {}) if isinstance(dfn, dict) else {}
            # the config's defense name: a summary may carry a display name (the oracle's)
            name = dfn.get("name") if isinstance(dfn, dict) else dfn
            run = dict(s, _dir=d, _options=opts, _defense=name or s.get("defense"))
            why = ("not finished" if not s.get("complete", False) else
                   "no resolved config" if not cfg else None)
            scale = None if why else protocol_scale(run, cfg)
            if why is None and scale is None:
                why = "not the published protocol (attack, data, schedule or scale differ)"
            if why is not None:
                if left_out is not None:
                    left_out[why] = left_out.get(why, 0) + 1
                continue
            out.append(dict(run, _scale=scale))
    return out


def protocol_scale(run: dict[str, Any], cfg: dict[str, Any]) -> tuple[int, int] | None:
    """(T, E) when the run's resolved config is exactly what ``reproduce`` would plan for its
    method, dataset, β, Υ, seed and preset at one of its scales (docs/results.md §4); else None.

    Only a BadNets run of the papers' protocol may stand beside a published cell: a demo-scale
    run, another attack or a client-pool subset never does."""
    mid = method_of(run)
    try:
        beta, ups = float(run["beta"]), round(float(run["attack_fraction"]) * 100)
        seed, preset = int(run["seed"]), str(run["preset"])
        family, dataset = str(run["family"]), str(run["dataset"])
    except (KeyError, TypeError, ValueError):
        return None
    if mid is None:
        return None
    have = identity_part(yaml.safe_dump(cfg))
    for scale in SCALES:
        try:
            want = config_for(f"{family}-t4", mid, dataset, beta, ups, seed, preset=preset,
                              scale=scale)
        except Exception:  # noqa: BLE001 - a method or dataset this family cannot plan
            return None
        if identity_part(want.to_yaml()) == have:
            return (want.federation.rounds, want.federation.local_epochs)
    return None


def method_of(run: dict[str, Any]) -> str | None:
    """The method id whose defense and options the run has exactly (docs/results.md §1)."""
    for mid, (defense, opts) in published.METHODS.items():
        if run.get("_defense", run.get("defense")) == defense and run.get("_options", {}) == opts:
            return mid
    return None


def _stat(vals: list[float]) -> tuple[float | None, float | None]:
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def ours_of(runs: list[dict[str, Any]]) -> Ours | None:
    """Mean ± sample std over seeds (docs/protocol.md §7.5) of the largest-scale runs given."""
    if not runs:
        return None
    top = max((r["_scale"] for r in runs), key=lambda s: (s[0] or 0) * (s[1] or 0))
    runs = [r for r in runs if r["_scale"] == top]
    stats = {m: _stat([float(r[m]) for r in runs if r.get(m) is not None])
             for m in ("A", "R", "ASR", "V")}
    if stats["A"][0] is None or stats["R"][0] is None:
        return None
    hist = {m: _stat([float(r[m]) for r in runs if r.get(m) is not None])[0]
            for m in ("entropy", "q_max")}
    return Ours(A=stats["A"][0], R=stats["R"][0], s_A=stats["A"][1], s_R=stats["R"][1],
                n=len(runs), collapsed=sum(bool(r.get("collapsed")) for r in runs),
                ASR=stats["ASR"][0], V=stats["V"][0], dataset=runs[0].get("dataset"),
                entropy=hist["entropy"], q_max=hist["q_max"],
                seeds=tuple(sorted(int(r["seed"]) for r in runs if r.get("seed") is not None)),
                reduced_scale=top if top == REDUCED else None)


REDUCED = (SCALES["reduced"]["rounds"], SCALES["reduced"]["local_epochs"])  # (T, E)
DEGRADED_POINTS = 10.0  # docs/protocol.md §7.4: Ā more than 10 points below FedAvg's


def mark_degraded(ours: Ours | None, fedavg_runs: list[dict[str, Any]]) -> None:
    """Set the advisory 'degraded' mark (docs/protocol.md §7.4): Ā more than 10 points below
    FedAvg's Ā in the same setting over the same seeds. Left None when FedAvg lacks a seed."""
    if ours is None or not ours.seeds:
        return
    by_seed: dict[int, float] = {}
    for r in fedavg_runs:
        if r.get("seed") is not None and r.get("A") is not None:
            by_seed.setdefault(int(r["seed"]), float(r["A"]))
    if not all(s in by_seed for s in ours.seeds):
        return
    ours.fedavg_A = sum(by_seed[s] for s in ours.seeds) / len(ours.seeds)
    ours.degraded = ours.A < ours.fedavg_A - DEGRADED_POINTS


def _largest_scale(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not runs:
        return runs
    top = max((r["_scale"] for r in runs), key=lambda s: (s[0] or 0) * (s[1] or 0))
    return [r for r in runs if r["_scale"] == top]


def _index(runs: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Runs by (family, dataset, β, Υ, method, preset); stand-ins filed under the original."""
    idx: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in runs:
        mid = method_of(r)
        if mid is None or r.get("beta") is None or r.get("attack_fraction") is None:
            continue
        ds = STAND_INS.get(r.get("dataset"), r.get("dataset"))
        key = (r.get("family"), ds, float(r["beta"]), round(float(r["attack_fraction"]) * 100),
               mid, r.get("preset"))
        idx.setdefault(key, []).append(r)
    return idx


def _published_rows(table: str) -> dict[tuple[Any, ...], dict[str, dict[str, Any]]]:
    """(dataset, β, Υ, method) → metric → published cell; SDFC Table 5 gets Table 3's FedAvg."""
    cells = published.cells(table)
    if table == "sdfc-t5":
        cells = cells + [c for c in published.cells("sdfc-t3") if c["method"] == "fedavg"]
    out: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for c in cells:
        out.setdefault((c["dataset"], c["beta"], c["upsilon"], c["method"]), {})[c["metric"]] = c
    return out


def build(table: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table: per preset, every cell with our side, its verdict, and the table verdict."""
    family = table.split("-")[0]
    idx = _index(runs)
    pub = _published_rows(table)
    methods = grid(table)["method"]
    if table in published.ORACLE_ROWS and any(k[4] == "fdcr-oracle" and k[0] == family
                                              for k in idx):
        methods = methods + ["fdcr-oracle"]
    presets = sorted({k[5] for k in idx if k[0] == family and k[4] in methods}) or ["paper"]
    cols = columns(table)
    raw: dict[tuple[Any, ...], Any] = {}
    for preset in presets:
        for col in cols:
            for m in methods:
                p = pub.get((*col, m), {})
                if m == "fdcr-oracle":  # against the FDCR cells, docs/results.md §5.3
                    p = pub.get((*col, "fdcr"), {})
                ours = ours_of(idx.get((family, *col, m, preset), []))
                if m != "fedavg":
                    mine = _largest_scale(idx.get((family, *col, m, preset), []))
                    mark_degraded(ours, [r for r in idx.get((family, *col, "fedavg", preset), [])
                                         if mine and r["_scale"] == mine[0]["_scale"]])
                raw[(preset, col, m)] = (p, ours)
    out: dict[str, Any] = {"table": table, "presets": {}}
    for preset in presets:
        cells, ranks = [], []
        for col in cols:
            rank_rows = []
            for m in methods:
                p, ours = raw[(preset, col, m)]
                pa, pr = (p.get(k, {}).get("value") for k in ("A", "R"))
                flags = [f for f in p.get("A", {}).get("flags", [])
                         if not (m == "fdcr-oracle" and f == "oracle")]
                other = None
                for op in presets:
                    if op != preset and raw[(op, col, m)][1] is not None and p:
                        ov = cell_verdict(pa, pr, raw[(op, col, m)][1], dataset=col[0],
                                          flags=flags, preset=op)
                        other = bool(other) or ov.status == "agree"
                if not p:
                    v = (CellVerdict("not-scored", note="no published value (project addition)")
                         if ours else CellVerdict("not-run", note="not run"))
                else:
                    v = cell_verdict(pa, pr, ours, dataset=col[0], flags=flags, preset=preset,
                                     other_preset_agrees=other)
                cells.append({"column": col, "method": m, "pub": p, "ours": ours, "verdict": v,
                              "fedavg": m == "fedavg", "flags": flags,
                              "command": command(table, col[0], col[1], col[2], m)})
                pv = p.get("V", {}).get("value")
                excluded = "oracle" in flags or "unscored" in flags
                rank_rows.append({"method": m, "pub_V": None if excluded else pv,
                                  "our_V": None if excluded or ours is None else ours.V,
                                  "pub_collapsed": "collapse-by-A" in flags,
                                  "our_collapsed": bool(ours and ours.is_collapsed),
                                  "oracle": "oracle" in flags})
            ranks.append(column_rank(_col_name(col), rank_rows))
        out["presets"][preset] = {"cells": cells, "ranks": ranks}
    # criterion 1 over presets: the FedAvg row agrees in every printed column under one preset
    van: list[bool | None] = []
    for preset, d in out["presets"].items():
        fed = [c["verdict"] for c in d["cells"] if c["fedavg"] and c["pub"]]
        if not fed or any(v.status == "not-run" for v in fed):
            van.append(None)
        else:
            van.append(all(v.status in ("agree", "collapse-agree") for v in fed))
    vanilla = True if True in van else (None if None in van else False)
    for preset, d in out["presets"].items():
        d["verdict"] = table_verdict(d["cells"], d["ranks"], vanilla)
    return out


def _col_name(col: tuple[Any, ...]) -> str:
    return f"{NAMES.get(col[0], col[0])}, β = {col[1]:g}, Υ = {col[2]} %"


def _f(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _ours(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _row(c: dict[str, Any]) -> dict[str, str]:
    """One cell's printed fields (shared by Markdown, LaTeX and CSV)."""
    p, o, v = c["pub"], c["ours"], c["verdict"]
    txt = {k: p.get(k, {}).get("text", "") for k in ("A", "R", "V")}
    val = {k: p.get(k, {}).get("value") for k in ("A", "R", "V")}
    d = {k: ("" if o is None or val[k] is None else f"{getattr(o, k) - val[k]:+.2f}")
         for k in ("A", "R")}
    verdict = v.status + (f" ({v.cause})" if v.cause else "")
    return {"method": c["method"], "A pub": txt["A"], "A ours": _ours(o and o.A, o and o.s_A),
            "ΔA": d["A"], "R pub": txt["R"], "R ours": _ours(o and o.R, o and o.s_R),
            "ΔR": d["R"], "ASR": _f(o.ASR) if o else "–", "V pub": txt["V"],
            "V ours": _f(o.V) if o else "–", "n": str(o.n) if o else "0",
            "collapse": collapse_mark(o) + (" pub" if "collapse-by-A" in c["flags"] else ""),
            "degraded": "degraded" if o is not None and o.degraded else "",
            "verdict": verdict, "note": v.note}


def collapse_mark(o: Ours | None) -> str:
    """'†k/n' with H and max q beside it (docs/protocol.md §7.4), or '' for an unmarked cell."""
    if o is None or not o.collapsed:
        return ""
    hist = [f"{name} {value:.2f}" for name, value in (("H", o.entropy), ("max q", o.q_max))
            if value is not None]
    return f"†{o.collapsed}/{o.n}" + (f" ({', '.join(hist)})" if hist else "")


HEAD = ("method", "A pub", "A ours", "ΔA", "R pub", "R ours", "ΔR", "ASR", "V pub", "V ours",
        "n", "collapse", "degraded", "verdict", "note")


def _criteria_lines(tv: TableVerdict) -> list[str]:
    mark = {True: "yes", False: "no", None: "not yet"}
    lines = [f"- criterion {k}: {mark[v]}" for k, v in tv.criteria.items()]
    if tv.a_share is not None:
        lines.append(f"- scored cells agreeing: A {tv.a_share:.0f} %, R {tv.r_share:.0f} %")
    if tv.causes:
        lines.append("- causes of misses: " + ", ".join(f"{k} {n}" for k, n in
                                                         sorted(tv.causes.items())))
    return lines


def _rank_line(r: ColumnRank) -> str:
    tau = "n/a" if r.tau is None else f"{r.tau:.2f}"
    best = r.paper_best or "–"
    if best == "fdcr-oracle":  # the published FDCR row, ranked in the oracle run's place
        best += " (the published FDCR row, compared with the oracle run: docs/results.md §5.3)"
    return (f"Kendall τ (V) = {tau} over {r.n} methods; paper's best: {best}; "
            f"our top 3: {', '.join(r.our_top3) or '–'}")


def _title(table: str, preset: str) -> str:
    paper, num, kind = published.TABLES[table]
    return f"{paper} Table {num} ({kind}, {PRIORITY.get(table, '')}) — preset `{preset}`"


def render_markdown(built: dict[str, Any], preset: str) -> str:
    """A table and preset as Markdown: one block per column, the ranks, the verdict."""
    table, d = built["table"], built["presets"][preset]
    tv: TableVerdict = d["verdict"]
    lines = [f"# {_title(table, preset)}", "", f"**Verdict: {tv.verdict}** (docs/results.md)",
             ""] + _criteria_lines(tv)
    by_col: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in d["cells"]:
        by_col.setdefault(c["column"], []).append(c)
    for (col, cells), rank in zip(by_col.items(), d["ranks"]):
        lines += ["", f"## {_col_name(col)}", "", "| " + " | ".join(HEAD) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(HEAD) - 5) + ["---"] * 4) + "|"]
        for c in cells:
            row = _row(c)
            lines.append("| " + " | ".join(row[h].replace("|", "\\|") for h in HEAD) + " |")
        lines += ["", _rank_line(rank)]
        missing = [c for c in cells if c["verdict"].status == "not-run"]
        if missing:
            lines += ["", "Not run:", ""] + [f"- {c['method']}: `{c['command']}`"
                                             + (f" `--presets {preset}`" if preset != "paper"
                                                else "") for c in missing]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"),
                 ("#", "\\#"), ("±", "$\\pm$"), ("Δ", "$\\Delta$"), ("†", "$\\dagger$"),
                 ("β", "$\\beta$"), ("Υ", "$\\Upsilon$"), ("τ", "$\\tau$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def render_latex(built: dict[str, Any], preset: str) -> str:
    """A table and preset as LaTeX: one tabular per column (booktabs)."""
    table, d = built["table"], built["presets"][preset]
    head = HEAD[:-1]
    out = [f"% {_tex(_title(table, preset))}; verdict: {d['verdict'].verdict}"]
    by_col: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in d["cells"]:
        by_col.setdefault(c["column"], []).append(c)
    for (col, cells), rank in zip(by_col.items(), d["ranks"]):
        out += ["\\begin{table}[ht]", "\\centering\\small",
                f"\\caption{{{_tex(_title(table, preset))}: {_tex(_col_name(col))}. "
                f"{_tex(_rank_line(rank))}}}",
                "\\begin{tabular}{l" + "r" * (len(head) - 2) + "l}", "\\toprule",
                " & ".join(_tex(h) for h in head) + " \\\\", "\\midrule"]
        for c in cells:
            row = _row(c)
            out.append(" & ".join(_tex(row[h]) for h in head) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def write_csv(built: dict[str, Any], preset: str, path: Path) -> None:
    """One line per cell: the column, every printed field and the verdict's parts."""
    d = built["presets"][preset]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["table", "preset", "dataset", "beta", "upsilon", *HEAD, "cause", "command"])
        for c in d["cells"]:
            row = _row(c)
            w.writerow([built["table"], preset, *c["column"], *(row[h] for h in HEAD),
                        c["verdict"].cause or "", c["command"]])


def write_report(roots: list[str | Path], out: str | Path = DEFAULT_OUT, *, plots: str = "all",
                 formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Every regenerable table against ``roots``' runs, as MD, LaTeX, CSV, plus ``index.md``
    (the published tables' verdicts, then each results directory's own table and its plots)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    left_out: dict[str, int] = {}
    runs = collect_runs(roots, left_out)
    skipped = "".join(f" Left out: {n} ({why})." for why, n in sorted(left_out.items()))
    written, index = [], ["# Results against the published tables", "",
                          f"{len(runs)} runs of the published protocol read.{skipped} "
                          "Rules: docs/results.md.", "",
                          "| table | priority | preset | verdict | files |",
                          "|---|---|---|---|---|"]
    for table in PRIORITY:
        built = build(table, runs)
        for preset in built["presets"]:
            stem = f"{table}-{preset}"
            (out / f"{stem}.md").write_text(render_markdown(built, preset), encoding="utf-8")
            (out / f"{stem}.tex").write_text(render_latex(built, preset), encoding="utf-8")
            write_csv(built, preset, out / f"{stem}.csv")
            written += [out / f"{stem}.{x}" for x in ("md", "tex", "csv")]
            index.append(f"| {table} | {PRIORITY[table]} | {preset} | "
                         f"{built['presets'][preset]['verdict'].verdict} | "
                         f"[md]({stem}.md) [tex]({stem}.tex) [csv]({stem}.csv) |")
    index += ["", "SDFC Table 1 is qualitative: nothing to regenerate."]
    # the pictures show every run given, the published protocol's or not
    pictures = plots_hook([Path(r) for r in roots], out, kinds=plots, formats=formats)
    index += root_sections(roots, out)
    index += plot_section(pictures)
    (out / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    written.append(out / "index.md")
    return written + pictures


def root_sections(roots: Iterable[str | Path], out: Path) -> list[str]:
    """Per results directory: its README (linked), and its runs' table (mean ± std over seeds,
    the table ``fisherguard table DIR`` prints)."""
    import os

    from fisherguard.results import aggregate_seeds, failure_note, format_table

    lines: list[str] = []
    for root in map(Path, roots):
        summaries = collect_summaries(root)
        if not summaries:
            continue
        lines += ["", f"## {root.name}", ""]
        readme = root / "README.md"
        if readme.exists():
            lines += [f"How these runs were made and what they show: "
                      f"[{root.name}/README.md]({Path(os.path.relpath(readme, out)).as_posix()})."
                      , ""]
        lines.append(format_table(aggregate_seeds(summaries), markdown=True))
        note = failure_note(summaries)
        if note:
            lines += ["", note]
    return lines


def plot_section(pictures: list[Path]) -> list[str]:
    """Links to every plot written, one line per kind (the stem's first word)."""
    exts: dict[str, list[str]] = {}  # stem → its formats, stems in the order written
    for p in pictures:
        exts.setdefault(p.stem, []).append(p.suffix[1:])
    stems: dict[str, list[str]] = {}
    for stem in exts:
        exts[stem].sort()
        stems.setdefault(stem.split("-")[0], []).append(stem)
    if not stems:
        return []
    what = {"curves": "A and ASR per round", "detection": "detection TPR/FPR per round",
            "auc": "suspicion-score AUC/AP per round", "weights": "client weights per round",
            "matrix": "defenses × attacks heatmap"}
    lines = ["", "## Plots", ""]
    if "matrix" in stems:
        m = stems["matrix"][0]
        lines += [f"![defenses × attacks]({m}.{'svg' if 'svg' in exts[m] else exts[m][0]})", ""]
    for kind, names in stems.items():
        links = ", ".join(f"{n[len(kind) + 1:] or n} ("
                          + " ".join(f"[{e}]({n}.{e})" for e in exts[n]) + ")" for n in names)
        lines.append(f"- **{what.get(kind, kind)}**: {links}")
    return lines


def plots_hook(run_dirs: list[Path], out: Path, **options: Any) -> list[Path]:
    """Call ``fisherguard.report.plots.write_plots(run_dirs, out_dir, **options)`` when that
    module exists."""
    try:
        from fisherguard.report.plots import write_plots  # type: ignore[import-not-found]
    except ImportError:
        log.info("no fisherguard.report.plots; plots skipped")
        return []
    return list(write_plots(run_dirs, out, **options) or [])
