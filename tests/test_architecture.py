"""Dependencies point one way: no import cycle among `surgery/` modules, and no module imports a layer
above its own (docs/architecture.md draws the same order).

Read from the source with `ast` (nothing is imported), so every import counts wherever it is written:
at module level, inside a function (a lazy import is still a dependency: it only moves the failure to
run time) and under `if TYPE_CHECKING:` (a type is a dependency too; such imports are left out of the
cycle check only, since they never run). Imports by computed name (`importlib.import_module(f"...")`,
how `surgery.cli` collects the commands) are invisible here, which is why the cli and the commands
share the top rank.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SURGERY = Path(__file__).resolve().parents[1] / "surgery"

# The layers, bottom first. A module may import modules of its own rank and below, never above. A name
# covers its package (the longest name that prefixes a module wins); the root package `surgery` is only
# its own __init__ (the version).
RANKS: dict[str, int] = {
    # 0 - words every layer uses; nothing of surgery below them
    "surgery": 0,
    "surgery.errors": 0,
    "surgery.jsonio": 0,
    "surgery.faults": 0,
    "surgery.humanize": 0,
    "surgery.lock": 0,  # one lock per directory a command writes (errors, faults)
    "surgery.compat": 0,  # the transformers versions we claim: keyword shims and the floor (errors)
    "surgery.synth": 0,  # a tiny random checkpoint from transformers (demo and tests); imports nothing of surgery
    # 1 - safetensors files: headers, reads, streaming writes, FP8 / W4A16 tensor formats
    "surgery.checkpoint": 1,
    # 2 - what a checkpoint is: the family table, MoEModel, the consistency rules, the decoder-layer builder
    "surgery.arch": 2,
    # 3 - calibration data, the layer engine, saliency observers (peers)
    "surgery.data": 3,
    "surgery.executor": 3,
    "surgery.saliency": 3,
    # 4 - plans: kept counts and routing rules, making, validating, files
    "surgery.plan": 4,
    # 5 - what a plan or a checkpoint becomes: rewrite, quantization, evaluation (peers)
    "surgery.rewrite": 5,
    "surgery.quant": 5,
    "surgery.eval": 5,
    # 6 - reports for people (`inspect` only reports)
    "surgery.report": 6,
    "surgery.inspect": 6,
    # 7 - the stages `prune` strings together
    "surgery.pipeline": 7,
    # 8 - the command line
    "surgery.commands": 8,
    "surgery.cli": 8,
    "surgery.__main__": 8,
}

# Edges that break the order on purpose, each with why and until when; (importing module, imported
# module or package). Never a module cycle: those have no exceptions. A listed edge that no longer
# exists fails the test, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    kind: str  # "" (module level), "lazy" (inside a function) or "type" (under TYPE_CHECKING)

    def __str__(self) -> str:
        where = self.src.replace(".", "/") + f".py:{self.line}"
        return f"{self.src} -> {self.dst} ({where}{', ' + self.kind if self.kind else ''})"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py under `root` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The modules of `modules` an import statement of module `name` loads (its own package's included)."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for target in wanted:
        while target and target not in modules:  # `import surgery.x.y` names a module; `from m import f` names m
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append(target)
    return out


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import between `modules`, with where it is written and whether it is lazy or type-only."""
    edges = []

    def visit(node: ast.AST, name: str, is_package: bool, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                edges.extend(Edge(name, t, child.lineno, kind)
                             for t in dict.fromkeys(_targets(child, name, is_package, modules)))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit(ast.Module(body=[sub], type_ignores=[]), name, is_package, "type")
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), name, is_package, kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, name, is_package, kind or "lazy")
            else:
                visit(child, name, is_package, kind)

    for name, path in modules.items():
        visit(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", "")
    return edges


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One import cycle as its edges (a -> b, b -> c, c -> a), or None. Type-only imports never run, so
    they cannot form one."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.kind != "type":
            graph.setdefault(e.src, []).append(e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def walk(node: str) -> list[Edge] | None:
        state[node] = 1
        for e in sorted(graph.get(node, []), key=lambda e: (e.dst, e.line)):
            if state.get(e.dst) == 1:
                start = next(i for i, p in enumerate(path) if p.src == e.dst)
                return [*path[start:], e]
            if e.dst not in state:
                path.append(e)
                found = walk(e.dst)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def rank_of(module: str, ranks: dict[str, int]) -> int | None:
    if module in ranks:
        return ranks[module]
    best = max((k for k in ranks if k != "surgery" and module.startswith(k + ".")), key=len, default=None)
    return ranks[best] if best else None


def _allowed(e: Edge, allowed: dict[tuple[str, str], str]) -> bool:
    return any(e.src == src and (e.dst == dst or e.dst.startswith(dst + ".")) for src, dst in allowed)


def upward_edges(edges: list[Edge], ranks: dict[str, int], allowed: dict[tuple[str, str], str]) -> list[str]:
    """Each import of a higher rank than the importer's, not listed in `allowed`, as a line naming it."""
    out = []
    for e in edges:
        src, dst = rank_of(e.src, ranks), rank_of(e.dst, ranks)
        if src is not None and dst is not None and dst > src and not _allowed(e, allowed):
            out.append(f"{e} imports rank {dst} from rank {src}")
    return out


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: surgery.plan.make -> surgery.plan."""
    return ".".join(module.split(".")[:2])


def package_cycle(edges: list[Edge], allowed: dict[tuple[str, str], str]) -> list[Edge] | None:
    """Peers of one rank may import each other, but only one way: a cycle among packages (through any of
    their modules, outside `allowed`) as module edges that make it, or None."""
    collapsed: dict[tuple[str, str], Edge] = {}
    for e in edges:
        if _unit(e.src) != _unit(e.dst) and e.kind != "type" and not _allowed(e, allowed):
            collapsed.setdefault((_unit(e.src), _unit(e.dst)), e)
    cycle = find_cycle([Edge(a, b, e.line, "") for (a, b), e in collapsed.items()])
    return None if cycle is None else [collapsed[(c.src, c.dst)] for c in cycle]


# ------------------------------------------------------------------------------------------ the real code
@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    modules = module_names(SURGERY)
    return modules, import_edges(modules)


def test_the_graph_is_read(graph):
    """Guards the checks below against passing on an empty or half-read graph: known edges of each kind."""
    modules, edges = graph
    assert len(modules) > 80
    found = {(e.src, e.dst, e.kind) for e in edges}
    assert ("surgery.arch.model", "surgery.arch.consistency", "lazy") in found  # inside MoEModel.__init__
    assert ("surgery.arch.consistency", "surgery.arch.model", "type") in found  # under TYPE_CHECKING
    assert ("surgery.rewrite.run", "surgery.plan.validate", "") in found
    assert ("surgery.plan.make", "surgery.plan.counts", "") in found


def test_every_module_has_a_rank(graph):
    modules, _ = graph
    unranked = sorted(m for m in modules if rank_of(m, RANKS) is None)
    assert not unranked, f"give these modules a rank in RANKS (and docs/architecture.md): {unranked}"


def test_no_import_cycle(graph):
    _, edges = graph
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle:\n  " + "\n  ".join(map(str, cycle))


def test_no_upward_import(graph):
    _, edges = graph
    bad = upward_edges(edges, RANKS, ALLOWED)
    assert not bad, "imports that point up the layers (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_peer_packages_import_one_way(graph):
    _, edges = graph
    cycle = package_cycle(edges, ALLOWED)
    assert cycle is None, "packages that import each other:\n  " + "\n  ".join(map(str, cycle))


def test_every_exception_is_still_needed(graph):
    _, edges = graph
    stale = [k for k in ALLOWED if not any(_allowed(e, {k: ""}) for e in edges)]
    assert not stale, f"ALLOWED lists edges that no longer exist; remove them: {stale}"


# ------------------------------------------------------------------------- the checker on made-up code
def _package(tmp_path: Path, files: dict[str, str]) -> list[Edge]:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return import_edges(module_names(root))


def test_a_lazy_import_cycle_is_found(tmp_path):
    edges = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    from pkg import c\n    return c\n",
        "c.py": "import pkg.a\n",
    })
    cycle = find_cycle(edges)
    assert cycle is not None
    assert [(e.src, e.dst) for e in cycle] == [("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.a")]
    assert str(cycle[1]) == "pkg.b -> pkg.c (pkg/b.py:2, lazy)"


def test_type_only_and_relative_imports(tmp_path):
    edges = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "from . import a\nfrom .sub.c import g\n",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\n",
    })
    kinds = {(e.src, e.dst): e.kind for e in edges}
    assert kinds == {("pkg.a", "pkg.b"): "type", ("pkg.b", "pkg.a"): "", ("pkg.b", "pkg.sub.c"): "",
                     ("pkg.sub.c", "pkg.a"): ""}
    assert find_cycle(edges) is None  # a <-> b only through a type-only import


def test_an_upward_import_is_named():
    ranks = {"pkg.low": 0, "pkg.high": 1}
    up = Edge("pkg.low.x", "pkg.high.y", 7, "lazy")
    down = Edge("pkg.high.y", "pkg.low.x", 3, "")
    assert upward_edges([up, down], ranks, {}) == [
        "pkg.low.x -> pkg.high.y (pkg/low/x.py:7, lazy) imports rank 1 from rank 0"]
    assert upward_edges([up, down], ranks, {("pkg.low.x", "pkg.high"): "why"}) == []


def test_peer_packages_both_ways_are_found():
    edges = [Edge("s.p.a", "s.q.b", 1, ""), Edge("s.q.c", "s.p.d", 2, "lazy"), Edge("s.q.b", "s.r.e", 3, "")]
    cycle = package_cycle(edges, {})
    assert cycle is not None and {(e.src, e.dst) for e in cycle} == {("s.p.a", "s.q.b"), ("s.q.c", "s.p.d")}
    assert package_cycle(edges, {("s.q.c", "s.p"): "why"}) is None
