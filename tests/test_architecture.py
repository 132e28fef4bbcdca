"""The import graph that docs/architecture.md promises: no arrow back up, the shared floors in their
order, one importer of the native module, a command line that imports the library only to run a command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "python" / "dppo"
# in docs/architecture.md's order: each imports only those before it
SHARED = ("dppo._lazy", "dppo.engine", "dppo.errors", "dppo.artifacts", "dppo.modeling", "dppo.distributed",
          "dppo.synthetic", "dppo.console")
CLI = ROOT.parents[1] / "cli"
# what the command line needs to define its commands (options' help texts, the loss registry's options)
CLI_AT_IMPORT = ("dppo.train.config", "dppo.train.registry")
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
    if module.startswith(("dppo.demo", "dppo.curriculum", "dppo.online")):
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


def _shared_module(module: str) -> str | None:
    return next((s for s in SHARED if module == s or module.startswith(s + ".")), None)


def test_shared_floors_import_only_those_before_them():
    problems = []
    for path in ROOT.rglob("*.py"):
        mine = _shared_module(_module_name(path))
        if mine is None:
            continue
        for target in _imports(path):
            theirs = _shared_module(target)
            if theirs is not None and SHARED.index(theirs) > SHARED.index(mine):
                problems.append(f"{_module_name(path)} imports {target}, listed after {mine}")
    assert not problems, "\n".join(problems)


def _module_level_imports(tree: ast.Module) -> set[str]:
    """The ``dppo...`` modules a file imports when it is imported (not inside a function or class)."""
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dppo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dppo"):
            found.add(node.module)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def test_the_command_line_imports_the_library_in_command_bodies():
    paths = sorted(CLI.rglob("*.py"))
    assert len(paths) >= 4
    problems = []
    for path in paths:
        tree = ast.parse(path.read_text())
        for target in _module_level_imports(tree):
            if not target.startswith("dppo.cli") and target not in CLI_AT_IMPORT:
                problems.append(f"{path.name} imports {target} when it is imported")
        for target in _imports(path):
            if target.startswith(("dppo._native", "dppo.engine")):
                problems.append(f"{path.name} imports {target} (the command line reaches the engine through the library)")
    assert not problems, "\n".join(problems)


def test_the_command_line_starts_without_torch():
    code = ("import sys, dppo.cli.main; "
            "print(' '.join(m for m in ('torch', 'transformers', 'datasets', 'polars') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
