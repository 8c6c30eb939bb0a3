"""The package's layout stays as designed: no circle of imports, imports only from the same or a lower room, the
graph package's modules in one order, no private name imported from another module, and no module too long to
read. Read from the source with ``ast``: nothing is imported. Imports under ``if TYPE_CHECKING:`` count as any other:
they tie the modules together for a reader and a type checker alike."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdwrap"
MAX_LINES = 600

# The rooms, lowest first: a module imports only from its own room or a lower one.
ROOMS = [
    ("kdwrap.errors", "kdwrap._timing"),
    ("kdwrap.graph", "kdwrap.base", "kdwrap._deploy", "kdwrap.knn", "kdwrap.memory_bank", "kdwrap.models",
     "kdwrap.augment"),
    ("kdwrap.fused",),
    ("kdwrap.methods",),
    ("kdwrap.api",),
    ("kdwrap.integrations", "kdwrap.demo", "kdwrap.__main__", "kdwrap"),
]
# kdwrap.graph's modules, each importing only those before it (the order of its __init__'s docstring).
GRAPH_ORDER = ["inputs", "concrete_tracer", "tracing", "cut", "outputs", "channels", "stages", "split", "cost",
               "split_summary"]


def _module_name(path: Path) -> str:
    parts = ["kdwrap", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, str | None]]:
    """(kdwrap module imported, name taken from it or None) for every import of a kdwrap module in ``name``,
    function-level and ``TYPE_CHECKING`` imports included."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "kdwrap"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kdwrap":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
    return [(t, n) for t, n in found if t in MODULES]


EDGES = {name: _imports(name) for name in MODULES}


def _room(name: str) -> int:
    best = max((len(p), i) for i, room in enumerate(ROOMS) for p in room
               if name == p or name.startswith(p + ".") or (p == "kdwrap" and name == "kdwrap"))
    return best[1]


def test_no_circle_of_imports():
    graph = {m: {t for t, _ in EDGES[m] if t != m} for m in MODULES}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for m in MODULES:
        if m not in index:
            visit(m)
    assert not circles, f"modules that import each other in a circle: {circles}"


def test_imports_go_to_the_same_room_or_a_lower_one():
    upward = [f"{m} -> {t}" for m in MODULES for t, _ in EDGES[m] if _room(t) > _room(m)]
    assert not upward, upward


def test_the_graph_package_imports_in_one_direction():
    assert sorted(GRAPH_ORDER) == sorted(m.rsplit(".", 1)[1] for m in MODULES if m.startswith("kdwrap.graph."))
    rank = {f"kdwrap.graph.{m}": i for i, m in enumerate(GRAPH_ORDER)}
    backward = [f"{m} -> {t}" for m in rank for t, _ in EDGES[m] if t.startswith("kdwrap.graph") and
                (t == "kdwrap.graph" or rank[t] >= rank[m])]
    assert not backward, backward


def test_outside_the_graph_package_only_its_entry_points_are_used():
    inside = [f"{m} -> {t}" for m in MODULES if not m.startswith("kdwrap.graph") for t, _ in EDGES[m]
              if t.startswith("kdwrap.graph.")]
    assert not inside, f"import these from kdwrap.graph, where its __init__ names them: {inside}"


def test_no_private_name_is_imported_from_another_module():
    """A name another module imports is public, also in a private module (``_deploy``, ``fused._layout``): the
    underscore says "used only in this file". Dunders (``__version__``) are not private."""
    private = {(m, n): t for m in MODULES for t, n in EDGES[m]
               if n is not None and n.startswith("_") and not (n.startswith("__") and n.endswith("__"))}
    imported = [f"{m}: {n} from {t}" for (m, n), t in private.items()]
    assert not imported, imported


def test_no_module_is_too_long_to_read():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
