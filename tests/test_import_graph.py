"""The package's modules import each other one way: no cycles, and the leaf folders import nothing above them.

Every module is parsed with `ast`; imports at module level and inside functions both count (a lazy import
still ties two modules together). `from . import x` is an import of the submodule `x` when there is one.
Importing `a.b` also imports the package `a`, but that implicit edge is left out: it is Python's, not ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "peft_qalora"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _ours(name: str) -> str | None:
    """The module of ours that importing `name` loads (the longest prefix that is one), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def imports_of(module: str) -> set[str]:
    """The modules of ours that `module` imports anywhere in its body."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        found.update(t for t in map(_ours, targets) if t and t != module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_parser_sees_the_imports_it_should():
    assert f"{PACKAGE}.gptq.tensors" in GRAPH[f"{PACKAGE}.gptq.rtn"]  # from .tensors import ...
    assert f"{PACKAGE}.gptq.checkpoint" in GRAPH[f"{PACKAGE}.merge.files"]  # from ..gptq import checkpoint
    assert f"{PACKAGE}.tuners.registration" in GRAPH[f"{PACKAGE}.tuners.qalora"]
    assert f"{PACKAGE}.gptq" not in GRAPH[f"{PACKAGE}.gptq.rtn"]  # no implicit parent-package edge


def test_find_cycle_reports_the_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _outside(module: str, allowed: tuple[str, ...]) -> set[str]:
    return {m for m in GRAPH[module] if not m.startswith(allowed)}


def test_leaves_import_nothing_of_ours():
    leaves = [m for m in GRAPH if m == f"{PACKAGE}.names" or m.startswith(f"{PACKAGE}.utils")]
    assert leaves, "no leaf modules found"
    assert {m: GRAPH[m] for m in leaves if GRAPH[m] - {f"{PACKAGE}.utils"}} == {}


def test_registration_imports_nothing_of_ours():
    assert GRAPH[f"{PACKAGE}.tuners.registration"] == set()


def test_gptq_imports_only_gptq_utils_and_names():
    allowed = (f"{PACKAGE}.gptq", f"{PACKAGE}.utils", f"{PACKAGE}.names")
    gptq = [m for m in GRAPH if m.startswith(f"{PACKAGE}.gptq")]
    assert {m: _outside(m, allowed) for m in gptq if _outside(m, allowed)} == {}


def test_no_public_name_is_also_a_module():
    # importing peft_qalora.<x>.y sets the attribute peft_qalora.<x> to the module, hiding a lazy name <x>
    import peft_qalora

    top = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert top & set(peft_qalora.__all__) == set()
