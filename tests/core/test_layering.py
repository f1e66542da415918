"""The house's flow: config -> select -> numerics -> layer -> quantize -> policy -> rollouts -> golden ->
judge -> report -> CLI/plugin. No module imports one to its right (module-level or inside a function), and
no two modules import each other in a loop.

Two leaf rooms sit at the start because everything after them speaks their vocabulary and they import
nothing of the project: config.py (the settings) and results.py (the episode record the rollouts write
and every later room reads). gate.py (pure statistics) imports nothing either; it is placed just before
the golden/judge rooms that use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "pytest_duquant"

RANKS = [  # (module prefix, rank); the longest matching prefix wins
    ("config", 0), ("results", 0), ("testing", 0), ("strategies", 0), ("__init__", 0), ("progress", 0),
    ("selection", 1),
    ("numerics", 2),
    ("packs", 3), ("kernels", 3), ("layer", 3), ("baselines", 3), ("deploy", 3),  # a layer and its kernels: one room
    ("quantize", 4),
    ("policies", 5), ("metrics.records", 5), ("metrics.capture", 5), ("metrics", 5.5),
    ("libero", 6), ("training", 6.5),
    ("gate", 7), ("golden", 8),
    ("judge", 9),
    ("reporting", 10),
    ("commands", 11), ("cli", 11), ("plugin", 11), ("rootdir", 11), ("__main__", 11),
]


def rank(module: str) -> float:
    best = max((p for p, _ in RANKS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module}: no room in RANKS (add it where it belongs in the flow)"
    return dict(RANKS)[best]


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in it (a name imported from a package may be a module)."""
    pkg = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
                mod = mod.removeprefix("__init__.") if mod.startswith("__init__") else mod
            elif node.module and node.module.startswith("pytest_duquant"):
                mod = node.module.removeprefix("pytest_duquant").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}".lstrip(".")
                found.add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pytest_duquant."):
                    found.add(alias.name.removeprefix("pytest_duquant."))
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_module_imports_one_to_its_right():
    wrong = [
        f"{a} (rank {rank(a)}) imports {b} (rank {rank(b)})"
        for a, deps in graph().items()
        for b in deps
        if rank(b) > rank(a) and not (a.split(".")[0] == "__init__" or a == "")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    g.pop("", None)  # the package's face re-exports lazily
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cyc := visit(n)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cyc := visit(m)):
            raise AssertionError(" -> ".join(cyc))
