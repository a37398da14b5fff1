"""The package's structure: imports flow one way (no cycle, lazy imports inside functions included), and checkpoints
load without the training code."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import fastdiff

PACKAGE = Path(fastdiff.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """fastdiff module -> the fastdiff modules it imports anywhere in its text (`from fastdiff import x` counts as an
    import of fastdiff.x when x is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastdiff"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or ({node.module} & modules.keys())
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "fastdiff.train" in graph["fastdiff.distill.cli"]  # the graph sees real imports
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_the_pipeline():
    """README, "What is where": data -> train -> distill -> bench -> report over a base that imports none of them;
    checkpoints describe their own network, so loading one needs models/, not train; report never imports torch or a
    model."""
    graph = import_graph()
    distill = {m for m in graph if m.startswith("fastdiff.distill")}
    pipeline = {"fastdiff.train", "fastdiff.bench", "fastdiff.report"} | distill
    for base in ("fastdiff.checkpoint", "fastdiff.runs", "fastdiff.samplers", "fastdiff.metrics", "fastdiff.data",
                 "fastdiff.losses", "fastdiff.param", "fastdiff.schedules", "fastdiff.io", "fastdiff.distributed"):
        assert not graph[base] & pipeline, (base, graph[base] & pipeline)
    assert not graph["fastdiff.bench"] & distill  # bench never reads distill's config
    assert not graph["fastdiff.models"] & pipeline


def test_the_code_cites_only_documents_the_repository_has():
    """Docstrings, comments and the README point at files the repository has, never at notes outside it."""
    root = PACKAGE.parent
    outside = re.compile(r"DESIGN\.md|STYLE\.md|architecture-review|\.\./shared")
    files = [p for d in ("fastdiff", "kernels", "tests", "benchmarks") for p in (root / d).rglob("*.py")] + [
        root / "README.md", root / "pyproject.toml"]
    assert len(files) > 50
    cited = [f"{p.relative_to(root)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if outside.search(line) and p.name != "test_structure.py"]
    assert cited == []
