"""The shape of the code, checked by parsing it (``ast``; nothing imported, nothing installed).

- ``kd/`` has no import cycle, lazy imports inside functions included.
- No library module imports ``kd.cli``: the commands are a skin over the library.
- ``kd-eval`` (``kd.cli.eval``) does not reach the training stack (``kd.training``, ``kd.teacher``).
- ``ls kd/`` stays short, and ``run()`` reads in about a screen.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

KD = Path(__file__).resolve().parents[1] / "kd"


def module_name(path: Path) -> str:
    parts = path.relative_to(KD.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(KD.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The kd modules ``path`` imports, at the top or inside functions.

    ``from kd.x import y`` is an import of ``kd.x.y`` when that is a module, else of ``kd.x``.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack, on_path = [(start, iter(sorted(graph[start])))], [start]
        if start in done:
            continue
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return [*on_path[on_path.index(child):], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                on_path.append(child)
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_relative_and_submodule_imports_are_resolved(tmp_path: Path) -> None:
    known = {"kd.compress", "kd.compress.base", "kd.errors", "kd.compress.report"}
    source = KD / "compress" / "deploy.py"
    found = imports_of(source, known | {"kd.compress.deploy"})
    assert {"kd.compress.base", "kd.compress.report"} <= found and "kd.compress.deploy" not in found


def test_kd_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_library_module_imports_the_commands() -> None:
    graph = import_graph()
    offenders = sorted(f"{m} imports {i}" for m, deps in graph.items() if not m.startswith("kd.cli")
                       for i in deps if i == "kd.cli" or i.startswith("kd.cli."))
    assert not offenders, offenders


@pytest.mark.parametrize("command", ["kd.cli.eval", "kd.compress.evaluate", "kd.models.weights"])
def test_kd_eval_does_not_reach_the_training_stack(command: str) -> None:
    reached = reachable(import_graph(), command)
    stack = sorted(m for m in reached if m.startswith(("kd.training", "kd.teacher", "kd.losses")))
    assert not stack, f"{command} reaches {stack}"


def test_the_top_of_kd_is_short_and_every_package_says_what_it_is() -> None:
    entries = sorted(p.name for p in KD.iterdir() if p.name != "__pycache__")
    assert len(entries) <= 12, entries
    for package in (p for p in KD.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = package / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{package} needs a docstring"


def test_run_reads_in_about_a_screen() -> None:
    tree = ast.parse((KD / "training" / "run.py").read_text())
    (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
    assert run.end_lineno - run.lineno + 1 <= 60
