"""The test classes of tests/conftest.py: pytest on small throw-away suites, in a subprocess with
this project's pytest configuration and conftest, proves that a module without a class line or a
test with two classes stops collection, and that a per-test mark overrides its module's."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import CLASSES

pytestmark = pytest.mark.unit

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"


def pytest_on(tmp_path: Path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    suite = tmp_path / "tests"
    suite.mkdir()
    shutil.copy(HERE / "conftest.py", suite / "conftest.py")
    for name, text in files.items():
        (suite / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # these suites need no plugin; a third of the time
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(PYPROJECT), "--rootdir",
                           str(tmp_path), "-p", "no:cacheprovider", "--collect-only", "-q",
                           *args, str(suite)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_the_registered_markers_are_the_classes_and_strict(pytestconfig):
    names = [line.split(":")[0].strip() for line in pytestconfig.getini("markers")]
    assert [n for n in names if n in CLASSES] == list(CLASSES)
    assert pytestconfig.option.strict_markers


def test_every_collected_test_has_exactly_one_class(request):
    # after the conftest hook: what `-m` sees, for this run's tests
    for item in request.session.items:
        names = [m.name for m in item.iter_markers() if m.name in CLASSES]
        assert len(names) == 1, (item.nodeid, names)


def test_a_module_without_a_class_or_a_test_with_two_stops_collection(tmp_path):
    proc = pytest_on(tmp_path, {
        "test_marked.py": """
            import pytest

            pytestmark = pytest.mark.unit


            def test_fine():
                pass


            @pytest.mark.integration
            @pytest.mark.flower
            def test_two_classes():
                pass
            """,
        "test_new.py": """
            def test_unmarked():
                pass
            """}, "-m", "unit")  # as `make test-fast` runs: the check precedes the selection
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "every test needs exactly one class mark" in out
    assert "tests/test_new.py: no `pytestmark = pytest.mark.<class>` line" in out
    assert "tests/test_marked.py::test_two_classes: more than one class mark (flower, integration)" in out
    assert "test_fine:" not in out


@pytest.mark.parametrize("selected", ["unit", "integration"])
def test_a_test_mark_overrides_the_module_mark(tmp_path, selected):
    proc = pytest_on(tmp_path, {
        "test_mixed.py": """
            import pytest

            pytestmark = pytest.mark.unit


            def test_quick():
                pass


            @pytest.mark.integration
            @pytest.mark.parametrize("n", [1, 2])
            def test_slow(n):
                pass
            """}, "-m", selected)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = sorted(line.split("::")[1] for line in proc.stdout.splitlines() if "::" in line)
    assert ids == {"unit": ["test_quick"], "integration": ["test_slow[1]", "test_slow[2]"]}[selected]
