"""The fisherguard package's import graph, read from the source with :mod:`ast` (nothing is imported).

* :func:`import_graph` maps every module of the package to the package modules it imports.
* :func:`rooms` collapses that graph to rooms: ``fisherguard.data.*`` becomes ``fisherguard.data``,
  ``fisherguard.config`` stays ``fisherguard.config``.
* :func:`within` keeps the modules of one room; :func:`cycles` lists the import cycles of a graph.

What counts as an import of module ``M`` by module ``A``:

* ``import fisherguard.x.y`` anywhere in ``A``: at module level, inside functions and classes,
  under ``try`` or ``if`` (``if TYPE_CHECKING:`` too, unless ``type_checking=False``): an import
  deferred into a function still ties ``A`` to ``M`` and still closes a cycle.
* ``from fisherguard.x import y`` and the relative ``from .x import y``: the edge goes to
  ``fisherguard.x.y`` when that is a module (``from fisherguard import config`` imports
  ``fisherguard.config``), else to ``fisherguard.x``.

Not counted: the parent packages Python initialises on the way (``import fisherguard.data.formats``
runs ``fisherguard/data/__init__.py`` first; counting that would make every package's re-exports
a cycle), a module importing itself, imports outside the package, and imports built at run time
(``importlib.import_module(f"...")``), which no static reading can see.
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["module_files", "import_graph", "room_of", "rooms", "within", "cycles"]

PACKAGE = "fisherguard"

Graph = dict[str, set[str]]


def module_files(src_dir: str | Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` under ``src_dir``: dotted name -> file (a package -> its ``__init__.py``)."""
    src = Path(src_dir)
    out: dict[str, Path] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an ``if`` test is ``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_checking: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module at any depth, optionally skipping ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch runs; the body never does
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _known_prefix(name: str, modules: set[str]) -> str | None:
    """The longest dotted prefix of ``name`` (itself included) that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
             modules: set[str], package: str) -> set[str]:
    """The package modules one import statement of ``importer`` imports."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
        return {t for t in (_known_prefix(n, modules) for n in named if _in_package(n, package)) if t}
    if node.level:  # relative: ``.`` is the importer's package, each further dot one level up
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if not _in_package(origin, package):
        return set()
    out = set()
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        target = submodule if submodule in modules else _known_prefix(origin, modules)
        if target:
            out.add(target)
    return out


def _in_package(name: str, package: str) -> bool:
    """Whether a dotted name is the package or inside it."""
    return name == package or name.startswith(package + ".")


def import_graph(src_dir: str | Path, package: str = PACKAGE, *, type_checking: bool = True) -> Graph:
    """``{module: {package modules it imports}}`` for every module of ``package`` under ``src_dir``.

    Module-level and function-level imports, absolute and relative, all count (see the module
    docstring); ``type_checking=False`` leaves out imports under ``if TYPE_CHECKING:``.  Every
    module is a key, also one that imports nothing of the package.
    """
    files = module_files(src_dir, package)
    modules = set(files)
    graph: Graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _import_nodes(tree, type_checking):
            deps |= _targets(node, name, is_package, modules, package)
        deps.discard(name)  # a module importing itself (or its own names) is no dependency
        graph[name] = deps
    return graph


def room_of(module: str, depth: int = 2) -> str:
    """The room of a module: its first ``depth`` dotted parts (``fisherguard.data.formats`` -> ``fisherguard.data``)."""
    return ".".join(module.split(".")[:depth])


def rooms(graph: Graph, depth: int = 2) -> Graph:
    """The graph between rooms: an edge where some module of one room imports a module of another.

    Imports inside a room vanish; every room of the graph is a key.
    """
    out: Graph = {}
    for module, deps in graph.items():
        room = room_of(module, depth)
        targets = out.setdefault(room, set())
        targets.update(r for r in (room_of(d, depth) for d in deps) if r != room)
    return out


def within(graph: Graph, room: str) -> Graph:
    """The subgraph of the modules in ``room`` (the room's package and everything below it)."""
    def inside(m: str) -> bool:
        return m == room or m.startswith(room + ".")

    return {m: {d for d in deps if inside(d)} for m, deps in graph.items() if inside(m)}


def cycles(graph: Graph) -> list[list[str]]:
    """The import cycles: strongly connected components with more than one module, each sorted.

    A self-edge is not a cycle (see :func:`import_graph`).  Tarjan's algorithm, iterative so a
    deep graph cannot hit the recursion limit; the result is sorted for stable messages.
    """
    nodes = set(graph) | {d for deps in graph.values() for d in deps}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)
