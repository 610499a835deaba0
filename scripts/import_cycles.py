"""List the import cycles inside a package (default nova_rt/), read statically with `ast`; exit 1 when any exists.

    python scripts/import_cycles.py [--root nova_rt] [--max-cycles 200]

Every `import` / `from ... import` of a module of the package is an edge, wherever it sits: at module level (runs
when the module is imported) or inside a function (runs when the function is called, the usual way to break a cycle
at import time, which still leaves the two modules depending on each other). Function-level edges are marked
`[function-level in f()]`. Imports under `if TYPE_CHECKING:` are not edges (they never run). `from pkg import name`
is an edge to the submodule pkg.name when that file exists, else to pkg itself (its __init__). Importing a
submodule also runs its parents' __init__; those implicit edges are not counted (every module would depend on
nova_rt/__init__.py). Dynamic imports (importlib.import_module with a computed name) are invisible here.

Output: the strongly connected components with more than one module (or a module that imports itself), then every
simple cycle in them (each once, starting from its first module in sorted order), one edge per line.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    function: str | None  # enclosing function of a function-level import, else None

    def describe(self) -> str:
        where = f"[function-level in {self.function}()]" if self.function else "[module-level]"
        return f"{self.src} -> {self.dst}  (line {self.line}) {where}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package directory `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.module, self.is_package, self.known = module, is_package, known
        self.functions: list[str] = []
        self.edges: list[Edge] = []

    def _add(self, target: str, node: ast.AST) -> None:
        while target and target not in self.known:  # an outside module (torch -> ""), or a name in a package
            target = target.rpartition(".")[0]
        if target and target != self.module:
            fn = ".".join(self.functions) if self.functions else None
            self.edges.append(Edge(self.module, target, node.lineno, fn))

    def _function(self, node) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            pkg = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{node.module}" if node.module else pkg
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node)


def import_edges(root: Path) -> list[Edge]:
    names = module_names(root)
    known = set(names)
    edges = []
    for name, path in names.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", known)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges.extend(dict.fromkeys(visitor.edges))  # `from m import a, b` is one edge
    return edges


def strongly_connected(nodes: list[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in sorted order of their members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(succ.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return sorted(out)


def simple_cycles(comp: list[str], succ: dict[str, set[str]], limit: int) -> list[list[str]]:
    """Every simple cycle inside one component, each once: it starts at its smallest module (by sorted order)."""
    members = set(comp)
    cycles: list[list[str]] = []
    for i, start in enumerate(comp):
        allowed = set(comp[i:]) & members
        path, stack = [start], [iter(sorted(succ.get(start, set()) & allowed))]
        while stack and len(cycles) < limit:
            for w in stack[-1]:
                if w == start:
                    cycles.append(path[:])
                elif w not in path:
                    path.append(w)
                    stack.append(iter(sorted(succ.get(w, set()) & allowed)))
                    break
            else:
                stack.pop()
                path.pop()
    return cycles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(REPO / "nova_rt"), help="package directory (default: nova_rt/)")
    p.add_argument("--max-cycles", type=int, default=200, help="print at most this many simple cycles")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    edges = import_edges(root)
    succ: dict[str, set[str]] = {}
    by_pair: dict[tuple[str, str], list[Edge]] = {}
    for e in edges:
        succ.setdefault(e.src, set()).add(e.dst)
        by_pair.setdefault((e.src, e.dst), []).append(e)
    comps = [c for c in strongly_connected(sorted(module_names(root)), succ)
             if len(c) > 1 or c[0] in succ.get(c[0], ())]
    print(f"{len(module_names(root))} modules, {len(edges)} internal imports "
          f"({sum(e.function is not None for e in edges)} function-level)")
    if not comps:
        print(f"no import cycles in {root.name}/")
        return 0
    print(f"{len(comps)} group(s) of modules that import each other (strongly connected components):")
    for comp in comps:
        print(f"  {', '.join(comp)}")
    print("cycles:")
    shown = 0
    for comp in comps:
        for cyc in simple_cycles(comp, succ, args.max_cycles - shown):
            shown += 1
            hops = list(zip(cyc, cyc[1:] + cyc[:1]))
            # a cycle whose every hop has a module-level import can fail at import time (partly initialised module)
            kind = ("module-level: every hop runs at import time"
                    if all(any(not e.function for e in by_pair[h]) for h in hops)
                    else "closed by function-level imports")
            print(f"  cycle {shown}: {' -> '.join(cyc + cyc[:1])}  ({kind})")
            for h in hops:
                for e in by_pair[h]:
                    print(f"      {e.describe()}")
    if shown >= args.max_cycles:
        print(f"  ... stopped after {args.max_cycles} cycles (--max-cycles)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
