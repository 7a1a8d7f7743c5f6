"""The shape of the package: imports point down, and nothing imports in a circle.

Layers, top to bottom (docs/architecture.md): the command line, launching, the per-rank engine, what the
engine drives (tasks, data, fine-tuning methods, model loading), the recipe and the plan, and leaves. A
module may import modules of its own layer or below - never above, not even inside a function (an import
hidden in a function to dodge a circle is still a circle) - and module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "launcher"

# Highest first. A module is matched by its dotted name or by a package prefix ("launcher.tasks.").
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("launcher", "launcher.__main__", "launcher.cli")),
    ("launch", ("launcher.launch", "launcher.launch.")),
    ("engine", ("launcher.engine", "launcher.engine.")),
    ("work", ("launcher.tasks.", "launcher.tasks", "launcher.data", "launcher.finetune", "launcher.model_io",
              "launcher.report", "launcher.model_card")),
    ("recipe", ("launcher.recipe", "launcher.schema", "launcher.schema_doc", "launcher.plan", "launcher.memory", "launcher.sampling",
                "launcher.tracking")),
    ("leaves", ("launcher.errors", "launcher.paths", "launcher.files", "launcher.timing", "launcher.faults",
                "launcher.metrics", "launcher.squad", "launcher.progress", "launcher.versions", "launcher.forgetting")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".") and module.startswith(pattern)):
                return rank
    raise AssertionError(f"{module} is in no layer of tests/unit/test_architecture.py; add it where it belongs")


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported launcher module, line, inside a function) for every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target == "launcher" or target.startswith("launcher."):
                    # `from . import x` / `from .tasks import TASKS`: the name may be a submodule
                    for alias in child.names:
                        candidate = f"{target}.{alias.name}"
                        found.append((candidate if _is_module(candidate) else target, child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "launcher" or alias.name.startswith("launcher."):
                        found.append((alias.name, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_no_import_points_up():
    upward = []
    for module, path in all_modules().items():
        for target, line, in_function in imports_of(path):
            if layer_of(target) < layer_of(module):
                where = "inside a function" if in_function else "at module level"
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                              f"imports {target} ({LAYERS[layer_of(target)][0]}) {where}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {module: {t for t, _, _ in imports_of(path) if t != module} for module, path in all_modules().items()}
    # A package's __init__ importing its own submodules is how packages work, not a circle.
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                if not _package_and_child(cycle):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def _package_and_child(cycle: list[str]) -> bool:
    return len(set(cycle)) == 2 and any(a.startswith(b + ".") or b.startswith(a + ".") for a in cycle for b in cycle)


def test_no_launcher_import_hides_in_a_function():
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}"
              for module, path in all_modules().items()
              for target, line, in_function in imports_of(path) if in_function]
    assert not hidden, "imports of launcher modules inside functions (import at the top instead):\n" + "\n".join(hidden)


@pytest.mark.parametrize("bad, expected", [
    ("from ..engine.run import FineTuneRun\n", "imports launcher.engine.run (engine) at module level"),
    ("def f():\n    from ..launch.plan import build_plan\n", "imports launcher.launch.plan (launch) inside a function"),
])
def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch, bad, expected):
    """The rule above can fail: a task module that reaches into the engine or the launcher is reported."""
    fake = PACKAGE / "tasks" / "_architecture_probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: bad if self == fake else Path.read_bytes(self).decode())
    found = imports_of(fake)
    module = module_name(fake)
    messages = [f"imports {t} ({LAYERS[layer_of(t)][0]}) {'inside a function' if f else 'at module level'}"
                for t, _, f in found if layer_of(t) < layer_of(module)]
    assert any(expected in message for message in messages), messages


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (rootdir-relative, no packages): two test_x.py in
    tests/unit and tests/integration stop the whole session at collection."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
