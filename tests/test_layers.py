"""The library's layout holds (docs/architecture.md, "Layers"): one package per stage, each importing only the
packages below it, no two modules importing each other, and the synthetic world's word lists read only where a
stage works on that world. Read from the code's own imports (every `import`, lazy ones inside functions too)."""

import ast
from pathlib import Path

import pytest

PEA = Path(__file__).resolve().parents[1] / "pea"
# Top down, as docs/architecture.md lists them; the top-level modules (cli, ops) are the library's face.
LAYERS = ["face", "registry", "evaluate", "train", "embed", "models", "corpus", "method", "spec", "io"]
# Who may read the synthetic world (its lexicon, scenes, culture phrases): the world's own modules, the toy models
# built on it, acquire (it serves the synthetic corpus) and the evaluation's dictionary baseline of that world.
WORLD = {"pea.corpus.synthetic", "pea.corpus.culture"}
WORLD_READERS = {"pea.corpus.acquire", "pea.models.toy", "pea.models.embedded", "pea.models.fullsize", "pea.evaluate"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PEA.rglob("*.py")):
        parts = path.relative_to(PEA.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The pea modules `name` imports (a `from pea.x import y` names module pea.x.y where that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pea"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pea" and not node.level:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {m for m in found if m != name and m != "pea"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in LAYERS else "face"


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_every_module_is_in_a_layer():
    assert {_layer(m) for m in GRAPH if m != "pea"} <= set(LAYERS)
    assert {m for m in GRAPH if m != "pea" and _layer(m) == "face"} == {"pea.cli", "pea.ops"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "pea"))
def test_imports_point_down(module):
    upward = [(dep, _layer(dep)) for dep in GRAPH[module]
              if dep in GRAPH and LAYERS.index(_layer(dep)) < LAYERS.index(_layer(module))]
    assert not upward, f"{module} ({_layer(module)}) imports a package above it: {upward}"


def test_no_import_cycles():
    # Depth-first search for a back edge (a package's __init__ is a module like any other).
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep in GRAPH and dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_synthetic_world_is_read_only_by_its_own_stages():
    readers = {m for m, deps in GRAPH.items() if deps & WORLD and m not in WORLD}
    assert readers <= WORLD_READERS, f"read the synthetic world's word lists: {sorted(readers - WORLD_READERS)}"
    assert not GRAPH["pea.evaluate.baselines"] & WORLD
