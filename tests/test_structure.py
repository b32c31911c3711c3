"""Imports flow one way (issue 12): each part of the package imports only parts below it, at module
level. The order is docs/model.md's ("Package layout"); only the CLI imports a subcommand's
modules when that subcommand runs (so that ``adaptivision --help`` starts fast)."""
import ast
import pathlib

import adaptivision

ROOT = pathlib.Path(adaptivision.__file__).parent
RANK = {"__init__": 99, "__main__": 99, "cli": 90,
        "experiments": 80, "dense": 70, "train": 60, "benchmark": 60, "visualize": 60, "export": 60,
        "timing": 50, "checkpoint": 50, "models": 40, "budget": 30, "profile": 20, "objective": 20,
        "guidance": 20, "data": 20, "reduction": 15, "layers": 10, "config": 0, "provenance": 5, "version": -1}
LAZY_OK = {"cli"}


def _imports():
    """(importer unit, imported unit, line, inside a function?) for every relative import."""
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        unit = rel[0]
        package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = list(base) + (node.module.split(".") if node.module else [])
                if not target:  # from . import x at the top of the package
                    target = [node.names[0].name]
                yield unit, target[0], f"{path.relative_to(ROOT)}:{node.lineno}", node.col_offset > 0


def test_every_part_of_the_package_has_a_rank():
    units = {p.relative_to(ROOT).with_suffix("").parts[0] for p in ROOT.rglob("*.py")}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_imports_flow_one_way_and_at_module_level():
    up = [f"{where}: {a} imports {b}" for a, b, where, _ in _imports()
          if a != b and b in RANK and RANK[a] <= RANK[b]]
    assert not up, up
    late = [f"{where}: {b}" for a, b, where, inner in _imports() if inner and a not in LAZY_OK]
    assert not late, late
