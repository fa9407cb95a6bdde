"""The package boundaries the README promises, checked on the source: no import cycle anywhere
(imports inside functions included), no forbidden arrow, and diagnostics/ usable without the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("models", "diagnostics", "trainer", "ablations", "tools")
# (importer package, imported package): the layering models <- diagnostics <- trainer <- ablations <- tools
FORBIDDEN = {("models", "diagnostics"), ("models", "trainer"), ("models", "ablations"),
             ("diagnostics", "trainer"), ("diagnostics", "ablations"), ("trainer", "ablations")}
FORBIDDEN |= {(package, "tools") for package in PACKAGES if package != "tools"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def imported_modules(source: str, modules: Iterable[str]) -> set[str]:
    """Project modules a source file imports anywhere (functions included; `if TYPE_CHECKING:` blocks,
    which never run, excluded). `from pkg import name` counts as `pkg.name` when that is a module."""
    known, found = set(modules), set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path.read_text(), modules) - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_the_checker_sees_cycles_function_level_imports_and_skips_type_checking_blocks():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer import run\n"
              "def f():\n    from trainer.loop import train\n")
    assert imported_modules(source, ["trainer.run", "trainer.loop", "trainer"]) == {"trainer.loop"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert len(graph) > 60 and "trainer.loop" in graph["trainer.train"] | graph["trainer.loop"] | {"trainer.loop"}
    assert find_cycles(graph) == []


def test_no_forbidden_arrow_between_packages():
    wrong = [f"{source} -> {target}" for source, targets in import_graph().items() for target in targets
             if (source.split(".")[0], target.split(".")[0]) in FORBIDDEN]
    assert wrong == []


def test_diagnostics_import_without_the_trainer_in_a_fresh_interpreter():
    code = ("import pkgutil, sys, diagnostics\n"
            "names = [m.name for m in pkgutil.walk_packages(diagnostics.__path__, 'diagnostics.')]\n"
            "for name in names: __import__(name)\n"
            "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in "
            "('trainer', 'ablations', 'tools')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    count, leaked = out.stdout.split(" ", 1)
    assert int(count) >= 15 and leaked.strip() == "[]"
