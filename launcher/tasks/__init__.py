"""Task registry: recipe `task:` name -> Task class."""

from .base import Task
from .classification import SequenceClassificationTask

TASKS: dict[str, type[Task]] = {
    SequenceClassificationTask.name: SequenceClassificationTask,
}

__all__ = ["TASKS", "Task"]
