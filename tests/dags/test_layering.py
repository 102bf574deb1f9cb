"""The layers keep their rules: public Airflow APIs only outside tests, no Airflow in tasks/, no import
cycles in scripts/, thin plugins."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("airflow.models", "airflow.utils.session", "airflow.sdk.execution_time")
PLUGIN_BUDGET = 650  # lines of plugins/network_security/*.py: adapters only, at most half of the 1,301 of issue 9


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in python_files(*folders)
        for line, module in imported_modules(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_no_airflow_internals_or_mock_outside_tests():
    assert violations(("scripts", "plugins", "dags"), (*FORBIDDEN, "unittest.mock", "mock")) == []
    for path in python_files("scripts", "plugins", "dags"):
        assert "mock.patch" not in path.read_text(), f"{path.relative_to(ROOT)} patches with mock"


def test_tasks_import_no_airflow():
    assert violations(("tasks", "tests/tasks"), ("airflow",)) == []


@pytest.mark.parametrize(
    "module", ["airflow.models.dagrun", "airflow.utils.session", "airflow.sdk.execution_time.xcom"]
)
def test_the_guard_catches_an_internal_import(tmp_path, monkeypatch, module):
    package = tmp_path / "scripts"
    package.mkdir()
    (package / "bad.py").write_text(f"def f():\n    from {module} import X\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations(("scripts",), FORBIDDEN)[0] == f"scripts/bad.py:2 imports {module}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _script_graph() -> dict[str, set[str]]:
    """scripts.X -> the scripts modules it imports (at any depth; ``from scripts.a import f`` is scripts.a)."""
    files = python_files("scripts")
    names = {_module_name(path) for path in files}
    graph = {}
    for path in files:
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from scripts.pkg import mod` imports the submodule; `from scripts.mod import f` the module
                modules = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module for a in node.names
                ]
            else:
                continue
            targets |= {m for m in modules if m in names}
        graph[_module_name(path)] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if target == node or target.startswith(node + "."):
                continue  # a package importing its own modules (re-exporting them) is no cycle
            if state.get(target) == "open":
                found.append(trail[trail.index(target) :] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_scripts_have_no_import_cycles():
    assert cycles(_script_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_importing_the_stack_pulls_in_neither_the_ui_nor_the_bootstrap():
    code = "import sys, scripts.stack; print(sorted({'scripts.airflow_ui', 'scripts.bootstrap'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_plugins_stay_adapters():
    lines = sum(len(path.read_text().splitlines()) for path in (ROOT / "plugins" / "network_security").glob("*.py"))
    assert lines <= PLUGIN_BUDGET, f"plugins/network_security/ is {lines} lines: move decisions to tasks/"
