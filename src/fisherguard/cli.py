"""The ``fisherguard`` command line; ``main`` builds the parser, whose description lists every
subcommand (``fisherguard --help``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from fisherguard import __version__


def _cmd_run(args: argparse.Namespace) -> int:
    from fisherguard import config
    from fisherguard.engine.runner import run_all
    from fisherguard.results import RunInUse, aggregate_seeds, failure_note, format_table

    sets = list(args.set) + ([f"runtime.engine={args.engine}"] if args.engine else [])
    variants = config.load(args.config, sets)
    if args.only:
        wanted = [x.strip() for x in ",".join(args.only).split(",") if x.strip()]
        labels = [v.label for v in variants]
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise config.ConfigError(f"--only: no variant labelled {missing[0]!r}; labels: {', '.join(labels)}")
        by_label = {v.label: v for v in variants}
        variants = [by_label[w] for w in dict.fromkeys(wanted)]  # in the order asked
    seeds = _parse_seeds(args.seeds) if args.seeds else None
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    failed: list[str] = []
    busy: list[str] = []

    def report(label: str, seed: int | None, err: Exception) -> None:
        what = f"{label}" + (f" seed {seed}" if seed is not None else "")
        if isinstance(err, RunInUse):  # another process runs it: the campaign is shared, not broken
            busy.append(what)
            print(f"fisherguard: skipped {what}: {err}", file=sys.stderr)
            return
        failed.append(f"{what}: {type(err).__name__}: {err}")
        print(f"fisherguard: run failed, going on: {failed[-1]}", file=sys.stderr)

    with _engine_options(args):
        summaries = run_all(variants, out, resume=args.resume, seeds=seeds,
                            progress=None if args.quiet else sys.stderr,
                            on_error=report if args.keep_going else None)
    if summaries:
        print(format_table(aggregate_seeds(summaries) if seeds else summaries))
    note = failure_note(summaries)
    if note:
        print(f"\n{note}")
    print(f"\nresults: {out}")
    if busy:
        print(f"\n{len(busy)} runs skipped, another process is writing them: {', '.join(busy)}",
              file=sys.stderr)
    if failed:
        print(f"\n{len(failed)} of {len(failed) + len(busy) + len(summaries)} runs failed (--resume retries "
              "them):\n" + "\n".join(f"  {f}" for f in failed), file=sys.stderr)
        return 1
    return 0


def _engine_options(args: argparse.Namespace) -> Any:
    """Flower runtime settings from the flags (a no-op context for the in-process engine)."""
    from fisherguard.config import ConfigError

    flower = (args.min_replies, args.round_timeout)
    if all(v is None for v in flower):
        return contextlib.nullcontext()
    if args.min_replies is not None and args.min_replies < 1:
        raise ConfigError(f"--min-replies must be >= 1, got {args.min_replies}")
    if args.round_timeout is not None and not args.round_timeout > 0:
        raise ConfigError(f"--round-timeout must be > 0 seconds, got {args.round_timeout}")
    from fisherguard.engine.flower.launch import options

    return options(min_replies=args.min_replies, round_timeout=args.round_timeout)


def _parse_seeds(text: str) -> list[int]:
    from fisherguard.config import ConfigError

    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated non-negative integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct non-negative integers, got {text!r}")
    return seeds


def _cmd_table(args: argparse.Namespace) -> int:
    from fisherguard.config import ConfigError
    from fisherguard.results import (RECORD_METRICS, MatrixOrder, MixedRunsError,
                                     aggregate_seeds, collect_summaries, failure_note,
                                     format_table, pivot)

    summaries = collect_summaries(args.dir)
    if args.seeds:  # e.g. a seed's own table while the next seed is still running
        wanted = _parse_seeds(args.seeds)
        summaries = [s for s in summaries if s.get("seed") in wanted]
        if not summaries:
            raise ConfigError(f"--seeds: no run of seed {args.seeds} below {args.dir}")
    if args.order and not args.by:
        raise ConfigError("--order needs --by (it orders a matrix table)")
    if args.by:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        # a misspelt metric would otherwise print a column of "–", as a metric the runs lack, and
        # a text field would fail in pivot's float() as if --defenses were wrong; None is a
        # metric a run could not score (ASR_edge without edge-case data)
        known = {k for s in summaries for k, v in s.items()
                 if not k.startswith("_") and (v is None or isinstance(v, (int, float)))}
        known |= set(RECORD_METRICS)
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ConfigError(f"--metrics: no run below {args.dir} has {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        order = None
        if args.order:
            try:
                order = MatrixOrder.from_configs(_csv(args.order) or [])
            except ValueError as e:
                raise ConfigError(f"--order: {e}") from None
        try:
            text = pivot(summaries, rows=args.by,
                         cols="column" if args.by == "row" else "defense", metrics=metrics,
                         markdown=args.markdown, only=_csv(args.defenses), order=order,
                         compact=args.compact)
        except MixedRunsError:
            raise
        except ValueError as e:
            raise ConfigError(f"--defenses: {e}") from None
        print(text)
    else:
        print(format_table(aggregate_seeds(summaries)))
    note = failure_note(summaries)
    if note:
        print(f"\n{note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fisherguard.config import ConfigError
    from fisherguard.results import export_runs

    done, skipped = export_runs(args.runs, args.dest)
    for p in done:
        print(f"exported {p}")
    for p in skipped:
        print(f"skipped {p} (not finished)")
    if not done and not skipped:
        raise ConfigError(f"no run directories below {args.runs}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fisherguard.report.tables import DEFAULT_OUT, write_report

    out = Path(args.out) if args.out else DEFAULT_OUT
    written = write_report(args.results, out, plots=args.plots,
                           formats=tuple(_csv(args.formats) or ()))
    print(f"wrote {len(written)} files to {out} (index: {out / 'index.md'})")
    return 0


def _csv(text: str | None, kind: type = str, flag: str = "") -> list[Any] | None:
    from fisherguard.config import ConfigError

    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()] if text else None
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, "values")
        raise ConfigError(f"{flag} expects comma-separated {what}, got {text!r}"
                          + (" (Υ in percent, e.g. 30)" if flag == "--upsilons" else "")) from None


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from fisherguard.config import parse_override
    from fisherguard.report import reproduce

    runs = reproduce.plan(args.table, datasets=_csv(args.datasets), methods=_csv(args.methods),
                          betas=_csv(args.betas, float, "--betas"),
                          upsilons=_csv(args.upsilons, int, "--upsilons"),
                          seeds=_parse_seeds(args.seeds), presets=_csv(args.presets) or ["paper"],
                          scale=args.scale, out=args.out,
                          overrides=[parse_override(o) for o in args.set])
    if args.dry_run:
        print(reproduce.describe(runs))
        return 0
    counts = reproduce.execute(runs, jobs=args.jobs, resume=args.resume)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; runs in {args.out}")
    return 1 if counts["failed"] else 0


def _cmd_matrix(args: argparse.Namespace) -> int:
    from fisherguard.config import parse_override
    from fisherguard.report import matrix, reproduce
    from fisherguard.results import collect_summaries, pivot

    runs = matrix.plan(attacks_=_csv(args.attacks), defenses_=_csv(args.defenses),
                       seeds=_parse_seeds(args.seeds), out=args.out,
                       overrides=[parse_override(o) for o in args.set])
    print(f"protocol: {matrix.protocol_text(runs)}")
    if args.dry_run:
        print(reproduce.describe(runs))
        return 0
    counts = reproduce.execute(runs, jobs=args.jobs, resume=args.resume)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; runs in {args.out}")
    done = [r for r in runs if r.status == "done"]
    if done:
        summaries = [s for r in done for s in collect_summaries(r.path)]
        order = list(dict.fromkeys(r.method for r in done))
        print(pivot(summaries, rows="attack", cols="defense", only=order))
        from fisherguard.report.plots import plot_matrix

        for p in plot_matrix(summaries, Path(args.out)):
            print(f"wrote {p}")
    return 1 if counts["failed"] else 0


def _grid_flags(p: argparse.ArgumentParser, out: str) -> None:
    """The flags of a command that runs a grid of keyed runs (reproduce, matrix)."""
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--resume", action="store_true", help="continue partial runs")
    p.add_argument("--out", default=out, help=f"default {out}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of every run (changes the run keys)")


def _cmd_presets(args: argparse.Namespace) -> int:
    """Every value that the `paper` and `code` presets resolve differently for a config."""
    import yaml

    from fisherguard import config

    path = Path(args.config)
    if not path.is_file():
        raise config.ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise config.ConfigError("a config must be a mapping of sections")
    sets = [config.parse_override(o) for o in args.set]
    base = config.apply_overrides({k: v for k, v in raw.items() if k not in ("variants", "matrix")},
                                  sets)
    specs = raw.get("variants")
    if raw.get("matrix") is not None:
        specs = config.matrix_variants(raw["matrix"])
    todo = [("", base)] if not specs else [
        (str(s.get("label")), config.apply_overrides(config.apply_overrides(base, s.get("set") or {}),
                                                     sets)) for s in specs]
    blocks = []
    for label, one in todo:
        cfg = config.resolve(one)
        title = (f"{label + ': ' if label else ''}{cfg.data.dataset}, family {cfg.experiment.family}, "
                 f"defense {cfg.defense.name}")
        blocks.append(config.format_preset_differences(config.preset_differences(one), title))
    print("\n\n".join(blocks))
    return 0


def _cmd_defenses(args: argparse.Namespace) -> int:
    from fisherguard.defenses import registry

    rows = registry.available()
    width = max(len(n) for n in rows)
    for name, cls in rows.items():
        needs = [w for w, on in (("Fisher", cls.needs_fisher), ("server data", cls.needs_server_data),
                                 (f"client {cls.client_regulariser}", bool(cls.client_regulariser)))
                 if on]
        extra = f"  [needs {', '.join(needs)}]" if needs else ""
        print(f"{name.ljust(width)}  {cls.summary}  ({cls.paper}){extra}")
    return 0


def _cmd_attacks(args: argparse.Namespace) -> int:
    from fisherguard.attacks import registry

    rows = registry.available()
    width = max(len(n) for n in rows)
    for name, cls in rows.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.options().items())
        paper = f"  ({cls.paper})" if cls.paper else ""
        print(f"{name.ljust(width)}  {cls.summary}{paper}")
        print(f"{' ' * width}  class: {cls.kind}; knowledge: {cls.knowledge}"
              f"{'; trains one by one' if cls.per_client else ''}"
              f"{'; defaults: ' + opts if opts else ''}")
    print("\ncompose stages with '+', e.g. attack: {name: badnets+pgd, options: {pgd: {...}}}; "
          "schedule: multi-shot | single-shot | window | every")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from fisherguard.data.datasets import DATASETS, verify
    from fisherguard.data.fetching import fetch

    if args.data_cmd == "list":
        for name, desc in DATASETS.items():
            print(f"{name:14s} {desc}")
        return 0
    if args.data_cmd == "fetch":
        path = fetch(args.name, args.data_dir)
        print(f"{args.name}: ready in {path}")
        return 0
    report = verify(args.name, args.data_dir)
    for k, v in report.items():
        print(f"{k}: {v}")
    return 0


def _cmd_flower_check(args: argparse.Namespace) -> int:
    from fisherguard.engine.flower.server_app import check_run_config

    for line in check_run_config(args.run_config):
        print(line)
    return 0


def _cmd_flower_keys(args: argparse.Namespace) -> int:
    from fisherguard.engine.flower.keys import make_keys

    if args.nodes < 0:
        raise ValueError(f"--nodes must be >= 0, got {args.nodes}")
    hosts = tuple(args.host) if args.host else ("127.0.0.1", "localhost")
    k = make_keys(args.dir, args.nodes, hosts=hosts, days=args.days)
    d = k.directory
    print(f"wrote in {d}: ca.crt (CA certificate; its key is not kept), server.pem + server.key "
          f"(SuperLink, for {', '.join(hosts)}; valid {args.days} days)"
          + (f", {args.nodes} SuperNode key pairs node-0..node-{args.nodes - 1} (+ .pub)"
             if args.nodes else ""))
    print(f"SuperLink:  flower-superlink --ssl-ca-certfile {d}/ca.crt --ssl-certfile {d}/server.pem "
          f"--ssl-keyfile {d}/server.key --enable-supernode-auth ...")
    print(f"connection: root-certificates = \"{d.resolve()}/ca.crt\"  (in $FLWR_HOME/config.toml)")
    if args.nodes:
        print(f"register:   flwr supernode register {d}/node-0.pub CONNECTION  (each node's .pub)")
        print(f"SuperNode:  flower-supernode --root-certificates {d}/ca.crt "
              f"--auth-supernode-private-key {d}/node-0 --superlink HOST:PORT ...")
    return 0


DESCRIPTION = ("Fisher-information defenses against backdoor attacks in federated learning: run "
               "experiments, tabulate and report their results, fetch datasets.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (plain-text help: no reST markup)."""
    parser = argparse.ArgumentParser(prog="fisherguard", description=DESCRIPTION,
                                     epilog="fisherguard COMMAND --help shows a command's options.")
    parser.add_argument("--version", action="version", version=f"fisherguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the experiment(s) of a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set federation.rounds=5 (repeatable)")
    p.add_argument("--out", help="results directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last round")
    p.add_argument("--only", action="append", metavar="LABEL",
                   help="run only these variants (comma-separated labels; repeatable)")
    p.add_argument("--keep-going", action="store_true",
                   help="when a run fails, report it and start the next (exit status 1 at the end); "
                   "a run another process is writing is skipped (so one campaign can be run by "
                   "several processes at once)")
    p.add_argument("--seeds", help="run every variant once per seed, e.g. 0,1,2; the table shows "
                   "mean ± std over seeds")
    p.add_argument("--engine", choices=("inprocess", "flower-sim"),
                   help="inprocess (default) or Flower's simulation engine (needs "
                   "fisherguard[flower]); sets runtime.engine")
    p.add_argument("--min-replies", type=int, metavar="N",
                   help="Flower: stop with a clear message when fewer clients reply in a round "
                   "(default 1)")
    p.add_argument("--round-timeout", type=float, metavar="S",
                   help="Flower: seconds a round waits for replies (default 600)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("table", help="print the table of the run summaries below a directory")
    p.add_argument("dir")
    p.add_argument("--by", choices=("attack", "row", "dataset", "beta", "attack_fraction"),
                   help="one line per value of this key, one A/ASR column pair per defense "
                        "(mean over seeds, † = a run collapsed, s = mean wall time per run); "
                        "row: a matrix config's rows × its columns (labels 'row | column')")
    p.add_argument("--metrics", default="A,ASR",
                   help="with --by: the summary metrics per defense (default A,ASR; e.g. "
                        "A,ASR,ASR_edge,attacker_share; AUC,AP: mean per-round ranking of the "
                        "defense's suspicion score, AUC_rounds: rounds where it is defined; from the round "
                        "records: att_refused, ben_refused = %% of attacker / benign client-rounds "
                        "at weight 0, fired = the reasons and clipped counts on each)")
    p.add_argument("--defenses", help="with --by: these defense (or matrix column) columns, in "
                        "this order (comma-separated)")
    p.add_argument("--markdown", action="store_true", help="with --by: a Markdown table")
    p.add_argument("--compact", action="store_true",
                   help="with --by: one cell per column, its metrics joined by ' / ' (one "
                        "decimal), no wall times; '(k seeds)' where a cell has fewer seeds")
    p.add_argument("--seeds", help="only the runs of these seeds (comma-separated), e.g. 1: one "
                   "seed's table beside the mean")
    p.add_argument("--order", metavar="CONFIG[,CONFIG]",
                   help="with --by: rows and columns in these matrix configs' order (others "
                        "after, as found); their excluded cells show excl., with why below")
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("export", help="copy finished runs' evidence (config, summary, partition, "
                       "defense, gzip'd round records; no checkpoints) to a results directory")
    p.add_argument("runs", help="a directory of run directories (e.g. runs/attacks-demo)")
    p.add_argument("dest", help="where to put them (e.g. results/attacks-demo)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="our runs beside the published tables, with verdicts "
                       "(Markdown, LaTeX, CSV; docs/results.md)")
    p.add_argument("results", nargs="+", help="directories holding run directories")
    p.add_argument("--out", help="where the tables go (default results/report)")
    p.add_argument("--plots", choices=("all", "overview", "none"), default="all",
                   help="overview leaves out the per-run client-weight heatmaps (default all)")
    p.add_argument("--formats", default="png,svg", help="plot formats: png, svg or png,svg")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("reproduce", help="plan and run the grid of a published table once "
                       "(docs/results.md)")
    p.add_argument("table", help="sdfc-t2 ... sdfc-t5, fdcr-t1 ... fdcr-t4 (P0: fdcr-t4, fdcr-t3, "
                   "sdfc-t5, sdfc-t3)")
    p.add_argument("--datasets", help="comma-separated subset (e.g. usps,cifar10)")
    p.add_argument("--methods", help="comma-separated method ids (docs/results.md), e.g. fdcr,rlr")
    p.add_argument("--betas", help="comma-separated β subset")
    p.add_argument("--upsilons", help="comma-separated Υ subset in percent")
    p.add_argument("--seeds", default="0,1,2", help="default 0,1,2")
    p.add_argument("--presets", default="paper", help="paper, code or paper,code")
    p.add_argument("--scale", choices=("full", "reduced"), default="full",
                   help="full: the papers' T and E; reduced: T 20, E 2")
    _grid_flags(p, "runs/reproduce")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("matrix", help="every defense against every attack on the budget "
                       "protocol of docs/results.md §6 (USPS, E = 2, T = 20), then the A/ASR table "
                       "and heatmap")
    p.add_argument("--attacks", help="comma-separated subset (as the matrix names them, e.g. "
                                     "badnets,badnets+pgd,alie)")
    p.add_argument("--defenses", help="comma-separated subset, e.g. fedavg,fdcr,sdfc")
    p.add_argument("--seeds", default="0", help="default 0")
    _grid_flags(p, "runs/matrix")
    p.set_defaults(func=_cmd_matrix)

    p = sub.add_parser("presets", help="every value that the paper and code presets resolve "
                       "differently for a config (docs/protocol.md §8)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value first, e.g. --set defense=sdfc (repeatable)")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("defenses", help="list every available defense")
    p.set_defaults(func=_cmd_defenses)

    p = sub.add_parser("attacks", help="list every available attack")
    p.set_defaults(func=_cmd_attacks)

    p = sub.add_parser("data", help="fetch, verify or list datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    for name, hlp in (("fetch", "fetch a dataset into the data root"),
                      ("verify", "check a dataset's files and checksums")):
        q = dsub.add_parser(name, help=hlp)
        q.add_argument("name")
        q.add_argument("--data-dir", help="data root (default FISHERGUARD_DATA or the user cache)")
    dsub.add_parser("list", help="list the datasets")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("flower-check", help="check a Flower deployment's run config (data, "
                       "results directory, nodes needed) before flwr run; exit 2 if it is bad")
    p.add_argument("run_config", help="the string given to flwr run --run-config, e.g. "
                   "'config=\"/abs/c.yaml\" set=\"defense=fdcr\"' (or a .toml file)")
    p.set_defaults(func=_cmd_flower_check)

    p = sub.add_parser("flower-keys", help="make a throw-away CA, a SuperLink TLS certificate and "
                       "SuperNode key pairs for a Flower deployment (README, \"Running on Flower\")")
    p.add_argument("dir", help="directory to write into (created; existing files are never "
                   "overwritten)")
    p.add_argument("--nodes", type=int, default=0, metavar="N",
                   help="SuperNode key pairs node-0..node-N-1 to make (default 0)")
    p.add_argument("--host", action="append", metavar="ADDR",
                   help="an IP address or DNS name the SuperLink is reached at, for its "
                   "certificate (repeatable; default 127.0.0.1 and localhost)")
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.set_defaults(func=_cmd_flower_keys)

    parser.description = f"{DESCRIPTION} Commands: {', '.join(sub.choices)}."
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from fisherguard.attacks.base import AttackConfigError
    from fisherguard.config import ConfigError
    from fisherguard.data.partition import PartitionError
    from fisherguard.defenses.base import DefenseConfigError
    from fisherguard.report.reproduce import PlanError
    from fisherguard.results import ResumeError

    from fisherguard.engine.flower import FlowerMissing
    from fisherguard.engine.flower.launch import FlowerRunError

    known: tuple[type[BaseException], ...] = (ConfigError, DefenseConfigError, AttackConfigError,
                                              PartitionError,
                                              ResumeError, OSError, ValueError, FlowerMissing,
                                              FlowerRunError, PlanError)
    try:
        return int(args.func(args))
    except known as e:
        if args.verbose:
            raise
        print(f"fisherguard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C, or SIGHUP / SIGTERM during a Flower run (launch.Stopped): every process the run
        # started has been stopped by now; after SIGHUP the terminal may be gone
        signum = getattr(e, "signum", signal.SIGINT)
        with contextlib.suppress(OSError):
            print(f"\nfisherguard: {e or 'interrupted'}; finished rounds are saved (use --resume)",
                  file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
