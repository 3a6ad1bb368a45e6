"""The layout README's "Where things are" promises: every module listed once, with its docstring's first line;
no function longer than a screen; no import cycle between the package's modules."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "metamask_fast").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
MAX_FUNCTION_LINES = 80


def readme_map() -> dict[Path, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    entries = {}
    for name, line in re.findall(r"^- `([^`]+)`: (.+)$", section, flags=re.MULTILINE):
        path = REPO / name if name.startswith("kernels/") else REPO / "metamask_fast" / name
        path = path / "__init__.py" if name.endswith("/") else path
        assert path not in entries, f"{name} is listed twice"
        entries[path] = line
    return entries


def test_readme_map_lists_every_module_with_its_docstring_first_line():
    entries = readme_map()
    assert sorted(entries) == SOURCES, "README's map and the modules on disk differ"
    for path, line in entries.items():
        docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        assert docstring, f"{path.relative_to(REPO)} has no docstring"
        assert docstring.splitlines()[0] == line, path.relative_to(REPO)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = ("metamask_fast", *parts) if parts[0] == "kernels" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_the_package_modules():
    names = {module_name(p): p for p in SOURCES}
    # A package's __init__ importing its own submodules is how a package re-exports; not a cycle.
    graph = {name: {t for t in imports(path, set(names)) if not (path.name == "__init__.py" and
                                                                 t.startswith(name + "."))} - {name}
             for name, path in names.items()}
    graph = {name: {t for t in targets if t != "metamask_fast"} for name, targets in graph.items()}
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
