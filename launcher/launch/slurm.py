"""`launcher slurm`: render slurm/job.sbatch for a recipe into the run directory, optionally submit it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import LauncherError
from ..files import write_text_atomic
from . import accelerate
from .plan import LaunchPlan

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch"
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


class _SbatchTemplate(string.Template):
    delimiter = "%%"  # `$` belongs to bash and `%j` to Slurm


@dataclass
class SlurmRequest:
    nodes: int
    gpus_per_node: int
    cpu_procs_per_node: int = 1
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    cpus_per_task: int | None = None
    signal_seconds: int = 120
    job_name: str | None = None


def time_limit_seconds(value: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days = 0
    if "-" in value:
        day_part, value = value.split("-", 1)
        days = int(day_part)
        parts = [int(p) for p in value.split(":")] + [0, 0]
        hours, minutes, seconds = parts[:3]
    else:
        parts = [int(p) for p in value.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def check_request(request: SlurmRequest) -> None:
    if request.nodes < 1:
        raise LauncherError(f"--nodes {request.nodes}: need at least 1 node")
    if request.gpus_per_node < 0 or request.cpu_procs_per_node < 1:
        raise LauncherError("--gpus-per-node must be >= 0 and --nproc-per-node >= 1")
    if not _TIME.match(request.time):
        raise LauncherError(f"--time {request.time!r}: use a Slurm time limit such as 90, 2:00:00 or 1-12:00:00")
    limit = time_limit_seconds(request.time)
    if request.signal_seconds >= limit:
        raise LauncherError(
            f"--signal-seconds {request.signal_seconds}: the preemption warning must come before the time limit "
            f"({request.time} = {limit} s); lower it or raise --time"
        )


def render(plan: LaunchPlan, request: SlurmRequest, workdir: Path | None = None) -> str:
    directives = []
    if request.partition:
        directives.append(f"#SBATCH --partition={request.partition}")
    if request.account:
        directives.append(f"#SBATCH --account={request.account}")
    gpus = f"#SBATCH --gpus-per-node={request.gpus_per_node}" if request.gpus_per_node else "# (CPU job: no GPUs requested)"
    procs = request.gpus_per_node or request.cpu_procs_per_node
    train = " ".join(shlex.quote(part) for part in plan.train_argv())
    return _SbatchTemplate(TEMPLATE.read_text()).substitute(
        job_name=request.job_name or plan.recipe.name,
        nodes=request.nodes,
        gpus_directive=gpus,
        cpus_per_task=request.cpus_per_task or max(procs, 1),
        time=request.time,
        signal_seconds=request.signal_seconds,
        run_dir=shlex.quote(str(plan.run_dir.resolve())),
        extra_directives="\n".join(directives),
        python=shlex.quote(sys.executable),
        cpu_procs_per_node=request.cpu_procs_per_node,
        workdir=shlex.quote(str((workdir or Path.cwd()).resolve())),
        train_command=train,
    )


def sbatch_path() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise LauncherError("--submit: sbatch is not on PATH (not a Slurm login node?); drop --submit to only render the script")
    return path


def submit(script: Path) -> str:
    result = subprocess.run([sbatch_path(), "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise LauncherError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def slurm_accelerate_config(plan: LaunchPlan) -> dict:
    """The accelerate config every node's command reads; each node adds its machine rank and the main
    address at run time (the sbatch script's srun line)."""
    config = accelerate.generated_config(plan, per_node=False)
    if config.get("distributed_type") == "NO":
        config["distributed_type"] = "MULTI_GPU"  # one process per node, several nodes: still torchrun
    return config


def write_job(plan: LaunchPlan, request: SlurmRequest) -> Path:
    text = render(plan, request)  # before writing anything: a template error leaves no half-made job
    write_text_atomic(plan.launch_dir / "accelerate_config.yaml",
                      yaml.safe_dump(slurm_accelerate_config(plan), sort_keys=False))
    script = plan.run_dir / "job.sbatch"
    write_text_atomic(script, text)
    os.chmod(script, 0o755)
    return script
