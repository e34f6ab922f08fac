"""The import rule of docs/ARCHITECTURE.md, read from the source: every wm_jax module belongs to one
layer, and imports only from its own layer or the layers below it, never in a circle, and never
inside a function (third-party extras aside). No `_private` name is reached across a module line, in
the package, its benchmarks or its experiments. The test reads every import statement, top-level
and local, so the rule cannot drift from the code; docs/ARCHITECTURE.md draws the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module imports from its own layer or a lower one.
LAYERS = (
    ("ground", {"schema", "config", "presets", "stats", "precision", "sharding", "logs", "interrupt", "envs"}),
    ("store", {"store"}),  # wm_jax/store/: checkpoints and datasets
    ("models", {"models"}),  # wm_jax/models/: V, M, K, C, their layers, INT8, the training loop
    ("search", {"search"}),  # wm_jax/search/: dreams, real episodes, trainers, the driver, macro, sweep
    ("records", {"run_dir", "stages", "pretrained"}),  # run directories and exported agents
    ("top", {"plots", "report", "video", "agent", "pipeline", "seeds", "serve", "commands", "cli"}),  # serve/: the HTTP server
)
LEVEL = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}


def _name(path: Path) -> str:
    """wm_jax/serve/app.py -> "serve.app"; a package's __init__.py is the package ("serve")."""
    parts = path.relative_to(ROOT / "wm_jax").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted((ROOT / "wm_jax").rglob("*.py")) if p != ROOT / "wm_jax" / "__init__.py"}


def _layer(module: str) -> int:
    return LEVEL[module.split(".")[0]]  # a subpackage's modules are in its layer


def _imports(path: Path, mods: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(wm_jax module imported, inside a function, line) for every import statement of `path`."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "wm_jax":
                continue
            for end in range(len(parts), 1, -1):  # the longest prefix that is a module
                if ".".join(parts[1:end]) in mods:
                    out.append((".".join(parts[1:end]), id(node) in local, node.lineno))
                    break
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t, _, _ in _imports(p, mods) if t != m} for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert {m.split(".")[0] for m in _modules()} == set(LEVEL), ({m.split(".")[0] for m in _modules()} ^ set(LEVEL))


def test_imports_point_down_or_sideways_only():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in _graph().items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, upward


def test_no_import_circle():
    graph, circles = _graph(), []

    def visit(m: str, path: list[str]) -> None:
        for t in sorted(graph[m]):
            if t in path:
                circles.append(path[path.index(t):] + [t])
            elif t not in seen:
                seen.add(t)
                visit(t, path + [t])

    for start in sorted(graph):
        seen = {start}
        visit(start, [start])
    assert not circles, circles[:5]


def test_no_wm_jax_import_inside_a_function():
    """One exception: cli imports commands (the model stack) once the arguments parse, so
    `wm-jax --help` and an argument error answer at once, before JAX loads."""
    mods = _modules()
    local = [f"{p.relative_to(ROOT)}:{line} imports wm_jax.{t}" for m, p in mods.items()
             for t, inside, line in _imports(p, mods) if inside and (m, t) != ("cli", "commands")]
    assert not local, local


def test_no_private_name_is_used_across_a_module_line():
    mods = _modules()
    files = [*mods.values(), *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "experiments").glob("*.py"))]
    own = {p: m for m, p in mods.items()}
    reached = []
    for path in files:
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> the wm_jax module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "wm_jax":
                base = node.module.split(".", 1)[1] if "." in node.module else ""
                for a in node.names:
                    target = f"{base}.{a.name}" if base else a.name
                    if target in mods:
                        aliases[a.asname or a.name] = target
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        reached.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "wm_jax" and len(parts) > 1 and a.asname:
                        aliases[a.asname] = ".".join(parts[1:])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != own.get(path)):
                reached.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not reached, reached
