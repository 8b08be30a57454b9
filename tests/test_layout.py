"""The house: stages import only from stages before them, no import circles (deferred imports
included), and the planning core imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "planner"

STAGES = {  # the flow, in order; a module may import its own stage and the ones before it
    "errors": 0, "units": 0,
    "profile": 1,
    "workload": 2,
    "estimate": 3,
    "speed": 4,
    "search": 5,
    "plan": 6,
    "writers": 7,
    "explain": 8, "launch": 8, "train": 8, "judge": 8,
    "cli": 9,
}
"""explain, launch, train and judge are siblings: each uses the plan and the stages before it,
none another (the CLI joins them)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every planner module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("planner"):
            if node.module == "planner":
                out.update(f"planner.{a.name}" for a in node.names)
            else:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)  # a submodule imported by name
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("planner"))
    return out


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _stage(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in _imports(path) if m in MODULES and m != name}
    return graph


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "planner"))
def test_imports_follow_the_flow(module: str):
    stage = _stage(module)
    if stage == "profiles":
        return
    assert stage in STAGES, f"{module}: a stage the flow does not name"
    for dep in _graph()[module]:
        dep_stage = _stage(dep)
        if dep == "planner" or dep_stage == stage:
            continue
        assert STAGES[dep_stage] < STAGES[stage], f"{module} imports {dep}: a later or sibling stage"


def test_no_import_circles():
    graph = _graph()
    # package __init__ modules import their own submodules; a circle through one is still a circle
    seen: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if seen.get(dep) == 1:
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    assert circles == []


def test_planning_imports_no_torch():
    """estimate, tune and explain are pure planning: importing their commands and running the
    reference estimate loads neither torch nor transformers."""
    code = ("import sys; from planner.cli import main\n"
            "try:\n    main(['estimate', '--gpus', '2x3090', '--host-ram', '64GiB', '--json'])\n"
            "except SystemExit:\n    pass\n"
            "import planner.cli.tune, planner.cli.explain\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules)\n"
            "print('HEAVY', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-2000:]
