"""The package map of docs/architecture.md, checked against the code: which package may import
which (lazy imports inside functions included), and no import cycles between modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kha_train"

# What each part of kha_train may import from kha_train (docs/architecture.md, "Package map").
# A module may always import from its own package.
ALLOWED = {
    "config": set(),
    "fs": set(),
    "config_checks": {"config"},
    "data": {"config", "config_checks", "fs"},
    "model": {"config", "config_checks"},
    "training": {"config", "config_checks", "fs", "data", "model"},
    "tools": {"config", "config_checks", "fs", "data", "model", "training"},
    "bench": {"config", "config_checks", "fs", "data", "model", "training"},
    "cli": {"config", "fs", "data", "tools", "training", "bench"},
    "train": {"cli"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """kha_train modules imported anywhere in ``path`` (``from pkg import mod`` -> pkg.mod)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kha_train"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            found |= subs or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kha_train.")}
    return {m for m in found if m in modules}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kha_train"


def test_every_import_follows_the_package_map() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        part = _part(name)
        if part == "kha_train":
            continue  # kha_train/__init__.py: the version only
        assert part in ALLOWED, f"{name}: a part of kha_train not in the map (add it)"
        for target in _imports(path, modules):
            other = _part(target)
            if other not in (part, "kha_train") and other not in ALLOWED[part]:
                bad.append(f"{name} imports {target}")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for m in graph:
        graph[m] = {
            t for t in graph[m] if not (t.startswith(m + ".") and modules[m].name == "__init__.py")
        }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_level_getattr() -> None:
    offenders = [
        str(p.relative_to(ROOT.parent))
        for p in ROOT.rglob("*.py")
        if any(
            isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
            for n in ast.parse(p.read_text()).body
        )
    ]
    assert not offenders, f"module-level __getattr__ hides an import: {offenders}"
