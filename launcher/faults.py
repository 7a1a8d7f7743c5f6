"""Deliberate failures for drills and tests, switched on by LAUNCHER_FAULT (never set in normal use).

    LAUNCHER_FAULT=RANK:STEP                 that rank raises RuntimeError at that optimizer step
    LAUNCHER_FAULT=kill-in-checkpoint:STEP   rank 0 SIGKILLs itself while writing that step's
                                             checkpoint (after the files, before the rename)
    LAUNCHER_FAULT=nan-loss:STEP             rank 0's training loss at that optimizer step is NaN
                                             (and so are its gradients; under DDP, every rank's):
                                             what training.on_nonfinite_loss handles
    LAUNCHER_TEST_STEP_DELAY=SECONDS         sleep that long in every optimizer step of an attempt that
                                             did not resume (to interrupt a tiny run at a step nobody
                                             chose; the resumed attempt, e.g. Slurm's requeue of the
                                             same job and environment, runs at full speed)
"""

from __future__ import annotations

import os
import signal
import time


def active_test_settings() -> list[str]:
    """One line per test-only setting that is switched on (printed at start: never silent in a real run)."""
    lines = []
    if os.environ.get("LAUNCHER_FAULT"):
        lines.append(f"LAUNCHER_FAULT={os.environ['LAUNCHER_FAULT']} is set: a deliberate failure will be injected "
                     f"(a test-only setting; unset it for real runs)")
    if os.environ.get("LAUNCHER_TEST_STEP_DELAY"):
        lines.append(f"LAUNCHER_TEST_STEP_DELAY={os.environ['LAUNCHER_TEST_STEP_DELAY']} is set: every optimizer "
                     f"step sleeps that many seconds unless the run resumed (a test-only setting; unset it for real runs)")
    return lines


def _spec() -> str | None:
    return os.environ.get("LAUNCHER_FAULT")


def raise_at_step(rank: int, step: int) -> None:
    if _spec() == f"{rank}:{step}":
        raise RuntimeError(f"injected fault (LAUNCHER_FAULT={_spec()})")


def kill_in_checkpoint(step: int) -> None:
    if _spec() == f"kill-in-checkpoint:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def nonfinite_loss(loss, rank: int, step: int):
    if rank == 0 and _spec() == f"nan-loss:{step}":
        return loss * float("nan")
    return loss


def step_delay(resumed: bool) -> None:
    delay = os.environ.get("LAUNCHER_TEST_STEP_DELAY")
    if delay and not resumed:
        time.sleep(float(delay))
