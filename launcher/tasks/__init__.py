"""Task registry: every module in this package that defines a Task subclass with a `name` and
`registered = True` is a task a recipe can name (`task: <name>`). Adding a task = adding a module;
nothing here changes. Registering hands the recipe schema what it validates against (task names,
metric names, each task's own settings section) without the schema importing any task."""

from __future__ import annotations

import importlib
import pkgutil

from ..schema import SettingsSection, TaskSpec, register_section, register_task
from .base import Task


def _discover() -> dict[str, type[Task]]:
    found: dict[str, type[Task]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if not (isinstance(value, type) and issubclass(value, Task)):
                continue
            if value.__dict__.get("settings_key"):
                register_section(SettingsSection(value.settings_key, value.settings_schema, value.settings_description))
            if value.__dict__.get("registered"):
                found[value.name] = value
                register_task(TaskSpec(value.name, dict(value.metric_keys), tuple(value.default_metrics)))
    return found


TASKS: dict[str, type[Task]] = _discover()

__all__ = ["TASKS", "Task"]
