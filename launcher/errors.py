"""Errors meant for people.

Every problem a user can fix (a recipe key, a data row, a path) is raised as a ``LauncherError``:
the CLI prints its one-line message and exits with ``EXIT_USAGE`` (2), without a traceback unless
``--verbose`` is given. Anything else is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected exception (a bug, a crash, a dead rank)
EXIT_USAGE = 2  # bad input: recipe, data, paths, command line
EXIT_STOPPED = 75  # stopped on request (signal or STOP file) after writing a checkpoint: resumable


class LauncherError(Exception):
    """A problem with the user's input. The message says what, where, and how to fix it."""

    exit_code = EXIT_USAGE


class RecipeError(LauncherError):
    """The recipe (file, base chain or command-line override) is invalid."""


class DataError(LauncherError):
    """A data file or split is missing, empty, or does not match the recipe."""


class HubDataUnavailable(DataError):
    """A Hub dataset is neither in the local cache nor reachable (offline, or no network). A dry run plans
    without it (its step count unknown); anything that trains stops here."""


class ModelError(LauncherError):
    """The model path does not hold a loadable model/tokenizer."""



class HubModelUnavailable(ModelError):
    """A model, config or tokenizer named by a Hub id that this machine cannot fetch (offline, or no cache)."""

class StopRequested(Exception):
    """All ranks agreed to stop at a step and wrote a checkpoint; the run can be resumed."""

    exit_code = EXIT_STOPPED


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); not the user's input, but not a crash either."""

    exit_code = EXIT_FAILURE


class TopologyError(LauncherError):
    """The process layout (accelerate vs torch.distributed, batch arithmetic) is inconsistent."""
