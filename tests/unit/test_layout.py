"""The package's layout holds: no import circle (not even one closed through
``TYPE_CHECKING``), and each room imports only what is below it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "offset_appliance"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports, wherever the import stands."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for candidate in (target, *(f"{target}.{alias.name}" for alias in node.names)):
                if candidate in modules and candidate != name:
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_the_import_graph_finds_what_it_should():
    graph = _graph()
    assert "offset_appliance.relay.policy" in graph["offset_appliance.relay.relay"]
    assert "offset_appliance.relay.actions" in graph["offset_appliance.relay.core"]


def test_no_module_imports_itself_through_others():
    graph = _graph()
    circles = sorted(name for name in graph if name in _reachable(graph, name))
    assert circles == []


def test_the_loop_knows_no_control_and_the_core_no_shell():
    graph = _graph()
    relay = "offset_appliance.relay."
    controls = {relay + name for name in ("policy", "access", "bans", "bandwidth", "memory")}
    assert not _reachable(graph, relay + "loop") & (controls | {relay + "relay"})
    shell = {relay + name for name in ("relay", "loop", "output", "policy", "server")}
    assert not _reachable(graph, relay + "core") & shell
    # The hand-over moves bytes; the state it moves is the relay's.
    assert relay + "server" not in _reachable(graph, relay + "handover")


def test_the_wire_layer_takes_its_limits_as_arguments():
    """The protocol layer imports nothing of the configuration or of the relay: the
    dependency runs from them to it."""
    graph = _graph()
    wire = [name for name in graph if name.startswith("offset_appliance.wire.")]
    assert len(wire) >= 7
    above = {"offset_appliance.config"} | {
        n for n in graph if n.startswith("offset_appliance.relay")
    }
    for name in wire:
        assert not _reachable(graph, name) & above, name
