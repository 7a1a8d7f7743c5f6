"""The launch plan: recipe + topology -> what will run, shown before it runs (`--dry-run`).

The plan is neutral: it says how many nodes and processes, which strategy, the batch arithmetic, the
steps and the memory per rank, and where the run goes - not how a launcher spells it. Turning a plan
into a command is a backend's job (launch/accelerate.py: `accelerate launch` and its config file;
launch/slurm.py renders the per-node command into an sbatch script).

Everything is checked here, before a process starts, by the same functions every rank calls again at
start (plan.check_launch): the recipe, the batch arithmetic for this world size, the strategy against
the accelerate config, DeepSpeed's availability, the data (to count steps) and the run directory.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

from ..data import prepare_data
from ..engine.ewc import check_strategy as check_ewc_strategy
from ..engine.outputs import decide_start
from ..errors import DataError, HubDataUnavailable, LauncherError
from ..memory import MemoryChoice, Rung, parse_size, rung_estimate
from ..model_io import load_tokenizer
from ..plan import (
    BatchPlan,
    MemoryEstimate,
    Strategy,
    check_launch,
    format_bytes,
    memory_estimate,
    resolve_batch,
    resolve_strategy,
    strategy_from_accelerate_env,
    total_optimizer_steps,
)
from ..recipe import load_recipe, with_overrides
from ..sampling import steps_per_epoch
from ..schema import Recipe
from ..tasks import TASKS
from . import accelerate
from .memory import choose, memory_budget, model_facts
from ..tracking import check_trackers


@dataclass
class LaunchRequest:
    """What the user asked for on the command line (None = decide)."""

    nproc: int | None = None
    nodes: int = 1
    node_rank: int = 0
    main_address: str | None = None
    main_port: int | None = None
    strategy: str | None = None
    config_file: Path | None = None
    rendezvous_at_runtime: bool = False  # Slurm: main address/port are found by each job
    device: str | None = None  # None: this machine's (Slurm: the compute nodes', given by --gpus-per-node)
    dry_run: bool = False  # a plan to look at: a Hub dataset that cannot be fetched leaves the step count unknown
    memory_per_rank: str | None = None  # e.g. "16GiB": what each rank may use (None: detected)


@dataclass
class LaunchPlan:
    recipe: Recipe
    recipe_path: Path
    overrides: list[str]  # the user's, plus the resolved strategy: what every rank is started with
    strategy: Strategy
    device: str
    nodes: int
    procs_per_node: int
    node_rank: int
    batch: BatchPlan
    train_examples: int | None  # None: a dry run without the (Hub) data; notes say why
    steps_per_epoch: int | None
    total_steps: int | None
    num_parameters: int
    memory: MemoryEstimate
    run_dir: Path
    resume_from: Path | None
    main_address: str | None = None
    main_port: int | None = None
    user_config: accelerate.UserConfig | None = None  # the user's own accelerate config (--config-file)
    rendezvous_at_runtime: bool = False
    notes: list[str] = field(default_factory=list)
    activations: float = math.nan  # estimated activation bytes per rank (micro batch at data.max_length)
    memory_choice: MemoryChoice | None = None  # how `distributed.strategy: auto` chose, when it did

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    def train_argv(self) -> list[str]:
        """What every rank runs: the per-rank entry point with the recipe and the resolved overrides."""
        return ["-m", "launcher", "train", str(self.recipe_path), *self.overrides]


def detect_device() -> tuple[str, int]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cuda", count) if count else ("cpu", 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _check_request(request: LaunchRequest) -> None:
    if request.nodes < 1:
        raise LauncherError(f"--nodes {request.nodes}: need at least 1 node")
    if request.nproc is not None and request.nproc < 1:
        raise LauncherError(f"--nproc {request.nproc}: need at least 1 process per node")
    if not 0 <= request.node_rank < request.nodes:
        raise LauncherError(f"--node-rank {request.node_rank}: must be between 0 and --nodes - 1 ({request.nodes - 1})")
    if request.nodes > 1 and not request.rendezvous_at_runtime and (not request.main_address or not request.main_port):
        raise LauncherError("--nodes > 1 needs --main-address (node 0's address) and --main-port, the same on every node")
    if request.memory_per_rank is not None:
        parse_size(request.memory_per_rank)


def build_plan(recipe_path: str | Path, overrides: list[str], request: LaunchRequest) -> LaunchPlan:
    _check_request(request)
    overrides = list(overrides)
    if request.strategy:
        overrides.append(f"distributed.strategy={request.strategy}")
    recipe = load_recipe(recipe_path, overrides)
    if recipe.continual is not None:
        raise LauncherError("continual: a recipe with stages runs stage after stage with `launcher run RECIPE` on "
                            "this machine; launcher slurm and launcher sweep do not run continual recipes")
    check_trackers(recipe)
    device, gpus = detect_device()
    device = request.device or device

    user_config = accelerate.read_user_config(request.config_file) if request.config_file is not None else None
    nodes = request.nodes
    if user_config is not None:
        if device == "cpu" and user_config.selects_gpus:
            raise LauncherError(
                f"--config-file {request.config_file} selects GPUs (gpu_ids: {user_config.gpu_ids}, mixed_precision: "
                f"{user_config.mixed_precision}) but this machine has none; use accelerate_configs/cpu.yaml"
            )
        nodes = request.nodes if request.nodes > 1 else user_config.num_machines
        procs_per_node = request.nproc or max(user_config.num_processes // nodes, 1)
        env_view = user_config.env
    else:
        procs_per_node = request.nproc or max(gpus, 1)
        env_view = {}
    world_size = nodes * procs_per_node

    strategy = resolve_strategy(recipe.distributed.strategy, env_view)
    batch = resolve_batch(recipe.training, world_size)
    # auto follows an accelerate config that names DeepSpeed (an explicit choice); otherwise it is chosen
    # from memory below, once the model's size and shape are known.
    by_memory = recipe.distributed.strategy == "auto" and strategy_from_accelerate_env(env_view) is None
    # Checked now, before the data: with auto, against DDP (its checks are the ones every strategy shares; a
    # rung's own, e.g. compile under DeepSpeed, are asked rung by rung when choosing).
    check_launch(recipe.training, strategy, batch, env_view, cuda=device == "cuda")
    if by_memory:
        budget, budget_source = memory_budget(request.memory_per_rank, device, procs_per_node,
                                              request.rendezvous_at_runtime)

    task = TASKS[recipe.task](recipe)
    task.check_limits()
    start = decide_start(recipe)
    # Tokenize now (the run reads the cache): steps count training *features*, which for some tasks
    # (long QA contexts split into windows, packed dialogues) are not one per raw row.
    tokenizer = load_tokenizer(recipe)
    notes, examples, per_epoch, total_steps = [], None, None, None
    try:
        data = prepare_data(recipe, task, tokenizer)
    except HubDataUnavailable as exc:
        if not request.dry_run:
            raise
        notes.append(f"steps unknown, and parameters and memory without the task head (the data sizes it), until "
                     f"the data is here: {exc}")
    else:
        examples = len(data.features["train"])
        per_epoch = steps_per_epoch(examples, batch)
        if per_epoch == 0:
            raise DataError(
                f"{data.sources['train']}: {examples} training rows are fewer than one global batch ({batch.describe()})"
            )
        total_steps = total_optimizer_steps(recipe.training, per_epoch)
    # Counted after the data is prepared: the task's head is sized from it (e.g. the label set).
    parameters = task.count_parameters()
    facts = model_facts(recipe, task, parameters)
    choice = None
    if by_memory:
        choice = choose(recipe, facts, batch, env_view, device, budget, budget_source)
        strategy = choice.chosen.rung.strategy
        if choice.chosen.rung.checkpointing and not recipe.training.gradient_checkpointing:
            # Part of the chosen rung: every rank is told, like the strategy.
            overrides.append("training.gradient_checkpointing=true")
            recipe = with_overrides(recipe, ["training.gradient_checkpointing=true"])
        check_launch(recipe.training, strategy, batch, env_view, cuda=device == "cuda")
    if recipe.ewc is not None:
        check_ewc_strategy(strategy)
    if recipe.distributed.strategy != strategy.name:
        # One value from the plan to every rank: each rank is told the strategy the plan resolved.
        overrides.append(f"distributed.strategy={strategy}")
    estimate = choice.chosen if choice else rung_estimate(
        Rung(strategy, recipe.training.gradient_checkpointing), facts, recipe.training.precision, world_size,
        batch.micro_batch_size, recipe.data.max_length, device)

    main_port = request.main_port or (free_port() if world_size > 1 and nodes == 1 else None)
    return LaunchPlan(
        recipe=recipe, recipe_path=Path(recipe_path), overrides=overrides, strategy=strategy, device=device,
        nodes=nodes, procs_per_node=procs_per_node, node_rank=request.node_rank, batch=batch,
        train_examples=examples, steps_per_epoch=per_epoch, total_steps=total_steps,
        num_parameters=parameters, memory=memory_estimate(parameters, strategy, recipe.training.precision, world_size),
        run_dir=start.run_dir, resume_from=start.resume_from, main_address=request.main_address, main_port=main_port,
        user_config=user_config, rendezvous_at_runtime=request.rendezvous_at_runtime, notes=notes,
        activations=estimate.activations, memory_choice=choice,
    )


def describe(plan: LaunchPlan) -> list[tuple[str, str]]:
    """The plan as (label, value) rows, for the table `launcher run` prints."""
    training, memory = plan.recipe.training, plan.memory
    backend = "nccl" if plan.device == "cuda" else "gloo"
    rows = [
        ("recipe", f"{plan.recipe_path} ({plan.recipe.task}, model {plan.recipe.model.name_or_path})"),
        ("world size", f"{plan.nodes} node(s) x {plan.procs_per_node} process(es) = {plan.world_size} ({plan.device}, {backend})"),
        ("batch", plan.batch.describe()),
        ("strategy", f"{plan.memory_choice.chosen.rung} (auto: {plan.memory_choice.reason()}; table below)"
                     if plan.memory_choice else str(plan.strategy)),
        ("precision", training.precision),
        ("steps", f"{plan.total_steps} optimizer steps; {plan.steps_per_epoch} per epoch over {plan.train_examples:,} training features"
                  if plan.total_steps is not None else "unknown (no training data here; see the note below)"),
        ("parameters", f"{plan.num_parameters:,}"),
        ("memory / rank", f"parameters {format_bytes(memory.parameters)}, gradients {format_bytes(memory.gradients)}, "
                          f"optimizer state {format_bytes(memory.optimizer)} = {format_bytes(memory.device_total)} on "
                          f"{plan.device}" + (f"; {format_bytes(memory.cpu)} offloaded to CPU" if memory.cpu else "")
                          + " (model states only; activations extra)"),
        ("activations", "not estimated: the model's config does not name its layers, hidden size, heads and vocabulary"
                        if math.isnan(plan.activations) else
                        f"{format_bytes(plan.activations)} / rank estimated for micro_batch_size {plan.batch.micro_batch_size}"
                        f" x data.max_length {plan.recipe.data.max_length}"
                        + (" with gradient checkpointing" if training.gradient_checkpointing else "")),
        ("run directory", str(plan.run_dir) + (f" (resuming from {plan.resume_from.name})" if plan.resume_from else "")),
    ]
    if plan.strategy.is_deepspeed:
        rows.append(("deepspeed config", f"generated by each rank from the recipe: {plan.run_dir / 'deepspeed_config.json'}"))
    if plan.nodes > 1 and not plan.rendezvous_at_runtime:
        rows.append(("this node", f"rank {plan.node_rank} of {plan.nodes}; main {plan.main_address}:{plan.main_port}"))
    rows += [("note", note) for note in plan.notes]
    return rows
