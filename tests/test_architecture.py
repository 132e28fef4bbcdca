"""The import graph that docs/architecture.md promises: no arrow back up, one importer of the native module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "python" / "dppo"
SHARED = ("dppo._lazy", "dppo.errors", "dppo.engine", "dppo.artifacts", "dppo.modeling", "dppo.distributed",
          "dppo.synthetic", "dppo.console")
STAGES = ("dppo.data", "dppo.train", "dppo.generate", "dppo.eval")  # in pipeline order


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``dppo...`` module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dppo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dppo"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if node.module == "dppo"}
    return found


def _floor(module: str) -> str:
    if module.startswith("dppo.cli") or module == "dppo.__main__":
        return "cli"
    if module.startswith(("dppo.demo", "dppo.curriculum")):
        return "demo"  # compositions of the stages
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return stage
    if module == "dppo._native":
        return "native"
    if module in SHARED or module.startswith(tuple(s + "." for s in SHARED)) or module == "dppo":
        return "shared"
    raise AssertionError(f"{module}: not placed in docs/architecture.md's floors")


def test_no_import_points_back_up_the_pipeline():
    graph = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts}
    assert len(graph) > 25
    problems = []
    for module, imported in graph.items():
        mine = _floor(module)
        for target in imported:
            theirs = _floor(target)
            if theirs == "native" and module != "dppo.engine":
                problems.append(f"{module} imports dppo._native (only dppo.engine may)")
            elif mine == "shared" and theirs in (*STAGES, "demo", "cli"):
                problems.append(f"{module} (shared) imports the stage {target}")
            elif mine in STAGES and theirs in STAGES and STAGES.index(theirs) > STAGES.index(mine):
                problems.append(f"{module} imports the later stage {target}")
            elif mine in STAGES and theirs in ("demo", "cli"):
                problems.append(f"{module} imports {target}")
    assert not problems, "\n".join(problems)


def test_neither_generation_nor_evaluation_needs_the_trainer():
    for stage in ("generate", "eval"):
        for path in (ROOT / stage).glob("*.py"):
            assert not any(t.startswith("dppo.train") for t in _imports(path)), path
