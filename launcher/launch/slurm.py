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
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.I)
# sbatch options the script itself depends on: given twice they would silently disagree.
_OWNED_OPTIONS = {
    "--nodes": "use --nodes", "-N": "use --nodes", "--ntasks-per-node": "one task per node runs the node's ranks",
    "--gpus-per-node": "use --gpus-per-node", "--time": "use --time", "-t": "use --time",
    "--signal": "use --signal-seconds", "--requeue": "always on: preempted jobs requeue",
    "--output": "the log goes to the run directory", "-o": "the log goes to the run directory",
    "--open-mode": "append, so a requeued job keeps its log", "--job-name": "the recipe name",
    "--partition": "use --partition", "-p": "use --partition", "--account": "use --account", "-A": "use --account",
    "--mem": "use --mem", "--qos": "use --qos", "--constraint": "use --constraint", "-C": "use --constraint",
    "--exclusive": "use --exclusive", "--cpus-per-task": "use --cpus-per-task", "-c": "use --cpus-per-task",
    "--array": "launcher sweep --slurm makes the array (one task per point; --array CAP limits how many run at once)",
    "-a": "launcher sweep --slurm makes the array",
}


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
    mem: str | None = None  # --mem per node, e.g. 64G
    exclusive: bool = False
    constraint: str | None = None
    qos: str | None = None
    sbatch_args: tuple[str, ...] = ()  # more #SBATCH options, as given (e.g. --reservation=x)
    setup: tuple[str, ...] = ()  # shell lines run on every node before the launch (module load, conda activate)
    container_image: str | None = None  # pyxis: run each node's task in this container
    container_mounts: str | None = None
    container_python: str = "python"  # the interpreter inside the container


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
    if request.mem is not None and not _MEM.match(request.mem):
        raise LauncherError(f"--mem {request.mem!r}: use a Slurm memory size such as 64G, 500M or 0 (all of the node's memory)")
    for arg in request.sbatch_args:
        name = arg.split("=", 1)[0].split(" ", 1)[0]
        if not name.startswith("-"):
            raise LauncherError(f"--sbatch-arg {arg!r}: give an sbatch option, e.g. --sbatch-arg=--reservation=maint")
        if name in _OWNED_OPTIONS:
            raise LauncherError(f"--sbatch-arg {arg!r}: {name} is set by the launcher ({_OWNED_OPTIONS[name]})")
    limit = time_limit_seconds(request.time)
    if request.signal_seconds >= limit:
        raise LauncherError(
            f"--signal-seconds {request.signal_seconds}: the preemption warning must come before the time limit "
            f"({request.time} = {limit} s); lower it or raise --time"
        )


def _in_single_quotes(text: str) -> str:
    """Text to put inside the single-quoted per-node script (each ' becomes '\\'')."""
    return text.replace("'", "'\\''")


def render(plan: LaunchPlan, request: SlurmRequest, workdir: Path | None = None) -> str:
    return _SbatchTemplate(TEMPLATE.read_text()).substitute(_fields(plan, request, workdir))


def _fields(plan: LaunchPlan, request: SlurmRequest, workdir: Path | None = None, mounted: Path | None = None) -> dict:
    """The template's fields for one job running ``plan`` (``mounted``: the directory a container must
    see besides the working directory; default the run directory)."""
    directives = []
    for option, value in (("partition", request.partition), ("account", request.account), ("qos", request.qos),
                          ("constraint", request.constraint), ("mem", request.mem)):
        if value:
            directives.append(f"#SBATCH --{option}={value}")
    if request.exclusive:
        directives.append("#SBATCH --exclusive")
    directives += [f"#SBATCH {arg}" for arg in request.sbatch_args]
    gpus = f"#SBATCH --gpus-per-node={request.gpus_per_node}" if request.gpus_per_node else "# (CPU job: no GPUs requested)"
    procs = request.gpus_per_node or request.cpu_procs_per_node
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = plan.run_dir.resolve()
    train = _in_single_quotes(" ".join(shlex.quote(part) for part in plan.train_argv()))
    setup = "".join(f"    {_in_single_quotes(line)}\n" for line in request.setup)
    srun_options, python = "", sys.executable
    if request.container_image:
        # pyxis (NVIDIA's Slurm plugin): the node's task runs inside the image, with the work and run
        # directories mounted at the same paths; the interpreter is the image's, not this machine's venv.
        mounts = request.container_mounts or ",".join(sorted({str(workdir), str((mounted or run_dir).resolve())}))
        srun_options = (f"--container-image={shlex.quote(request.container_image)} "
                        f"--container-mounts={shlex.quote(mounts)} --container-workdir={shlex.quote(str(workdir))} ")
        python = request.container_python
    return dict(
        job_name=request.job_name or plan.recipe.name,
        nodes=request.nodes,
        gpus_directive=gpus,
        cpus_per_task=request.cpus_per_task or max(procs, 1),
        time=request.time,
        signal_seconds=request.signal_seconds,
        run_dir=shlex.quote(str(run_dir)),
        log_path=shlex.quote(str(run_dir)) + "/slurm-%j.out",
        select_point="",
        extra_directives="\n".join(directives),
        python=shlex.quote(python),
        cpu_procs_per_node=request.cpu_procs_per_node,
        workdir=shlex.quote(str(workdir)),
        train_command=train,
        srun_options=srun_options,
        node_setup=setup,
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


# ---- job arrays (launcher sweep --slurm): the same template, one array task per sweep point ----------

ARRAY_SCRIPT = "sweep.sbatch"
TRAIN_ARGS = "train_args"  # <point run dir>/launch/train_args: what follows `-m launcher train`, one per line


def array_spec(indices: list[int], limit: int | None = None) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sbatch --array), with '%LIMIT' when at most LIMIT tasks may run at once."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts) + (f"%{limit}" if limit else "")


def render_array(plans: dict[int, LaunchPlan], run_dirs: list[Path], request: SlurmRequest, sweep_dir: Path,
                 limit: int | None = None, workdir: Path | None = None) -> str:
    """One job array over the points in ``plans`` (index -> plan): task i takes run_dirs[i] and reads
    its training arguments from there, so the job itself is the single-job template's, unchanged."""
    first = plans[min(plans)]
    fields = _fields(first, request, workdir, mounted=sweep_dir)
    listing = "".join(f"    {shlex.quote(str(path.resolve()))}\n" for path in run_dirs)
    fields.update(
        job_name=request.job_name or sweep_dir.name,
        log_path=shlex.quote(str(sweep_dir.resolve())) + "/slurm-%A_%a.out",
        extra_directives="\n".join(filter(None, [f"#SBATCH --array={array_spec(sorted(plans), limit)}",
                                                 fields["extra_directives"]])),
        select_point=(
            "# Job array: task i runs sweep point i (sweep.json); its run directory holds its accelerate config\n"
            "# and its training arguments (launch/" + TRAIN_ARGS + ").\n"
            ': "${SLURM_ARRAY_TASK_ID:?submit this script as the job array it declares (sbatch reads its --array line)}"\n'
            "POINT_RUN_DIRS=(\n" + listing + ")\n"
        ),
        run_dir='"${POINT_RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"',
        train_command='-m launcher train "${TRAIN_ARGS[@]}"',
        node_setup=fields["node_setup"] + f'    mapfile -t TRAIN_ARGS < "$RUN_DIR/launch/{TRAIN_ARGS}"\n',
    )
    return _SbatchTemplate(TEMPLATE.read_text()).substitute(fields)


def write_array_job(plans: dict[int, LaunchPlan], run_dirs: list[Path], request: SlurmRequest, sweep_dir: Path,
                    limit: int | None = None) -> Path:
    text = render_array(plans, run_dirs, request, sweep_dir, limit)
    for plan in plans.values():
        arguments = plan.train_argv()[3:]  # after `-m launcher train`
        if any("\n" in argument for argument in arguments):
            raise LauncherError(f"{plan.run_dir}: a training argument holds a line break; the job array reads one per line")
        write_text_atomic(plan.launch_dir / "accelerate_config.yaml",
                          yaml.safe_dump(slurm_accelerate_config(plan), sort_keys=False))
        write_text_atomic(plan.launch_dir / TRAIN_ARGS, "".join(argument + "\n" for argument in arguments))
    script = sweep_dir / ARRAY_SCRIPT
    write_text_atomic(script, text)
    os.chmod(script, 0o755)
    return script
