"""Checkpoints that are either complete or absent, and the resume decision.

Layout under ``<run>/checkpoints/``:
    step-00000120/          accelerator.save_state (model, optimizer - ZeRO shards under DeepSpeed -,
                            per-rank RNG states) + trainer_state.json (written last)
    .partial-step-.../      a checkpoint being written; never used, removed on the next start
    latest                  the name of the newest complete checkpoint (written after the rename)
    best-step-00000100/     the best validation weights so far (save_pretrained, loadable on their own);
                            the one the newest checkpoint refers to is kept until a newer checkpoint
                            refers to a newer one, so a resume always finds its best weights
    step-00000120.universal/  DeepSpeed's universal form of step-00000120 (ZeRO state merged out of its
                            rank partitions), made by the first resume on another world size; pruned with it

Writing: all ranks save into ``.partial-<name>``; rank 0 adds trainer_state.json, fsyncs, renames
the directory into place, then rewrites ``latest``. A process killed at any point leaves the previous
checkpoint and ``latest`` intact.

Another world size: DDP and ZeRO-0 state is whole and loads anywhere. ZeRO-1/2/3 state is partitioned
over the ranks that wrote it, so the first resume on another world size has DeepSpeed's ``ds_to_universal``
convert it (rank 0, into ``.partial-<name>.universal``, renamed when complete; the checkpoint itself is
only read) and loads that with DeepSpeed's ``load_universal``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import faults
from ..errors import LauncherError
from ..files import write_json_atomic, write_text_atomic
from ..plan import DEEPSPEED_STAGES

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
UNIVERSAL_SUFFIX = ".universal"
DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate's save_state/load_state give DeepSpeed's checkpoint
CONVERTED_FROM = "converted_from.json"


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
    trackers: dict = field(default_factory=dict)  # experiment tracker run identities (launcher/tracking.py)

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
    for universal in root.glob(f"step-*{UNIVERSAL_SUFFIX}"):
        if not (root / universal.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
            shutil.rmtree(universal, ignore_errors=True)


def needs_universal(state: TrainerState, world_size: int) -> bool:
    """A ZeRO-1/2/3 checkpoint partitioned over another number of ranks than this run has."""
    return state.world_size != world_size and DEEPSPEED_STAGES.get(state.strategy, 0) >= 1


def universal_dir(directory: Path, run_dir: Path) -> Path:
    """Where the universal form of ``directory`` lives: next to it when it is one of this run's
    checkpoints, else in this run's checkpoints (a checkpoint named by path may be read-only)."""
    return checkpoints_root(run_dir) / f"{directory.name}{UNIVERSAL_SUFFIX}"


def _converted_from(directory: Path) -> dict:
    return {"checkpoint": str(directory.resolve()), "trainer_state": json.loads((directory / STATE_FILE).read_text())}


def ensure_universal(accelerator, directory: Path, run_dir: Path) -> Path:
    """Collective. DeepSpeed's universal checkpoint of the ZeRO checkpoint ``directory``: converted by
    rank 0 (the other ranks wait) unless a complete conversion of this very checkpoint exists; the
    original is only read. Returns a directory ``accelerator.load_state`` reads like a checkpoint."""
    target = universal_dir(directory, run_dir)
    if accelerator.is_main_process:
        marker = target / CONVERTED_FROM
        if not (marker.is_file() and json.loads(marker.read_text()) == _converted_from(directory)):
            partial = target.with_name(f".partial-{target.name}")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _run_ds_to_universal(directory / DEEPSPEED_TAG, partial / DEEPSPEED_TAG)
            write_json_atomic(partial / CONVERTED_FROM, _converted_from(directory))
            _fsync_tree(partial)
            shutil.rmtree(target, ignore_errors=True)  # a conversion of another checkpoint of that name
            os.replace(partial, target)
    accelerator.wait_for_everyone()
    return target


def _run_ds_to_universal(source: Path, target: Path) -> None:
    # DeepSpeed's own converter, in a child process: it prints progress bars, forks worker pools and
    # reads every rank's shards - none of which belongs in a training rank's process.
    # --inject_missing_state: engines built without a universal_checkpoint_info attribute (every
    # Hugging Face model) do not record it, and the converter refuses checkpoints without it.
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
               "--output_folder", str(target), "--inject_missing_state"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"DeepSpeed's ds_to_universal could not convert {source} (exit {result.returncode}):\n"
            f"{(result.stdout + result.stderr)[-4000:]}"
        )


@contextmanager
def _loading_universal(engine):
    """DeepSpeed takes ``checkpoint.load_universal`` from the config its engine was built with
    (accelerator.prepare), before the run knows where it resumes from. The flag only steers
    loading, so it is set for this one load instead of in the generated config."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_checkpoint(accelerator, directory: Path, run_dir: Path, engine=None) -> TrainerState:
    """Collective. Restore model, optimizer and RNG from ``directory``; return its trainer state.

    On another world size than the checkpoint's: a ZeRO-1/2/3 checkpoint is loaded through its
    universal form (``engine`` is the DeepSpeed engine), and every rank r restores the RNG states
    rank ``r mod saved_world_size`` saved - the streams a fresh run of this layout would not have, but
    the launcher seeds every rank alike anyway (one seed, no per-rank offset), so ranks sharing a
    stream is how every run starts. Dropout masks are drawn per rank, so with dropout on a resume on
    another world size continues statistically, not bitwise, like the uninterrupted run; with
    dropout off it continues exactly.
    """
    saved = TrainerState.read(directory)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if needs_universal(saved, world_size):
        universal = ensure_universal(accelerator, directory, run_dir)
        weight_decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
        with _loading_universal(engine):
            accelerator.load_state(str(universal), load_kwargs={"weights_only": True})
        # Two quirks of DeepSpeed's ZeRO-3 universal load (0.19), both silent: every parameter group
        # gets the first group's settings - of ours only weight decay differs (off for biases and
        # norms) - and every group's Adam state gets the same `step` tensor, which torch's Adam/AdamW
        # then advance in place once per group per step (wrong bias correction from the next step on).
        for group, decay in zip(engine.optimizer.param_groups, weight_decay):
            group["weight_decay"] = decay
        for state in engine.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
    else:
        accelerator.load_state(str(directory), load_kwargs={"weights_only": True})
    if saved.world_size != world_size:
        from accelerate.checkpointing import load_accelerator_state

        # With no models, optimizers, schedulers or data loaders this restores only the RNG states.
        load_accelerator_state(str(directory), [], [], [], [], process_index=rank % saved.world_size)
    return saved


def check_resumable(state: TrainerState, strategy: str, world_size: int, global_batch_size: int, directory: Path) -> None:
    """Refuse a resume that cannot continue exactly, saying how to proceed. Any world size can continue
    a checkpoint (``load_checkpoint``); the global batch is what fixes the data position."""
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
    if state.world_size != world_size and strategy.startswith("fsdp"):
        # DeepSpeed's universal checkpoint reshapes ZeRO state; torch.distributed.checkpoint could reshard
        # FSDP2 state too, but the launcher has not tested it, so it refuses rather than guess.
        raise LauncherError(
            f"checkpoint.resume: {directory} holds FSDP state sharded over {state.world_size} ranks (and their "
            f"random states), this run has {world_size}. Resume with {state.world_size} processes"
        )
