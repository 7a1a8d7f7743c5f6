"""Recipe launcher: declarative YAML recipes for distributed fine-tuning of pretrained language models.

This package root is the composition root: importing it registers the tasks (launcher/tasks) with
the recipe schema, so a recipe can be loaded from any module without that module importing tasks.
"""

from . import timing  # first: marks the process start for start-up accounting

with timing.counted_as_import():  # torch and transformers come in with the tasks
    from . import tasks  # noqa: F401,E402
