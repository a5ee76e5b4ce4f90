"""The layout the data path depends on: stages import only what comes before them.

A newcomer reads the bridge in the order data flows (CONTRIBUTING.md, docs/architecture.md). These
tests keep that true as it grows: they walk every import in ``bridge/`` (also those inside
functions) and fail on an import of a later stage, on an import cycle, on a module that has
grown past one reason to change, and on production code reaching into the simulators.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridge"

LAYERS = ("core", "config", "audio", "link", "devices", "speech", "outbox", "app", "cli")
"""``bridge.<layer>`` in data-path order; each may import itself and the layers before it."""

MAX_LINES = 460
"""CONTRIBUTING.md asks for "about 400 lines"; past this a module surely does more than one job."""

SIM_IMPORTERS = {"bridge.cli.demo"}
"""The only production module that may import the simulators (the demo runs them on purpose)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports by absolute name; ``from pkg import mod`` counts as ``mod``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: use absolute imports (line {node.lineno})"
            if node.module is None:
                continue
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_stage_package_is_a_known_layer() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    top_modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert packages | top_modules <= set(LAYERS), (
        f"{sorted((packages | top_modules) - set(LAYERS))}: add it to LAYERS in its data-path place")


def test_no_stage_imports_a_later_stage() -> None:
    upward = [f"{name} imports {target}"
              for name, targets in GRAPH.items() if (own := _layer(name)) is not None
              for target in sorted(targets) if (other := _layer(target)) is not None and other > own]
    assert upward == [], "a stage reaches up the data path:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components over modules of this package.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node] & MODULES.keys():
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in MODULES:
        if name not in index:
            visit(name)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_graph_sees_real_imports() -> None:
    # The walk must find what is plainly there, or the checks above pass on an empty graph.
    assert "bridge.core.pcm" in GRAPH["bridge.audio.timeline"]
    assert "bridge.link.supervisor" in GRAPH["bridge.devices.link"]
    assert "bridge.speech.spool" in GRAPH["bridge.speech.pipeline"]


def test_modules_stay_small() -> None:
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job (limit {MAX_LINES} lines): {long}"


def test_production_code_does_not_import_the_simulators() -> None:
    users = {name for name, targets in GRAPH.items()
             if any(t == "omi_bridge_sim" or t.startswith("omi_bridge_sim.") for t in targets)}
    assert users <= SIM_IMPORTERS, f"{sorted(users - SIM_IMPORTERS)} import omi_bridge_sim"
