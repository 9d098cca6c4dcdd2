"""The import graph of pipeline/ and retinanet/: imports point down the layers, no circles,
no private name taken from another module. Imports inside functions count too: they hide
the graph, they do not cut it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "retinanet")

# The layers, lowest first: a module imports only from its own layer's folder (or file) or
# from a lower layer. A tuple is one layer of peers, which never import each other. A layer
# is named by its folder or file under pipeline/ (pipeline/io/, pipeline/query.py);
# "retinanet" is the model library under all of them and "pipeline" the package's root
# (pipeline/__init__.py) above all. docs/architecture.md says what each layer holds.
LAYERS = ("retinanet", "errors", "geo", "config", "io", "chips", "table", "compute", "infer", "eval", "train", "run",
          ("query", "render", "tools"), "cli", "pipeline")


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


def layer_of(module: str) -> str:
    """pipeline.io.stac -> io; pipeline.query -> query; pipeline -> pipeline; retinanet.model -> retinanet."""
    parts = module.split(".")
    return parts[0] if parts[0] == "retinanet" or len(parts) == 1 else parts[1]


def layer_rank(layer: str) -> int:
    for rank, entry in enumerate(LAYERS):
        if layer == entry or (isinstance(entry, tuple) and layer in entry):
            return rank
    raise KeyError(f"{layer!r} has no place in LAYERS (tests/test_layers.py): give it one")


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Each import that does not point down: to a higher layer, or to a peer of the same
    rank. One line per import, ``module (layer) -> target (layer)``, sorted."""
    found = []
    for module, targets in edges.items():
        for target in targets:
            here, there = layer_of(module), layer_of(target)
            if here != there and layer_rank(there) >= layer_rank(here):
                found.append(f"{module} ({here}) -> {target} ({there})")
    return sorted(found)


def project_edges() -> dict[str, set[str]]:
    """{module: the project modules it imports}, itself left out."""
    graph = project_imports()
    return {m: {target for target, _ in deps if target in graph and target != m} for m, deps in graph.items()}


def test_the_direction_check_finds_an_upward_import():
    edges = {"pipeline.io.stac": {"pipeline.table.store", "pipeline.errors"},
             "pipeline.table.store": {"pipeline.io.objstore"},
             "pipeline.render": {"pipeline.query"},  # peers
             "retinanet.model": {"pipeline.errors"},  # the library under the pipeline
             "pipeline.io.inputs": {"pipeline.io.stac"},  # within a layer
             "pipeline": {"pipeline.run.predict"}}  # the root above all
    assert upward_imports(edges) == ["pipeline.io.stac (io) -> pipeline.table.store (table)",
                                     "pipeline.render (render) -> pipeline.query (query)",
                                     "retinanet.model (retinanet) -> pipeline.errors (errors)"]
    with pytest.raises(KeyError, match="'gui' has no place in LAYERS"):
        upward_imports({"pipeline.gui.app": {"pipeline.errors"}})


def test_every_module_has_a_layer():
    assert sorted({layer_of(m) for m in project_imports()} - {
        name for entry in LAYERS for name in (entry if isinstance(entry, tuple) else (entry,))}) == []


def test_imports_point_down_the_layers():
    upward = upward_imports(project_edges())
    assert not upward, (f"{len(upward)} imports point up or sideways (layers, lowest first: {LAYERS}):\n  "
                        + "\n  ".join(upward))


def test_the_box_metrics_are_a_leaf():
    """pipeline.eval.metrics imports nothing of ours: the INT8 gate, training's validation,
    render and the benches take it without pulling in the rest of eval."""
    assert project_edges()["pipeline.eval.metrics"] == set()


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert circles(project_edges()) == []


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
    heavy = {"pipeline.run.graph", "pipeline.run.runbook", "pipeline.table.commit", "pipeline.table.state",
             "pipeline.infer.predictor", "pipeline.chips.planning", "pipeline.config.spec", "torch", "openvino",
             "pydantic"}
    assert loaded & heavy == set()
