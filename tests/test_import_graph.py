"""Import structure: no cycle between modules, and every room imports only lower layers.

The layers are docs/architecture.md §2's; the checker lives in ``import_graph.py`` beside this
file (module- and function-level imports alike, so a lazy import cannot hide a cycle).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from import_graph import cycles, import_graph, room_of, rooms, within

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SRC)


# --------------------------------------------------------------------------- the data room


def test_data_modules_import_no_cycle(graph):
    data = within(graph, "fisherguard.data")
    assert "fisherguard.data.formats" in data and "fisherguard.data" in data
    assert cycles(data) == [], f"import cycles inside fisherguard.data: {cycles(data)}"


def test_data_layers(graph):
    """errors is the bottom; the readers need only it, never the lookup or fetch code."""
    assert graph["fisherguard.data.errors"] == set()
    assert graph["fisherguard.data.catalogue"] == set()
    assert graph["fisherguard.data.formats"] == {"fisherguard.data.errors"}


def test_data_room_imports_no_other_room_but_seeding(graph):
    # Today it imports no other room at all; fisherguard.seeding is the one room it may use.
    others = rooms(graph)["fisherguard.data"]
    assert others <= {"fisherguard.seeding"}, f"fisherguard.data imports {sorted(others)}"


# --------------------------------------------------------------------------- every room

# docs/architecture.md §2, lowest first: a room imports only rooms of strictly lower layers
LAYERS = [
    {"fisherguard", "fisherguard.seeding", "fisherguard.allocator", "fisherguard.models",
     "fisherguard.data", "fisherguard.results", "fisherguard.metrics"},
    {"fisherguard.sampling"},  # the round's clients, from a named stream of seeding
    {"fisherguard.fisher"},
    {"fisherguard.clients"},
    {"fisherguard.defenses", "fisherguard.attacks"},
    {"fisherguard.config"},
    # report reads results and config and runs the engine only as `fisherguard run` subprocesses,
    # so it needs nothing of the engine and sits beside it, below the CLI that calls it
    {"fisherguard.engine", "fisherguard.report"},
    {"fisherguard.cli"},
    {"fisherguard.__main__"},
]


def test_no_module_imports_in_a_cycle(graph):
    assert cycles(graph) == [], f"import cycles: {cycles(graph)}"


def test_every_room_has_a_layer(graph):
    placed = set().union(*LAYERS)
    assert set(rooms(graph)) == placed, f"rooms without a layer: {set(rooms(graph)) - placed}"


def test_rooms_import_only_lower_layers(graph):
    layer = {room: i for i, rs in enumerate(LAYERS) for room in rs}
    wrong = sorted((a, b) for a, bs in rooms(graph).items() for b in bs if layer[b] >= layer[a])
    assert wrong == [], f"imports of a room at the same or a higher layer: {wrong}"


# --------------------------------------------------------------------------- the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    """Write a throwaway ``fisherguard`` package under ``root/src``; returns the src dir."""
    src = root / "src"
    for rel, text in files.items():
        path = src / "fisherguard" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_checker_reads_every_kind_of_import(tmp_path):
    src = _package(tmp_path, {
        "__init__.py": "__version__ = '0'\n",
        "config.py": "import yaml\n",
        "seeding.py": "",
        "data/__init__.py": "from .a import f\nfrom . import b\n",
        "data/a.py": "from fisherguard import config\nfrom fisherguard import __version__\n"
                     "def f():\n    from .b import g\n    import fisherguard.seeding as s\n",
        "data/b.py": "from ..config import X\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from .a import f\n",
        "data/c.py": "from . import *\nfrom fisherguard.data.c import nothing\n",
    })
    g = import_graph(src)
    assert g["fisherguard.data"] == {"fisherguard.data.a", "fisherguard.data.b"}
    assert g["fisherguard.data.a"] == {"fisherguard.config", "fisherguard", "fisherguard.data.b",
                                       "fisherguard.seeding"}
    assert g["fisherguard.data.b"] == {"fisherguard.config", "fisherguard.data.a"}
    assert g["fisherguard.data.c"] == {"fisherguard.data"}  # the self-import is dropped
    assert g["fisherguard.config"] == set() and g["fisherguard.seeding"] == set()
    assert import_graph(src, type_checking=False)["fisherguard.data.b"] == {"fisherguard.config"}

    assert cycles(g) == [["fisherguard.data.a", "fisherguard.data.b"]]
    assert cycles(import_graph(src, type_checking=False)) == []
    assert rooms(g) == {"fisherguard": set(), "fisherguard.config": set(), "fisherguard.seeding": set(),
                        "fisherguard.data": {"fisherguard", "fisherguard.config", "fisherguard.seeding"}}
    assert room_of("fisherguard.data.a") == "fisherguard.data" and room_of("fisherguard") == "fisherguard"
    assert set(within(g, "fisherguard.data")) == {"fisherguard.data", "fisherguard.data.a",
                                                  "fisherguard.data.b", "fisherguard.data.c"}


def test_cycles_finds_every_component():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d", "e"}, "e": {"f"}, "f": {"e"}, "g": set()}
    assert cycles(g) == [["a", "b", "c"], ["e", "f"]]
