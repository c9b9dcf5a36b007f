"""The package layout keeps data flowing one way: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "geoseg"
ORDER = [
    "classes",
    "records",
    "grid",
    "io",
    "models",
    "engine",
    "vector",
    "pipeline",
    "evaluate",
    "train",
    "effects",
    "sequences",
    "change",
    "workflows",
    "commands",
    "cli",
]
# layers that are one level: the command line is geoseg.commands (one module per command) and
# geoseg.cli (the group that registers them); cli imports commands, never the other way
SAME_LEVEL = {"commands": "cli"}
# third-party imports each layer must not make (anywhere in the module, lazy or not)
FORBIDDEN = {
    "records": {"numpy", "rasterio", "torch", "dask", "distributed", "onnxruntime", "xarray", "geopandas"},
    "classes": {"numpy", "rasterio", "torch", "dask", "distributed", "onnxruntime", "xarray", "geopandas"},
    "grid": {"rasterio", "torch", "dask", "distributed", "onnxruntime", "xarray", "geopandas"},
    "io": {"torch", "dask", "distributed", "onnxruntime"},
    "models": {"dask", "distributed", "rasterio"},
    "vector": {"torch", "onnxruntime"},
    # chips, per-image data, the run and the recipes: the torch half of training is geoseg.models.loop
    "train": {"torch", "dask", "distributed", "onnxruntime"},
    # thin: a command calls the library, which does the work (and keeps ``geoseg --help`` fast)
    "commands": {"numpy", "rasterio", "torch", "dask", "distributed", "onnxruntime", "xarray", "geopandas"},
}


def _rank(layer: str) -> int:
    return ORDER.index(SAME_LEVEL.get(layer, layer))


def _layer(path: Path) -> str | None:
    rel = path.relative_to(PKG).with_suffix("")
    head = rel.parts[0]
    return head if head in ORDER else None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_imports(path: Path) -> None:
    layer = _layer(path)
    if layer is None:
        return
    rank = _rank(layer)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "geoseg" and len(parts) > 1 and parts[1] in ORDER:
            assert _rank(parts[1]) <= rank, f"{path.name} ({layer}) imports {name}"
            assert not (layer == "commands" and parts[1] == "cli"), f"{path.name} ({layer}) imports {name}"
        assert parts[0] not in FORBIDDEN.get(layer, set()), f"{path.name} ({layer}) imports {name}"


def test_torch_only_in_models() -> None:
    for path in PKG.rglob("*.py"):
        if "torch" in {n.split(".")[0] for n in _imports(path)}:
            assert path.parent.name == "models", path


def _module(path: Path) -> str:
    parts = ("geoseg", *path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}
# private names allowed to cross modules (none: make a shared name public where it lives)
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _geoseg_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import of geoseg (lazy ones too); name None for ``import geoseg.x``."""
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] == "geoseg"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "geoseg":
            out += [(node.module, a.name) for a in node.names]
    return out


def _edges(path: Path) -> set[str]:
    """The geoseg modules ``path`` imports (``from geoseg.io import aoi`` is an edge to geoseg.io.aoi)."""
    out = set()
    for module, name in _geoseg_imports(path):
        sub = f"{module}.{name}" if name else None
        out.add(sub if sub in MODULES else module)
    return out & set(MODULES)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_private_names_across_modules(path: Path) -> None:
    """A module uses another module's public names only (tests may reach inside)."""
    me = _module(path)
    for module, name in _geoseg_imports(path):
        names = [name] if name else []
        names += [] if name else [module.split(".")[-1]]
        for n in names:
            if module == me or not _private(n) or (me, module, n) in KNOWN_PRIVATE:
                continue
            if f"{module}.{n}" in MODULES:  # a private module (geoseg._yaml) imported whole is a module, fine
                continue
            raise AssertionError(f"{me} imports the private name {n} from {module}; make it public there")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_within_a_package() -> None:
    """Modules of one package (geoseg.io.*, geoseg.models.*, ...) never import each other both ways, lazily or not."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        parent = module.rsplit(".", 1)[0]
        if path.name == "__init__.py":
            continue  # a package re-exporting its modules is not a circle
        graph[module] = {m for m in _edges(path) if m.rsplit(".", 1)[0] == parent and m != module and m != parent}
    assert not _cycles(graph), f"import circles: {_cycles(graph)}"
