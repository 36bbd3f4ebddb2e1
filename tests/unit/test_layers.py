"""Imports point one way: data_pipeline < pretrain < evals < cluster, and no cycles.

Every import counts, at the top of a module or inside a function: a lazy
import is still a dependency, and a cycle of lazy imports is still a cycle.
The checker is tried on a small tree of its own first, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

LAYERS = ("data_pipeline", "pretrain", "evals", "cluster")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, root: Path) -> set[str]:
    """The project modules `path` imports (absolute and relative imports, any depth)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in LAYERS}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (names that are not modules are dropped)."""
    files = {
        module_name(p, root): p for layer in LAYERS if (root / layer).is_dir() for p in (root / layer).rglob("*.py")
    }
    return {name: {m for m in project_imports(path, root) if m in files and m != name} for name, path in files.items()}


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    problems = [
        f"{a} imports {b}: {b.split('.')[0]} is above {a.split('.')[0]}"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if rank[b.split(".")[0]] > rank[a.split(".")[0]]
    ]
    # Cycles: depth-first search; a back edge closes one.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return problems


def test_the_checker_finds_an_upward_import_and_a_cycle(tmp_path):
    def write(rel: str, text: str = "") -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for layer in LAYERS:
        write(f"{layer}/__init__.py")
    write("data_pipeline/reader.py", "def f():\n    from evals.report import x  # lazy, still upward\n")
    write("evals/report.py", "x = 1\n")
    write("pretrain/a.py", "from pretrain import b\n")
    write("pretrain/b.py", "from .a import thing\n")
    write("cluster/cli.py", "import evals.report\nfrom data_pipeline import reader\n")  # downward: fine
    found = violations(tmp_path)
    assert found == [
        "data_pipeline.reader imports evals.report: evals is above data_pipeline",
        "import cycle: pretrain.a -> pretrain.b -> pretrain.a",
    ]


def test_imports_point_one_way_and_close_no_cycle():
    assert violations(REPO) == []
