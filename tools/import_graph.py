"""Import graph of the project's own packages, from the source (no imports executed).

    python tools/import_graph.py            # package edges, module cycles, engine -> seg check
    python tools/import_graph.py --modules  # every module-to-module edge as well

Counts every ``import`` in a module, function-local ones included: a lazy import hides a
dependency from a reader of the file header but not from this graph. Used to draw the
structure before and after a refactor (docs/import-graph.md).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "seg", "experiments", "jobs")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` counts a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges.get(v, ()):
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

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_edges(edges: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for a, targets in edges.items():
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                counts[(pa, pb)] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="also list every module-to-module edge")
    args = parser.parse_args(argv)
    edges = graph()
    print("package -> package (module-level edges, lazy imports included)")
    for (a, b), n in sorted(package_edges(edges).items()):
        print(f"  {a:12s} -> {b:12s} {n:3d}")
    found = cycles(edges)
    print(f"module cycles: {len(found)}")
    for comp in found:
        print("  " + " <-> ".join(comp))
    if args.modules:
        for a in sorted(edges):
            for b in sorted(edges[a]):
                print(f"  {a} -> {b}")
    bad = [(a, b) for (a, b) in package_edges(edges) if a == "engine" and b in ("seg", "experiments", "jobs")]
    print("engine depends only on itself: " + ("yes" if not bad else f"NO ({bad})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
