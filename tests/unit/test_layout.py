"""The layout's rules (docs/ARCHITECTURE.md): no import cycle, no import of a layer above."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Lowest first. A module belongs to the layer of its longest matching prefix and
#: may import its own layer and those below, never one above.
LAYERS: list[tuple[str, list[str]]] = [
    ("core", ["relay.core"]),
    (
        "rules",
        [
            "relay.delivery.signing",
            "relay.delivery.ordering",
            "relay.delivery.outcome",
            "relay.delivery.egress",
            "relay.ingest.parse",
            "relay.ingest.routes",
        ],
    ),
    ("store", ["relay.store"]),
    (
        "services",
        [
            "relay.ingest.auth",
            "relay.ingest.replay_guard",
            "relay.ingest.group_commit",
            "relay.delivery.wakeups",
            "relay.web.app_keys",
        ],
    ),
    ("handlers", ["relay.api", "relay.console"]),
    ("application", ["relay.web"]),
    ("entry points", ["relay.cli", "workers"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for package in ("relay", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports (TYPE_CHECKING imports included)."""
    mods = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for target in candidates:
                if target in mods and target != name and mods[target].name != "__init__.py":
                    graph[name].add(target)
    return graph


def layer_of(module: str) -> int:
    best, length = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = index, len(prefix)
    return best


def test_every_module_has_a_layer() -> None:
    unplaced = [
        m for m, path in modules().items() if path.name != "__init__.py" and layer_of(m) < 0
    ]
    assert unplaced == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in import_graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(modules()):
        if module not in state:
            visit(module, [module])
    assert cycles == []
