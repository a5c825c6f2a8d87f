"""Imports only go down: every import in jaxllm/ (module-level or inside a function) names a
module of its own layer or of one below it, and no modules import each other in a circle.

LAYERS is the order today's tree keeps; KNOWN_UPWARD and KNOWN_CIRCLES list what still breaks
it (the package reorganisation removes them, and then both are empty). A new upward import or
a new circle fails here, and so does a listed one that is gone (the lists only shrink).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top; a module is in the layer of the longest prefix that names it.
LAYERS = [
    ["jaxllm._lazy", "jaxllm.kernels"],
    ["jaxllm.config", "jaxllm.config_rules", "jaxllm.recipes", "jaxllm.configs", "jaxllm.cli"],
    ["jaxllm.sharding", "jaxllm.shard_kernels", "jaxllm.ring_attention", "jaxllm.experts",
     "jaxllm.dca"],
    ["jaxllm.model", "jaxllm.tokenizer", "jaxllm.data", "jaxllm.metrics", "jaxllm.optim",
     "jaxllm.profiling"],
    ["jaxllm.checkpoint", "jaxllm.convert", "jaxllm.upcycle"],
    ["jaxllm.train"],
    ["jaxllm.generate", "jaxllm.eval"],
    ["jaxllm.main", "jaxllm.plan", "jaxllm.compile", "jaxllm"],
]
KNOWN_UPWARD = {
    ("jaxllm.config", "jaxllm.tokenizer"),  # the schema checks a tokenizer's vocabulary
}
KNOWN_CIRCLES = [
    ["jaxllm.checkpoint", "jaxllm.convert.to_hf"],  # run-directory helpers, both ways
]


def modules() -> dict[str, str]:
    """module name → file of every module under jaxllm/."""
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "jaxllm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def imports(mods: dict[str, str]) -> set[tuple[str, str]]:
    """(importer, imported) for every import of a jaxllm module, wherever it is written; in
    `from package import name`, the submodule `name` when it is one, else the package."""
    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges = set()
    for module, path in mods.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base)
                         for a in node.names]
            elif isinstance(node, ast.Import):
                found = [resolve(a.name) for a in node.names]
            else:
                continue
            edges |= {(module, name) for name in found if name and name != module}
    return edges


def layer(module: str) -> int:
    best, at = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, at = len(prefix), i
    assert at is not None, f"{module} is in no layer of LAYERS: add it"
    return at


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_only_go_down():
    edges = imports(modules())
    upward = {(a, b) for a, b in edges if layer(b) > layer(a)}
    assert not upward - KNOWN_UPWARD, (
        f"imports that go up the layers (tests/test_imports.py LAYERS): "
        f"{sorted(upward - KNOWN_UPWARD)}")
    assert not KNOWN_UPWARD - upward, f"gone: take {sorted(KNOWN_UPWARD - upward)} off KNOWN_UPWARD"


def test_no_import_circles_but_the_known_ones():
    found = circles(imports(modules()))
    assert [c for c in found if c not in KNOWN_CIRCLES] == [], "new circles"
    assert [c for c in KNOWN_CIRCLES if c not in found] == [], "gone: take them off KNOWN_CIRCLES"
