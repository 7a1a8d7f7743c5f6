"""The run directory: what is written where, and always atomically (temp file/dir + rename).

Layout (README "What is written where"):
    recipe.yaml          the fully resolved recipe
    deepspeed_config.json  the generated DeepSpeed config (DeepSpeed strategies only)
    metrics.jsonl        one line per log/eval event
    metrics.json         final validation and test metrics (+ best checkpoint info)
    predictions/test.jsonl  per-example test predictions
    model/               exported model + tokenizer (safetensors), loadable by transformers
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LauncherError
from ..paths import resolve_path

# Files a previous run may have left; removed when output.overwrite=true so nothing stale mixes in.
RUN_ARTIFACTS = ("recipe.yaml", "deepspeed_config.json", "metrics.jsonl", "metrics.json", "predictions", "model")


def output_dir_for(recipe) -> Path:
    return resolve_path(str(recipe.output_dir()))


def check_output_dir(recipe) -> Path:
    """Refuse (before anything is written) a directory that holds another run, or one we cannot write."""
    path = output_dir_for(recipe)
    if path.exists() and not path.is_dir():
        raise LauncherError(f"output.dir: {path} exists and is not a directory; choose another output.dir")
    if path.exists() and (path / "recipe.yaml").exists() and not recipe.output.overwrite:
        raise LauncherError(
            f"output.dir: {path} already holds a run; set output.overwrite=true to replace it, "
            f"or choose another output.dir"
        )
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LauncherError(f"output.dir: cannot write to {probe} (permission denied); choose another output.dir")
    return path


def prepare_output_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in RUN_ARTIFACTS:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl_atomic(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def replace_dir_atomic(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``; a reader sees the old or the new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
