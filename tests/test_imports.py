"""The package's import graph: no cycle, and train is a leaf that only sweep builds on (read from
the source, lazy imports inside functions included)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_qat"


def package_imports() -> Dict[str, Set[str]]:
    """{module: the mlx_qat modules it imports}, for every module of the package."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {}
    for name in sorted(modules):
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 0 and not (base == "mlx_qat" or base.startswith("mlx_qat.")):
                    continue
                base = base.removeprefix("mlx_qat").lstrip(".")
                found |= {base.split(".")[0]} if base else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mlx_qat.")}
        graph[name] = (found & modules) - {name, "__init__"}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every cycle found by a depth-first walk (empty: the graph is acyclic)."""
    found, done = [], set()

    def walk(node: str, path: List[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            walk(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        walk(node, [])
    return found


def test_no_import_cycle():
    assert cycles(package_imports()) == []


def test_only_sweep_imports_train():
    assert [m for m, imports in package_imports().items() if "train" in imports] == ["sweep"]


if __name__ == "__main__":  # python tests/test_imports.py: the graph, module by module
    graph = package_imports()
    for module, imports in graph.items():
        print(f"{module:14} {', '.join(sorted(imports)) or '-'}")
    print(f"cycles: {cycles(graph) or 'none'}; importers of train: {[m for m, i in graph.items() if 'train' in i]}")
