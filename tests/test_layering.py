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
FLOORS = {"export": 1, "runtime": 2, "datasets": 3, "optimize": 4, "serve": 4,
          "metrics": 4, "distributed": 4, "bench": 4, "cli": 5}


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


def test_moved_modules_keep_their_old_import_paths():
    # The modules that moved into optimize/ and memory/ are still found at their old paths,
    # as the very module at the new one.
    import importlib

    import perceptual_engine

    for old, new in perceptual_engine._MOVED.items():
        assert importlib.import_module(f"perceptual_engine.{old}") is \
            importlib.import_module(f"perceptual_engine.{new}"), old
    from perceptual_engine.memory_estimate import estimate
    from perceptual_engine.optimize import optimize_image, stylize  # noqa: F401
    from perceptual_engine import memory
    assert memory.estimate is estimate


def _module_of(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its file (top level, inside
    functions, under TYPE_CHECKING): a lazy import is still a dependency. ``from . import
    losses`` depends on the module losses; ``from .spec import X`` on spec."""
    files = {_module_of(p): p for p in PKG.rglob("*.py")}

    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # A module-level __getattr__ serves old paths of names that moved (reference.TorchLPIPS):
        # it runs only when such a name is asked for, so its imports are not the module's.
        compat = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in compat:
                continue
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else owner(base))
        graph[mod] = {d for d in deps if d and d != mod and d.startswith("perceptual_engine")}
    # The package root is the public facade: it re-exports every floor lazily (by name, on
    # first use; its imports are for type checkers), so it points at nothing at import time.
    graph["perceptual_engine"] = set()
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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


def test_no_import_circles():
    # A subpackage's __init__ counts as a module: it may re-export its parts, which then
    # must not import it back.
    cycles = _cycles(_import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Where a learned head's name may be compared by hand: its own module, the registry, the
# bench (which names its peer packages), metrics.py and the demo. Everywhere else asks
# kinds.py (``kinds.get(graph).head``, a GraphKind attribute) or the head's module.
HEAD_NAME_HOMES = ("kinds.py", "metrics.py", "bench/", "cli/demo.py")


def _head_names() -> set[str]:
    from perceptual_engine import kinds

    return {k.head for k in kinds.KINDS.values() if k.head} | {k.name for k in kinds.KINDS.values() if k.head}


def _compared_names(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) where a head name is a constant compared (==, !=, in), a dict key or a
    subscript: the places that branch on it. Messages and output names are not comparisons."""
    def consts(node: ast.AST) -> list[ast.Constant]:
        if isinstance(node, ast.Constant):
            return [node]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [c for e in node.elts for c in consts(e)]
        return []

    found = []
    for node in ast.walk(ast.parse(source)):
        cands: list[ast.Constant] = []
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                cands += consts(side)
        elif isinstance(node, ast.Dict):
            cands += [k for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Subscript):
            cands += consts(node.slice)
        elif isinstance(node, ast.match_case):
            cands += [c.value for c in ast.walk(node.pattern) if isinstance(c, ast.MatchValue)
                      and isinstance(c.value, ast.Constant)]
        found += [(c.lineno, c.value) for c in cands if isinstance(c.value, str) and c.value in names]
    return found


def _head_home(rel: Path, names: set[str]) -> bool:
    text = rel.as_posix()
    own = any(rel.parts[0] == n or rel.stem == n for n in names)  # lpips.py, lpips/, dists/
    return own or any(text == h or text.startswith(h) for h in HEAD_NAME_HOMES if h.endswith("/")) \
        or text in HEAD_NAME_HOMES


def test_head_names_are_compared_only_at_home():
    names = _head_names()
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if _head_home(rel, names):
            continue
        offenders += [f"{rel}:{line} compares {name!r}"
                      for line, name in _compared_names(path.read_text(encoding="utf-8"), names)]
    assert not offenders, "head names compared by hand outside their homes:\n" + "\n".join(offenders)


def test_the_head_name_check_sees_a_comparison():
    src = 'if graph == "lpips":\n    pass\nW = {"dists": 1}\nmsg = f"lpips {x}"\nk = kinds.get("lpips")\n'
    assert _compared_names(src, {"lpips", "dists"}) == [(1, "lpips"), (3, "dists")]


def test_the_package_root_holds_at_most_15_modules():
    # The root holds the public API and the shared concepts; a concept of several modules
    # gets its folder (optimize/, memory/, lpips/, dists/, trunks/, ...).
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root) <= 15, root
