"""Imports point down: nothing below the command line imports from ``cli/``."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "perceptual_engine"


def _imports(path: Path, source: str | None = None) -> list[str]:
    """Absolute module names imported by one file (relative imports resolved)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from
    source = path.read_text(encoding="utf-8") if source is None else source
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def test_nothing_below_cli_imports_it():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "cli":
            continue
        for mod in _imports(path):
            if mod == "perceptual_engine.cli" or mod.startswith("perceptual_engine.cli."):
                offenders.append(f"{rel} imports {mod}")
    assert not offenders, "imports that point up into cli/:\n" + "\n".join(offenders)


def test_the_checker_sees_relative_imports():
    # A file in datasets/ importing "..cli.main" resolves to perceptual_engine.cli.main.
    probe = PKG / "datasets" / "probe.py"
    assert "perceptual_engine.cli.main" in _imports(probe, "from ..cli.main import main\n")
    assert "perceptual_engine.datasets.pairs" in _imports(PKG / "datasets" / "__init__.py",
                                                          "from .pairs import Pair\n")


# Floors, bottom to top: the shared concepts at the package's top level (errors, spec,
# layers, weights, losses, backward, the metric heads, memory, images, ...), then export/,
# runtime/, datasets/, then the users of all of them (optimize, metrics, distributed/,
# bench/), and cli/ on top. An import may point to its own floor or below, never up.
FLOORS = {"export": 1, "runtime": 2, "datasets": 3, "optimize": 4, "optimize_config": 4, "serve": 4,
          "optimize_loop": 4, "optimize_guard": 4, "optimize_images": 4,
          "savepaths": 4, "metrics": 4, "distributed": 4, "bench": 4, "cli": 5}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "perceptual_engine" or len(parts) < 2:
        return None  # another package, or the package root (lazy re-exports only)
    return FLOORS.get(parts[1], 0)


def test_imports_point_down_the_floors():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts == ("__init__.py",):
            continue  # the public API re-exports every floor, lazily
        me = _floor(".".join(("perceptual_engine", *rel.with_suffix("").parts)))
        for mod in _imports(path):
            floor = _floor(mod)
            if floor is not None and floor > me:
                offenders.append(f"{rel} (floor {me}) imports {mod} (floor {floor})")
    assert not offenders, "imports that point up a floor:\n" + "\n".join(sorted(set(offenders)))


def test_the_floor_check_sees_an_upward_import():
    probe = PKG / "lpips.py"
    ups = [m for m in _imports(probe, "from .export.metadata import GRAPH_KINDS\n")
           if (_floor(m) or 0) > 0]
    assert "perceptual_engine.export.metadata" in ups
