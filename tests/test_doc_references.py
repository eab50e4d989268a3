"""Every "§" reference in src/**/*.py points at a section that exists in docs/.

A reference has the canonical form ``docs/<file>.md §N.M`` or, for a range,
``docs/<file>.md §N–§M``; docs/<file>.md must have a Markdown heading carrying that number
("## 4. Federation", "### 4.2 Optimiser"), for both ends of a range. The only other "§" allowed
is a paper's own section, written after the paper ("Blanchard et al. 2017, §4", "FDCR §3.3").
``rewrite_refs.py`` brings references into this form.

Run from the root of a checkout (or set FISHERGUARD_ROOT to it):

    python -m pytest path/to/test_doc_references.py
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SEC = r"\d+(?:\.\d+)*"
CANONICAL = re.compile(rf"docs/(?P<file>[a-z][a-z-]*)\.md §(?P<a>{SEC})(?:–§(?P<b>{SEC}))?")
PAPER = re.compile(rf"(?:\bet al\.,? \d{{4}}[a-z]?,\s*|\b(?:FDCR|SDFC)(?: paper)? |\bpaper )§{SEC}")
HEADING = re.compile(rf"^#{{1,6}}\s+(?P<sec>{SEC})\.?(?:\s|$)", re.M)


def _root() -> Path:
    env = os.environ.get("FISHERGUARD_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent
    if here.name == "tests" and (here.parent / "src").is_dir():
        return here.parent
    return Path.cwd().resolve()


ROOT = _root()
SOURCES = sorted((ROOT / "src").rglob("*.py"))


@lru_cache(maxsize=None)
def headings(doc: str) -> frozenset[str] | None:
    path = ROOT / "docs" / f"{doc}.md"
    if not path.is_file():
        return None
    return frozenset(m.group("sec") for m in HEADING.finditer(path.read_text(encoding="utf-8")))


def _key(sec: str) -> tuple[int, ...]:
    return tuple(int(x) for x in sec.split("."))


def problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT)

    def line(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    covered: set[int] = set()
    out: list[str] = []
    for m in CANONICAL.finditer(text):
        covered.update(i for i in range(m.start(), m.end()) if text[i] == "§")
        doc, a, b = m.group("file"), m.group("a"), m.group("b")
        secs = headings(doc)
        where = f"{rel}:{line(m.start())}: {m.group(0)}"
        if secs is None:
            out.append(f"{where}: docs/{doc}.md does not exist")
            continue
        for end in (a, b) if b else (a,):
            if end not in secs:
                out.append(f"{where}: docs/{doc}.md has no heading numbered {end}")
        if b and _key(b) <= _key(a):
            out.append(f"{where}: the range does not run forwards")
    for m in PAPER.finditer(text):
        covered.update(i for i in range(m.start(), m.end()) if text[i] == "§")
    for i, ch in enumerate(text):
        if ch == "§" and i not in covered:
            snippet = text[max(0, i - 30):i + 12].replace("\n", " ")
            out.append(f"{rel}:{line(i)}: not in the form 'docs/<file>.md §N': …{snippet}…")
    return out


def test_there_are_sources() -> None:
    assert SOURCES, f"no src/**/*.py below {ROOT} (run from a checkout root or set FISHERGUARD_ROOT)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT / "src")))
def test_section_references_point_into_docs(path: Path) -> None:
    found = problems(path)
    assert not found, "\n".join(found)
