"""The package's import structure: one-way imports, and imports at the top of modules.

Walks the source of ``llip_scale`` (with the folders installed into it: kernels/, launchers/,
configs/) and builds the graph of its imports of itself, from module level and from inside
functions alike. A circle in it (a imports b, b imports a, directly or around a longer loop)
fails the test and is named.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each part of the package lives in the checkout (setup.cfg's package_dir).
FOLDERS = {"llip_scale": ROOT / "llip_scale", "llip_scale.kernels": ROOT / "kernels",
           "llip_scale.launchers": ROOT / "launchers", "llip_scale.configs": ROOT / "configs"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str:
    """The module that ``name`` (a module or a name inside one) belongs to."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> list[tuple[ast.AST, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.append((node, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node, [node.module] + [f"{node.module}.{a.name}" for a in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for _, names in _imports(path):
            for name in names:
                target = _owner(name, modules) if name.startswith("llip_scale") else ""
                # Importing a.b.c runs a/__init__ and a/b/__init__ first, except for a module's own parents
                # (already being imported when it runs).
                while target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
                    target = target.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 60 and "llip_scale.train.loop" in graph  # the walk found the package
    assert "llip_scale.config" in graph["llip_scale.train.loop"]
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")" for c in cycles)


def test_the_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_say_why():
    # An import inside a function hides a dependency; where one is needed (an optional package,
    # a slow import off the hot path) the line says so.
    unexplained = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        for node, _ in _imports(path):
            if node.col_offset == 0:
                continue
            text = lines[node.lineno - 1]
            context = lines[node.lineno - 2] if node.lineno > 1 else ""
            if "#" not in text and not context.strip().startswith(("try:  #", "if TYPE_CHECKING")):
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text.strip()}")
    assert not unexplained, "imports inside functions without a reason: " + "; ".join(unexplained)


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [m for m in graph if m == start or m.startswith(start + ".")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


@pytest.mark.parametrize("lower,upper", [
    ("llip_scale.dist", "llip_scale.data"), ("llip_scale.dist", "llip_scale.train"),
    ("llip_scale.data", "llip_scale.train"), ("llip_scale.interop", "llip_scale.train"),
    ("llip_scale.checkpoints", "llip_scale.train"), ("llip_scale.model", "llip_scale.train"),
])
def test_layers_import_one_way(lower, upper):
    """The runtime layer sits below data and training; checkpoints and the open_clip-style
    interop use no training code (so `create_model` never loads DeepSpeed)."""
    reached = _reaches(import_graph(), lower)
    assert any(m.startswith(lower) for m in reached), f"no module under {lower}"
    bad = sorted(m for m in reached if m == upper or m.startswith(upper + "."))
    assert not bad, f"{lower} reaches {', '.join(bad)}"


def test_create_model_does_not_load_deepspeed():
    code = ("import sys, llip_scale; llip_scale.create_model, llip_scale.load_pretrained; "
            "import llip_scale.checkpoints.store; print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
