"""The run directory: what is written where, and always atomically (temp file/dir + rename).

Layout (README "What is written where"):
    recipe.yaml          the fully resolved recipe
    deepspeed_config.json  the generated DeepSpeed config (DeepSpeed strategies only)
    metrics.jsonl        one line per log/eval event
    metrics.json         final validation and test metrics (+ best checkpoint info)
    status.json          running / stopped (resumable) / finished, with the step
    checkpoints/         resumable checkpoints and the best weights (see engine/checkpoint.py)
    STOP                 create this file to make all ranks agree on a step, checkpoint and exit
    predictions/test.jsonl  per-example test predictions
    model/               exported model + tokenizer (safetensors), loadable by transformers
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import LauncherError
from ..paths import resolve_path
from ..recipe import recipe_base_dir
from ..schema import recipe_schema
from .checkpoint import is_complete, latest_checkpoint

# Files a previous run may have left; removed when output.overwrite=true so nothing stale mixes in.
RUN_ARTIFACTS = ("recipe.yaml", "deepspeed_config.json", "metrics.jsonl", "metrics.json", "predictions", "model",
                 "checkpoints", "status.json", "STOP", "report", "tensorboard", "mlflow.db", "wandb")


def output_dir_for(recipe) -> Path:
    return resolve_path(str(recipe.output_dir()))


def check_writable(path: Path) -> None:
    """Prove we can create the run directory without creating it: make (and remove) a scratch
    directory in its nearest existing ancestor. Permission bits alone lie for root and for
    read-only file systems."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LauncherError(f"output.dir: cannot create {path}: {probe} is a file, not a directory; choose another output.dir")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".launcher-probe-", dir=probe))
    except OSError as exc:
        raise LauncherError(
            f"output.dir: cannot create {path}: {probe} is not writable ({exc.strerror}); choose another output.dir"
        ) from None


# Fields that may differ between an interrupted run and its resumption.
RESUME_MAY_CHANGE = {
    "output.overwrite", "checkpoint.resume", "checkpoint.every_steps", "checkpoint.every_epoch",
    "checkpoint.keep_last", "distributed.timeout_minutes", "training.log_every",
    # `launcher run` passes the strategy it resolved from `auto`; whether a checkpoint can continue under
    # another strategy is checkpoint.check_resumable's decision, made on the strategies themselves.
    "distributed.strategy",
    "output.report", "output.push_to_hub", "output.hub_repo_id", "output.hub_private",
}


@dataclass
class StartDecision:
    run_dir: Path
    resume_from: Path | None  # a complete checkpoint, or None for a fresh start
    note: str = ""


def _flatten(data, prefix="") -> dict:
    flat = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict) and value and key != "config_overrides":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalized(saved: dict) -> dict:
    """A saved recipe as the current schema reads it: fields added since it was written take their
    defaults, so a run directory from an older launcher version compares on what its user set."""
    try:
        return recipe_schema().model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved  # no longer a valid recipe: compare it as written


def recipe_differences(saved: dict, current: dict) -> list[str]:
    old, new = _flatten(_normalized(saved)), _flatten(current)
    keys = sorted((set(old) | set(new)) - RESUME_MAY_CHANGE)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def decide_start(recipe) -> StartDecision:
    """Fresh run, resume, or refuse - decided before anything is written."""
    path = output_dir_for(recipe)
    if path.exists() and not path.is_dir():
        raise LauncherError(f"output.dir: {path} exists and is not a directory; choose another output.dir")
    check_writable(path)

    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never"):
        checkpoint = resolve_path(resume, recipe_base_dir(recipe))
        if not checkpoint.exists():
            raise LauncherError(f"checkpoint.resume: {checkpoint} does not exist; name a checkpoints/step-N directory, or use auto")
        if not is_complete(checkpoint):
            raise LauncherError(
                f"checkpoint.resume: {checkpoint} is not a complete checkpoint (no trainer_state.json); "
                f"name a checkpoints/step-N directory, or use auto"
            )
        return StartDecision(path, checkpoint, f"resuming from {checkpoint}")
    holds_run = (path / "recipe.yaml").is_file()
    if not holds_run or recipe.output.overwrite:
        return StartDecision(path, None)
    if resume == "never":
        raise LauncherError(
            f"output.dir: {path} already holds a run and checkpoint.resume=never; set output.overwrite=true "
            f"to replace it, or choose another output.dir"
        )
    saved = yaml.safe_load((path / "recipe.yaml").read_text()) or {}
    differences = recipe_differences(saved, recipe.model_dump(mode="json"))
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise LauncherError(
            f"output.dir: {path} holds a run of a different recipe ({shown}); set output.overwrite=true to replace "
            f"it, or choose another output.dir"
        )
    if (path / "metrics.json").is_file():
        raise LauncherError(
            f"output.dir: {path} already holds a finished run of this recipe; set output.overwrite=true to run "
            f"it again, or choose another output.dir"
        )
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        return StartDecision(path, None, "the run directory holds an unfinished run without a complete checkpoint: starting over")
    return StartDecision(path, checkpoint, f"resuming from {checkpoint}")


def prepare_output_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in RUN_ARTIFACTS:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
