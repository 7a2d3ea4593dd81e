"""The import structure of ``vitpipe``, computed from the source with ``ast``: no import cycle anywhere, no import
from a lower layer to a higher one, and ``models``/``pipeline`` free of ``jobs``, Ray, MLflow and DeepSpeed.

Layers, highest first (a room may import its own modules and any lower room):
``jobs.cli`` > ``jobs.cluster`` > ``jobs.run`` > ``jobs.config`` > ``jobs.stages`` > ``jobs.train`` > ``jobs.evals`` >
``jobs.core`` > ``models``, ``pipeline`` (which do not import each other).
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside functions do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["models|pipeline", "jobs.core", "jobs.evals", "jobs.train", "jobs.stages", "jobs.config", "jobs.run",
          "jobs.cluster", "jobs.cli"]
RANK = {room: i for i, rooms in enumerate(LAYERS) for room in rooms.split("|")}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("models", "pipeline", "jobs"):
        for path in sorted((REPO / top).rglob("*.py")):
            name = "vitpipe." + ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _runtime_imports(tree: ast.AST) -> list[ast.stmt]:
    """Import statements, skipping the bodies of ``if TYPE_CHECKING:``."""
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _targets(module: str, path: Path, node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    return [name] + [f"{name}.{a.name}" for a in node.names]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> vitpipe modules it imports at run time, module -> external top-level packages it imports)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    external: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            for target in _targets(m, path, node):
                t = target
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods:
                    if t != m:
                        graph[m].add(t)
                else:
                    external[m].add(target)
    return graph, external


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[1] in ("models", "pipeline") else ".".join(parts[1:3])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan); a package ``__init__`` importing its own
    sub-modules (re-exports) does not close a cycle through them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w.startswith(v + "."):
                continue
            if w not in index:
                strong(w)
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
            strong(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_room_is_known(graph):
    unknown = sorted({room(m) for m in graph[0]} - set(RANK) - {"jobs"})
    assert not unknown, f"rooms without a layer: {unknown} (add them to LAYERS)"


def test_no_import_cycle(graph):
    assert cycles(graph[0]) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    bad = [f"{m} -> {t}" for m, ts in graph[0].items() for t in ts
           if room(m) in RANK and room(t) in RANK and room(t) != room(m) and RANK[room(t)] >= RANK[room(m)]]
    assert bad == []


def _forbidden(m: str, t: str) -> bool:
    other = {"models": "vitpipe.pipeline", "pipeline": "vitpipe.models"}[room(m)]
    return t.split(".")[0] in ("ray", "mlflow", "deepspeed") or t.startswith(("vitpipe.jobs", other))


def test_models_and_pipeline_import_no_orchestration(graph):
    g, ext = graph
    bad = [f"{m} -> {t}" for m in g if room(m) in ("models", "pipeline") for t in g[m] | ext[m] if _forbidden(m, t)]
    assert bad == []


def test_the_checker_sees_what_it_checks():
    """The rules fire on a synthetic graph (so a green run is not a checker that sees nothing)."""
    g = {"vitpipe.jobs.core.a": {"vitpipe.jobs.run.b"}, "vitpipe.jobs.run.b": {"vitpipe.jobs.core.a"}}
    assert cycles(g) == [["vitpipe.jobs.core.a", "vitpipe.jobs.run.b"]]
    assert RANK[room("vitpipe.jobs.run.b")] > RANK[room("vitpipe.jobs.core.a")]
    assert _forbidden("vitpipe.models.vit", "ray.train") and _forbidden("vitpipe.pipeline.x", "vitpipe.models.vit")
    real, _ = import_graph()
    assert "vitpipe.jobs.stages.base" in real["vitpipe.jobs.run.graph"]
