"""`launcher run`: print the plan, write the launch files, run `accelerate launch`, report the outcome.

Signals: SIGTERM or SIGUSR1 sent to `launcher run` becomes a STOP file in the run directory, which
every rank checks at each step (torchrun does not forward SIGUSR1, and kills workers 30 s after it
forwards SIGTERM, so a file is the one channel that reaches every rank of every node in time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rich.console import Console

from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_STOPPED
from . import accelerate
from .plan import LaunchPlan, describe


def print_plan(plan: LaunchPlan, console: Console | None = None, show_command: bool = True) -> None:
    # Plain aligned lines rather than a boxed table: plans end up in job logs, greps and tickets.
    console = console or Console(highlight=False, soft_wrap=True)
    console.print("launch plan", style="bold")
    rows = describe(plan) + [("accelerate config", str(accelerate.config_path(plan)))]
    for label, value in rows:
        console.print(f"  {label + ':':<19}{value}", markup=False)
    if plan.memory_choice is not None:
        for line in plan.memory_choice.table():
            console.print(f"    {line}", markup=False)
    if show_command:
        console.print("command:", style="bold")
        console.print(accelerate.command(plan), markup=False)


def run_status(plan: LaunchPlan) -> dict:
    try:
        return json.loads((plan.run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def execute(plan: LaunchPlan, dry_run: bool = False) -> int:
    print_plan(plan)
    accelerate.write_launch_files(plan)
    if dry_run:
        print(f"dry run: nothing started; launch files in {plan.launch_dir} (run {accelerate.command_path(plan)} by hand)")
        return EXIT_OK
    stop_file = plan.run_dir / "STOP"

    def request_stop(signum, frame):
        print(f"launcher run: {signal.Signals(signum).name}: asking every rank to checkpoint and stop", file=sys.stderr, flush=True)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    # A stop requested from now on is for this attempt, even if it comes before the ranks are up.
    env = {**os.environ, "LAUNCHER_ATTEMPT_START": os.environ.get("LAUNCHER_ATTEMPT_START") or repr(time.time())}
    try:
        returncode = subprocess.Popen(accelerate.argv(plan), env=env).wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    state = run_status(plan).get("state")
    if state == "stopped":
        print(f"stopped and checkpointed; run the same command again to resume (exit {EXIT_STOPPED})", file=sys.stderr)
        return EXIT_STOPPED
    if returncode == 0:
        return EXIT_OK
    # accelerate launch reports its own exit code (torchrun turns any failing rank into 1).
    print(f"launcher run: training failed (accelerate launch exited {returncode}); see the messages above", file=sys.stderr)
    return returncode if returncode in (2,) else EXIT_FAILURE
