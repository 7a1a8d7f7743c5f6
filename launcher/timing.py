"""Start-up accounting: how long the libraries took to import, and how long until the first step.

`launcher train` marks its start and imports the heavy libraries up front (they are needed anyway),
so the first-step event can say how much of the start-up was imports and how much was ours.
"""

from __future__ import annotations

import time

_start = time.perf_counter()  # this module is imported first thing by the CLI
_import_seconds = 0.0


def import_heavy_libraries() -> None:
    global _import_seconds
    began = time.perf_counter()
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    _import_seconds += time.perf_counter() - began


def import_seconds() -> float:
    return _import_seconds


def since_process_start() -> float:
    return time.perf_counter() - _start


class counted_as_import:
    """Context manager: time spent inside counts as library import time (e.g. the lazy import of a
    model architecture's module that transformers performs on first use)."""

    def __enter__(self):
        self._began = time.perf_counter()

    def __exit__(self, *exc):
        global _import_seconds
        _import_seconds += time.perf_counter() - self._began
        return False
