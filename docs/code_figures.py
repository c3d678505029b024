"""The architecture page's figures of a checkout: lines per folder, import levels and the imports
that run back up, the longest functions and the longest parameter lists.

    python docs/code_figures.py [ROOT]        (default: this checkout)

Levels: the longest chain of imports between the project's modules, after folding every
import cycle into one node. A back-up arrow is an import of a module that itself, directly or
through others, imports the importer (an edge inside a cycle). Imports inside functions count:
they run too.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("shared", "training", "gui")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
    return targets


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return components


def levels(graph: dict[str, set[str]]) -> tuple[int, list[str]]:
    """(levels, the imports inside cycles)."""
    components = strongly_connected(graph)
    home = {v: i for i, c in enumerate(components) for v in c}
    back = sorted(f"{v} -> {w}" for v, ws in graph.items() for w in ws if home[v] == home[w])
    depth: dict[int, int] = {}
    for i, component in enumerate(components):  # Tarjan yields dependencies first
        below = [depth[home[w]] for v in component for w in graph[v] if home[w] != i]
        depth[i] = 1 + max(below, default=0)
    return max(depth.values(), default=0), back


def functions(name: str, tree: ast.AST) -> list[tuple[int, int, str]]:
    """(lines, parameters, qualified name) of every function and method."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}.{child.name}")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = child.args
                params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs
                          if a.arg not in ("self", "cls")]
                params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                found.append((child.end_lineno - child.lineno + 1, len(params),
                              f"{prefix}.{child.name}"))
                visit(child, f"{prefix}.{child.name}")
            else:
                visit(child, prefix)

    visit(tree, name)
    return found


def report(root: Path) -> str:
    mods = modules(root)
    trees = {name: ast.parse(path.read_text()) for name, path in mods.items()}
    graph = {name: imports(name, tree, set(mods)) for name, tree in trees.items()}
    folders: dict[str, int] = defaultdict(int)
    files: dict[str, int] = defaultdict(int)
    for path in mods.values():
        folder = str(path.parent.relative_to(root))
        folders[folder] += sum(1 for line in path.read_text().splitlines() if line.strip())
        files[folder] += 1
    depth, back = levels(graph)
    funcs = [f for name, tree in trees.items() for f in functions(name, tree)]
    lines = ["| folder | files | lines (non-blank) |", "|---|---|---|"]
    lines += [f"| `{f}/` | {files[f]} | {folders[f]:,} |" for f in sorted(folders)]
    lines += ["", f"import levels: {depth}; imports inside a cycle: {len(back)}"
              + (f" ({', '.join(back)})" if back else ""), "",
              "longest functions: " + ", ".join(f"`{n}` {ln}" for ln, _, n in
                                                 sorted(funcs, reverse=True)[:5]),
              "longest parameter lists: " + ", ".join(
                  f"`{n}` {p}" for _, p, n in sorted(funcs, key=lambda f: (-f[1], f[2]))[:5]),
              f"functions with more than 8 parameters: {sum(1 for f in funcs if f[1] > 8)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)))
