"""The house: the package's modules import downward only (no circle), imports inside functions only defer
heavy optional dependencies, the walk reads as the algorithm, and no function grows past 80 lines.

Read from the source with ``ast``: nothing is imported or run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ebft"
# Imports inside a function, allowed only to defer a heavy optional dependency (never an ebft module):
DEFERRED_OK = {"transformers", "lm_eval", "matplotlib", "accelerate", "datasets", "huggingface_hub", "gguf",
               "llama_cpp", "compressed_tensors", "pyarrow", "tokenizers", "psutil", "fcntl", "ctypes",
               "torch", "safetensors", "numpy"}
MAX_LINES = 80
WALK_MAX_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The package modules an import statement reaches (the module itself, or its imported submodules)."""
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    if target in MODULES and len(found) < len(node.names):
        found.append(target)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                graph[module].update(t for t in _resolve(module, path, node) if t != module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name in MODULES and a.name != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    """The check itself: a planted circle (and a three-module one) is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 50  # the graph was really read
    assert cycles(graph) == []


def test_imports_inside_functions_only_defer_heavy_optional_dependencies():
    """An import in a function is never an ebft module (that would hide a circle), only a heavy or optional
    third-party package that most commands never need."""
    bad = []
    for module, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    top = "." if node.level else (node.module or "").split(".")[0]
                elif isinstance(node, ast.Import):
                    top = node.names[0].name.split(".")[0]
                else:
                    continue
                if top not in DEFERRED_OK:
                    bad.append(f"{module}.{fn.name}: imports {top if top != '.' else 'a relative module'}")
    assert bad == []


def _functions():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    assert [(m, f, n) for m, f, n in _functions() if n > MAX_LINES] == []


def test_the_walk_reads_as_the_algorithm():
    """``walk()`` fits on a screen, and its loop names the steps in order: load, statistics, prune,
    recover, check, propagate, release."""
    lines = {(m, f): n for m, f, n in _functions()}
    assert lines[("ebft.walk", "walk")] <= WALK_MAX_LINES
    source = (SRC / PACKAGE / "walk.py").read_text(encoding="utf-8")
    loop = source[source.index("    for index in state.remaining():"):source.index("    return state.result()")]
    steps = ["state.load(", "work.measure(", "work.prune(", "work.recover(", "work.check(",
             'streams.advance("final"', "state.done("]
    positions = [loop.index(step) for step in steps]
    assert positions == sorted(positions)
    assert " if " not in loop  # no special case in the loop: collaborators decide
