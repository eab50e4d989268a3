"""Every test is in exactly one class: ``unit``, ``integration`` or ``flower`` (markers registered in
pyproject.toml; ``make test-fast`` runs ``-m unit``).

Mechanism: each test module states its class in one line, ``pytestmark = pytest.mark.<class>``,
right after its imports, so a module's class is explicit and greppable
(``grep -n '^pytestmark' tests/``). A test of a mixed module may carry its own class mark, which
overrides the module's. The hook below enforces this at collection: a module without a class
line, or a module, class or test with two class marks, stops the run with a message saying what
to add, so a new file cannot slip through unmarked (``--strict-markers`` catches misspelt marks).
It then moves each test's class mark onto the test itself and off its module and class, so that
``-m unit`` does not also select a unit module's integration tests.
"""

from __future__ import annotations

import pytest

CLASSES = ("unit", "integration", "flower")

HOW = ("Each test module states its class in one line after its imports, e.g. "
       "`pytestmark = pytest.mark.unit` (classes: unit = fast, in-process, small tensors; "
       "integration = end-to-end engine runs, real data, subprocesses, workers or > ~1 s; "
       "flower = imports or starts Flower); a test of a mixed module may override it with its "
       "own `@pytest.mark.integration` (see tests/conftest.py)")


def _classes(node) -> list[str]:
    return [m.name for m in node.own_markers if m.name in CLASSES]


@pytest.hookimpl(tryfirst=True)  # before the mark plugin's -m deselection sees the markers
def pytest_collection_modifyitems(items) -> None:
    problems: dict[str, None] = {}  # ordered, without repeats
    chosen = []
    for item in items:
        chain = item.listchain()  # session … module … class … the test
        module = next((n for n in chain if isinstance(n, pytest.Module)), None)
        nearest = None
        for node in reversed(chain):  # the test first: its own mark overrides the module's
            names = _classes(node)
            if len(names) > 1:
                problems[f"{node.nodeid}: more than one class mark ({', '.join(sorted(names))})"] = None
            if names and nearest is None:
                nearest = node
        if module is not None and not _classes(module):
            problems[f"{module.nodeid}: no `pytestmark = pytest.mark.<class>` line"] = None
        elif nearest is None:
            problems[f"{item.nodeid}: no class mark"] = None
        chosen.append(nearest)
    if problems:
        raise pytest.UsageError("every test needs exactly one class mark:\n  "
                                + "\n  ".join(problems) + "\n" + HOW)
    for item, node in zip(items, chosen):
        if node is not item:
            item.own_markers.extend(m for m in node.own_markers if m.name in CLASSES)
    for item in items:
        for node in item.listchain()[:-1]:
            node.own_markers[:] = [m for m in node.own_markers if m.name not in CLASSES]


# Every process a Flower test starts inherits this tag; none may outlive the test.
FLOWER_TEST_TAG = "FISHERGUARD_TEST_TAG"


@pytest.fixture()
def tag(monkeypatch):
    """A tag inherited by every process the test starts; none may outlive the test."""
    import uuid

    from fisherguard.engine.flower import FLOWER_ENV, launch

    value = uuid.uuid4().hex
    monkeypatch.setenv(FLOWER_TEST_TAG, value)
    for k, v in FLOWER_ENV.items():
        monkeypatch.setenv(k, v)
    yield value
    left = launch.tagged(value, FLOWER_TEST_TAG)
    if left:
        launch.terminate(left, grace=2.0)
    assert not left, f"processes left running: {sorted(left)}"


@pytest.fixture(scope="session")
def shared_deployment(tmp_path_factory):
    """The Flower deployment of tests/flower_deployment.py, run once for the tests that share it
    (started at the first test that asks; every process it started is gone when it returns)."""
    from flower_deployment import run_shared_deployment

    return run_shared_deployment(tmp_path_factory.mktemp("shared-deployment"))
