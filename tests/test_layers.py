"""The package's layers point down only, nothing imports an entry point, and no import cycle exists.

Every `import` in every module counts, also those inside functions (a lazy import is still a
dependency). Layers, top to bottom (docs/architecture.md):
  entry points -> run orchestration (runs/, app/, utility/) -> pipelines/ and eval/ -> models/ -> data/
  -> the base (the package itself, io).
Inside data/, the subpackages by job (prepare/, synthetic/, loading/) may use the shared modules at
data/'s top, never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mame_lightning

PACKAGE = Path(mame_lightning.__file__).resolve().parent
ENTRY_POINTS = {"mame_lightning." + name for name in
                ("train", "prepare", "evaluate", "generate", "export", "synth", "sweep", "demo")} | {
    "mame_lightning.app.__main__", "mame_lightning.utility.__main__"}
LAYERS = [  # (prefix, layer): the longest matching prefix wins; lower number = higher layer
    ("mame_lightning.runs", 1), ("mame_lightning.app", 1), ("mame_lightning.utility", 1),
    ("mame_lightning.pipelines", 2), ("mame_lightning.eval", 2),
    ("mame_lightning.models", 3),
    ("mame_lightning.data", 4),
    ("mame_lightning.io", 5), ("mame_lightning", 5),
]
DATA_JOBS = ("mame_lightning.data.prepare", "mame_lightning.data.synthetic", "mame_lightning.data.loading")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (from X import Y counts Y when Y is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("mame_lightning") and target != name:
                found.add(target)
    return found


def layer(name: str) -> int:
    if name in ENTRY_POINTS:
        return 0
    return max((p for p in LAYERS if name == p[0] or name.startswith(p[0] + ".")), key=lambda p: len(p[0]))[1]


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_the_walk_sees_the_package():
    assert {"mame_lightning.runs.training", "mame_lightning.data.loading.datamodule", "mame_lightning.io"} <= set(GRAPH)
    assert "mame_lightning.data.loading.prepared_set" in GRAPH["mame_lightning.data.loading.datamodule"]


def test_no_library_module_imports_an_entry_point():
    bad = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() if a not in ENTRY_POINTS for b in deps if b in ENTRY_POINTS)
    assert not bad, "library code imports an entry point:\n" + "\n".join(bad)


def test_imports_point_down_the_layers():
    bad = sorted(f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})" for a, deps in GRAPH.items() for b in deps
                 if b not in ENTRY_POINTS and layer(b) < layer(a))
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_shared_data_modules_do_not_reach_into_the_jobs():
    def job(name):
        return next((j for j in DATA_JOBS if name == j or name.startswith(j + ".")), None)

    bad = sorted(f"{a} -> {b}" for a, deps in GRAPH.items() if layer(a) == 4 and job(a) is None
                 for b in deps if job(b) is not None)
    assert not bad, "shared data modules importing a data job:\n" + "\n".join(bad)


def test_no_import_cycles():
    # Tarjan's strongly connected components over the module graph; packages' __init__ re-exports
    # count like any other import.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS - {"mame_lightning.app.__main__", "mame_lightning.utility.__main__"}))
def test_entry_points_are_thin(name):
    lines = modules()[name].read_text().count("\n")
    assert lines <= 40, f"{name} has {lines} lines; its work belongs in runs/"


def test_modules_stay_small():
    big = {name: path.read_text().count("\n") for name, path in modules().items()}
    assert not {k: v for k, v in big.items() if v > 400}, {k: v for k, v in big.items() if v > 400}


def test_only_the_durable_write_helper_renames_files():
    """Temp-then-rename is written once (mame_lightning.io); every other writer calls it."""
    renames = ("os.replace(", "os.rename(", ".rename(", ".replace_with(", "shutil.move(")
    bad = []
    for name, path in modules().items():
        if name == "mame_lightning.io":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(r in code for r in renames) and "str.replace" not in code:
                bad.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)
