"""Imports only go down: every import in jaxllm/ (module-level or inside a function) names a
module of its own layer or of one below it, and no modules import each other in a circle.

LAYERS is the order of the package's folders (README.md's package tour), bottom to top: a new
upward import or a new circle fails here.
"""

from __future__ import annotations

import ast
import os

from tests.helpers.runs import ROOT

# Bottom to top; a module is in the layer of the longest prefix that names it.
LAYERS = [
    ["jaxllm._lazy", "jaxllm.kernels"],  # Pallas kernels beside their references
    ["jaxllm.config", "jaxllm.configs"],  # schema, value rules, loading, the command line
    ["jaxllm.parallel"],  # the mesh and its table, shard_map wrappers, ring, expert exchange
    ["jaxllm.model", "jaxllm.data"],  # the decoder and decoding; tokenizer, sources, batches
    ["jaxllm.checkpoint"],  # train state, run directories, params checkpoints
    ["jaxllm.convert"],  # Hugging Face both ways, upcycling, loading a model
    ["jaxllm.train"],  # step, loss, optimizer, metrics, the loop, the stages
    ["jaxllm.eval"],  # long context, lm-eval tasks, the evaluators the loop is handed
    ["jaxllm.main", "jaxllm.plan", "jaxllm.compile", "jaxllm.generate", "jaxllm"],  # commands
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
    upward = sorted((a, b) for a, b in imports(modules()) if layer(b) > layer(a))
    assert not upward, f"imports that go up the layers (tests/test_imports.py LAYERS): {upward}"


def test_no_import_circles():
    assert circles(imports(modules())) == []
