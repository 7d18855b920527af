"""The package's structure: every module imports, dependencies point one way
(lib <- block <- drivers and workers <- runtime <- commands) and no import circle.

Imports are read from the source (ast), at module level and inside functions; those
under ``if TYPE_CHECKING:`` are annotations only: they must respect the layers but may
close a circle within one layer.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Where each installed package's sources live (pyproject's package-dir).
SOURCES = {"mqrt": ROOT / "mqrt", "mqrt.workers": ROOT / "workers", "mqrt.device": ROOT / "device"}
#: Layer of each module, by longest matching prefix: a module may import only from its
#: own layer or lower ones.
LAYERS = {
    "mqrt": 0,  # the package itself (__version__)
    "mqrt.errors": 0,
    "mqrt.lib": 0,
    "mqrt.block": 1,
    "mqrt.device": 2,
    "mqrt.workers": 2,
    "mqrt.testing": 3,
    "mqrt.runtime": 3,
    "mqrt.bench": 4,
    "mqrt.race": 4,
    "mqrt.microbench": 4,
    "mqrt.compare": 4,
    "mqrt.inspect": 4,
    "mqrt.plot": 4,
    "mqrt.cli": 5,
    "mqrt.__main__": 5,
    "mqrt._entry": 5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, src in SOURCES.items():
        for path in src.rglob("*.py"):
            rel = path.relative_to(src).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = _modules()


def _layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(runtime imports, annotation-only imports) of mqrt modules in one file."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    runtime, annotations = set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mqrt.lib import shm` imports the module mqrt.lib.shm
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in MODULES else node.module for n in names]
        for name in names:
            mod = name
            while mod and mod not in MODULES:
                mod = mod.rpartition(".")[0]
            if mod.startswith("mqrt"):
                (annotations if id(node) in typing_only else runtime).add(mod)
    return runtime, annotations


GRAPH = {mod: _imports(path) for mod, path in MODULES.items()}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_every_module_imports(mod):
    importlib.import_module(mod)


def test_dependencies_point_one_way():
    wrong = [
        f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
        for mod, (runtime, annotations) in GRAPH.items()
        for dep in runtime | annotations
        if _layer(dep) > _layer(mod) and not mod.startswith(dep + ".")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    # Package __init__ modules are skipped as sources: importing a submodule runs its
    # package's __init__, which is not an edge of the import graph.
    edges = {mod: {d for d in runtime if d != mod} for mod, (runtime, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(edges.get(mod, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(edges):
        if mod not in state and (cycle := visit(mod)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_the_graph_sees_the_layers():
    """The checks above are not vacuous: the walk finds the known edges."""
    runtime = GRAPH["mqrt.block.blk_mq"][0]
    assert "mqrt.lib.sbitmap" in GRAPH["mqrt.block.blk_mq_tag"][0]
    assert "mqrt.block.blk_mq_complete" in runtime
    assert "mqrt.block.blk_mq" in GRAPH["mqrt.block.blk_mq_complete"][1]  # annotation only
    assert {"mqrt.device.null_blk", "mqrt.workers.cpu"} <= set(GRAPH) and len(GRAPH) > 50
