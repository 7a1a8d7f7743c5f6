"""Checkpoints that are either complete or absent, and the resume decision.

Layout under ``<run>/checkpoints/``:
    step-00000120/          accelerator.save_state (model, optimizer - ZeRO shards under DeepSpeed -,
                            per-rank RNG states) + trainer_state.json (written last)
    .partial-step-.../      a checkpoint being written; never used, removed on the next start
    latest                  the name of the newest complete checkpoint (written after the rename)
    best-step-00000100/     the best validation weights so far (save_pretrained, loadable on their own);
                            the one the newest checkpoint refers to is kept until a newer checkpoint
                            refers to a newer one, so a resume always finds its best weights

Writing: all ranks save into ``.partial-<name>``; rank 0 adds trainer_state.json, fsyncs, renames
the directory into place, then rewrites ``latest``. A process killed at any point leaves the previous
checkpoint and ``latest`` intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import faults
from ..errors import LauncherError
from .outputs import write_json_atomic, write_text_atomic

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Everything besides model/optimizer/RNG needed to continue exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    global_batch_size: int = 0
    scheduler: dict = field(default_factory=dict)
    best: dict | None = None  # {"metric", "value", "step"}
    evals_without_improvement: int = 0
    last_validation_step: int = -1
    last_validation: dict | None = None

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        data = json.loads((directory / STATE_FILE).read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def best_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"best-step-{step:08d}"


def prune_best(run_dir: Path, keep_steps: set[int]) -> None:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return
    for directory in root.glob("best-step-*"):
        if int(directory.name.rsplit("-", 1)[-1]) not in keep_steps:
            shutil.rmtree(directory, ignore_errors=True)


def is_complete(directory: Path) -> bool:
    return directory.is_dir() and (directory / STATE_FILE).is_file() and not directory.name.startswith(".")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Never a partial one."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return None
    marker = root / "latest"
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if is_complete(candidate):
            return candidate
    # `latest` missing or stale (killed between the rename and the marker): newest complete one wins.
    complete = [d for d in root.iterdir() if _STEP_DIR.match(d.name) and is_complete(d)]
    return max(complete, key=lambda d: int(_STEP_DIR.match(d.name).group(1)), default=None)


def remove_partials(run_dir: Path) -> None:
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for stale in root.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root = checkpoints_root(run_dir)
    name = f"step-{state.step:08d}"
    final = root / name
    if is_complete(final):
        return final  # already saved at this step (e.g. epoch end and every_steps coincide)
    partial = root / f".partial-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        faults.kill_in_checkpoint(state.step)
        write_json_atomic(partial / STATE_FILE, asdict(state))
        _fsync_tree(partial)
        os.replace(partial, final)
        write_text_atomic(root / "latest", name + "\n")
        _prune(root, keep_last)
        # Older best weights are no longer referenced by any checkpoint a resume could pick.
        newest_best = max((int(d.name.rsplit("-", 1)[-1]) for d in root.glob("best-step-*")), default=None)
        prune_best(run_dir, keep_steps={s for s in (newest_best, (state.best or {}).get("step")) if s is not None})
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted((d for d in root.iterdir() if _STEP_DIR.match(d.name)), key=lambda d: int(_STEP_DIR.match(d.name).group(1)))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator, directory: Path) -> TrainerState:
    accelerator.load_state(str(directory), load_kwargs={"weights_only": True})
    return TrainerState.read(directory)


def check_resumable(state: TrainerState, strategy: str, world_size: int, global_batch_size: int, directory: Path) -> None:
    """Refuse a resume that cannot continue exactly, saying how to proceed."""
    if state.global_batch_size != global_batch_size:
        raise LauncherError(
            f"checkpoint.resume: {directory} was written with global batch {state.global_batch_size}, this run has "
            f"{global_batch_size}; the data position would not carry over. Keep training.global_batch_size the same "
            f"(set it explicitly to change the world size), or set checkpoint.resume=never / output.overwrite=true"
        )
    if state.strategy != strategy and any(kind in state.strategy + strategy for kind in ("zero", "fsdp")):
        raise LauncherError(
            f"checkpoint.resume: {directory} was written under {state.strategy}, this run uses {strategy}; "
            f"resume with distributed.strategy={state.strategy}"
        )
    if state.world_size != world_size and strategy.startswith("zero"):
        raise LauncherError(
            f"checkpoint.resume: {directory} holds DeepSpeed ZeRO state partitioned over {state.world_size} ranks, "
            f"this run has {world_size}. Resume with {state.world_size} processes. (DDP checkpoints hold full state "
            f"and resume at any world size; for ZeRO, DeepSpeed's `ds_to_universal --inject_missing_state` converts "
            f"the shards to a universal checkpoint, which this launcher does not load yet.)"
        )
    if state.world_size != world_size and strategy.startswith("fsdp"):
        raise LauncherError(
            f"checkpoint.resume: {directory} holds FSDP state sharded over {state.world_size} ranks (and their "
            f"random states), this run has {world_size}. Resume with {state.world_size} processes"
        )
