"""Regenerate src/fisherguard/report/published.json from the spec's published-tables.md.

    python tools/parse_published.py [SPEC] [--check]

SPEC defaults to ../shared/spec/published-tables.md beside the project root; --check compares
instead of writing (exit 1 on a difference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fisherguard.report.published import DATA_FILE, dumps, parse_spec  # noqa: E402

OUT = ROOT / "src" / "fisherguard" / "report" / DATA_FILE
SPEC = ROOT.parent / "shared" / "spec" / "published-tables.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=str(SPEC))
    ap.add_argument("--check", action="store_true", help="compare with the shipped file only")
    args = ap.parse_args()
    data = parse_spec(Path(args.spec).read_text(encoding="utf-8"))
    text = dumps(data)
    n = sum(data["tables"].values())
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{'same' if same else 'DIFFERENT'}: {len(data['tables'])} tables, {n} rows, "
              f"{len(data['cells'])} cells")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data['tables'])} tables, {n} rows, "
          f"{len(data['cells'])} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
