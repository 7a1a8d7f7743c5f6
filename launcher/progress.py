"""Progress you can see: rich progress bars on rank 0 when stdout is a terminal (tokenizing, training,
evaluating/generating, writing checkpoints and exports). Off a terminal (Slurm .out files, CI, pipes)
and on every other rank it shows nothing: the log lines every ``training.log_every`` steps are the
record there.

One rich ``Progress`` display is shared by all bars (rich allows one live display at a time): a bar
started while another runs (evaluation inside training) appears below it.
"""

from __future__ import annotations

from contextlib import contextmanager


class Bar:
    """One bar; every method is a no-op when progress is not shown."""

    def __init__(self, owner: "Progress | None" = None, task_id=None):
        self._owner, self._task_id = owner, task_id

    @property
    def shown(self) -> bool:
        return self._owner is not None

    def advance(self, amount: float = 1) -> None:
        if self._owner is not None:
            self._owner._display.advance(self._task_id, amount)

    def update(self, status: str) -> None:
        """The text after the bar (e.g. the latest loss and throughput)."""
        if self._owner is not None:
            self._owner._display.update(self._task_id, status=status)

    def done(self) -> None:
        if self._owner is not None:
            self._owner._remove(self._task_id)
            self._owner = None


class Progress:
    def __init__(self, console, enabled: bool):
        self.enabled = enabled and console.is_terminal and not console.is_dumb_terminal
        self._display = None
        self._console = console
        self._live_tasks: set = set()

    def start(self, description: str, total: float | None = None, completed: float = 0, status: str = "") -> Bar:
        if not self.enabled:
            return Bar()
        if self._display is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._display = RichProgress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self._console, transient=True,
            )
        if not self._live_tasks:
            self._display.start()
        task_id = self._display.add_task(description, total=total, completed=completed, status=status)
        self._live_tasks.add(task_id)
        self._display.refresh()  # drawn at least once, however short the work (the display redraws at 10 Hz)
        return Bar(self, task_id)

    @contextmanager
    def task(self, description: str, total: float | None = None):
        bar = self.start(description, total)
        try:
            yield bar
        finally:
            bar.done()

    def _remove(self, task_id) -> None:
        self._display.remove_task(task_id)
        self._live_tasks.discard(task_id)
        if not self._live_tasks:
            self._display.stop()

    def close(self) -> None:
        """Stop the display (a run that ends by an exception leaves no live bar behind)."""
        for task_id in list(self._live_tasks):
            self._remove(task_id)
