"""The import graph of pipeline/ and retinanet/: no circles, no private name taken from
another module. Imports inside functions count too: they hide the graph, they do not cut it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "retinanet")


def module_name(path: Path) -> str:
    """pipeline/run/graph.py -> pipeline.run.graph; pipeline/run/__init__.py -> pipeline.run."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """{module: [(imported module, names taken from it)]} for every import of our own modules."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found = []
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    found.append((node.module, [a.name for a in node.names]))
                    found += [(f"{node.module}.{a.name}", []) for a in node.names]  # `from pkg import module`
                elif isinstance(node, ast.Import):
                    found += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
            graph[module_name(path)] = found
    return graph


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = project_imports()
    edges = {m: {target for target, _ in deps if target in graph and target != m} for m, deps in graph.items()}
    assert circles(edges) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_imported_from_another_module(package):
    taken = [(m, target, name) for m, deps in project_imports().items() if m.split(".")[0] == package
             for target, names in deps for name in names if name.startswith("_") and name != "__version__"]
    assert taken == []


def test_a_read_worker_imports_no_driver_code():
    """A Ray worker imports the module of each task it runs: the chip stream's tasks
    (pipeline.chips.stream) stay clear of the run's driver code, the job models and the
    model runtimes, which every read worker would otherwise load as it starts."""
    import json
    import subprocess
    import sys

    code = ("import json, sys; import pipeline.chips.stream; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pipeline', 'retinanet', 'torch', 'openvino', 'pydantic'))))")
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                                           text=True).stdout))
    assert "pipeline.chips.stream" in loaded
    heavy = {"pipeline.run.graph", "pipeline.run.runbook", "pipeline.table.transactions", "pipeline.infer.predictor",
             "pipeline.chips.planning", "pipeline.config.spec", "torch", "openvino", "pydantic"}
    assert loaded & heavy == set()
