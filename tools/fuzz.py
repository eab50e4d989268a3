"""``make fuzz``: property-based fuzzing of every defense's ``aggregate`` (issue 19), with a table.

Runs ``tests/fuzz_defenses.py``'s hostile-round strategy ``--examples`` times per defense (default
1,000; hypothesis adds its shrinking runs after a failure) and prints, per defense: cases run,
rounds aggregated, documented rejections (a documented exception), rounds where no upload was
valid, failures, and the first failure's message. Exits 1 when any defense failed.

    python tools/fuzz.py [--examples N] [--seed S] [defense ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import fuzz_defenses as fz  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("defenses", nargs="*", help="defense names (default: all registered)")
    ap.add_argument("--examples", type=int, default=1000, help="hypothesis examples per defense")
    ap.add_argument("--random", action="store_true",
                    help="fresh random examples (default: hypothesis's derandomized, repeatable)")
    args = ap.parse_args(argv)
    names = args.defenses or fz.NAMES
    unknown = sorted(set(names) - set(fz.NAMES))
    if unknown:
        ap.error(f"unknown defense(s) {', '.join(unknown)}; available: {', '.join(fz.NAMES)}")
    head = f"{'defense':<14} {'cases':>6} {'rounds':>7} {'documented':>10} {'all-invalid':>11} {'failures':>8} {'s':>7}"
    print(f"fuzzing aggregate with {args.examples} hostile cases per defense"
          f" ({'random' if args.random else 'derandomized'})", flush=True)
    print(head)
    print("-" * len(head), flush=True)
    failed: list[tuple[str, str]] = []
    totals = fz.Stats()
    for name in names:
        stats, t0 = fz.Stats(), time.perf_counter()
        try:
            fz.fuzz(name, args.examples, derandomize=not args.random, stats=stats)
        except Exception as e:  # noqa: BLE001 - a failure is reported, not raised
            stats.failures = 1
            stats.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed.append((name, stats.failure))
        for f in ("cases", "rounds", "documented", "all_rejected", "failures"):
            setattr(totals, f, getattr(totals, f) + getattr(stats, f))
        print(f"{name:<14} {stats.cases:>6} {stats.rounds:>7} {stats.documented:>10} "
              f"{stats.all_rejected:>11} {stats.failures:>8} {time.perf_counter() - t0:>7.1f}",
              flush=True)
    print("-" * len(head))
    print(f"{'total':<14} {totals.cases:>6} {totals.rounds:>7} {totals.documented:>10} "
          f"{totals.all_rejected:>11} {totals.failures:>8}")
    for name, msg in failed:
        print(f"FAILED {name}: {msg[:400]}")
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
