"""Task registry: every module in this package that defines a Task subclass with a `name` and
`registered = True` is a task a recipe can name (`task: <name>`). Adding a task = adding a module;
nothing here changes."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Task


def _discover() -> dict[str, type[Task]]:
    found: dict[str, type[Task]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Task) and value.__dict__.get("registered"):
                found[value.name] = value
    return found


TASKS: dict[str, type[Task]] = _discover()

__all__ = ["TASKS", "Task"]
