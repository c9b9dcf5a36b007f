"""The package layout keeps data flowing one way: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "geoseg"
ORDER = ["grid", "io", "models", "engine", "vector", "evaluate", "recipes", "effects", "sequences", "change", "workflows", "cli"]
# third-party imports each layer must not make (anywhere in the module, lazy or not)
FORBIDDEN = {
    "grid": {"rasterio", "torch", "dask", "distributed", "onnxruntime", "xarray", "geopandas"},
    "io": {"torch", "dask", "distributed", "onnxruntime"},
    "models": {"dask", "distributed", "rasterio"},
    "vector": {"torch", "onnxruntime"},
}


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
    rank = ORDER.index(layer)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "geoseg" and len(parts) > 1 and parts[1] in ORDER:
            assert ORDER.index(parts[1]) <= rank, f"{path.name} ({layer}) imports {name}"
        assert parts[0] not in FORBIDDEN.get(layer, set()), f"{path.name} ({layer}) imports {name}"


def test_torch_only_in_models() -> None:
    for path in PKG.rglob("*.py"):
        if "torch" in {n.split(".")[0] for n in _imports(path)}:
            assert path.parent.name == "models", path
