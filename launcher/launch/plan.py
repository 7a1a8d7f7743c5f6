"""The launch plan: recipe + topology -> what will run, shown before it runs (`--dry-run`).

Everything is checked here, before a process starts: the recipe, the batch arithmetic for this world
size, the strategy against the accelerate config, DeepSpeed's availability, the data (to count steps)
and the run directory.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LauncherError, TopologyError
from ..plan import (
    DEEPSPEED_STAGES,
    FSDP_RESHARD_AFTER_FORWARD,
    BatchPlan,
    MemoryEstimate,
    check_accelerate_accumulation,
    check_accelerate_clipping,
    check_accelerate_precision,
    check_accelerate_zero3_export,
    check_fsdp,
    deepspeed_config,
    format_bytes,
    is_deepspeed,
    is_fsdp,
    memory_estimate,
    resolve_batch,
    resolve_strategy,
    total_optimizer_steps,
)
from ..recipe import Recipe, load_recipe

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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


@dataclass
class LaunchPlan:
    recipe: Recipe
    recipe_path: Path
    overrides: list[str]
    strategy: str
    device: str
    nodes: int
    procs_per_node: int
    node_rank: int
    batch: BatchPlan
    train_examples: int
    steps_per_epoch: int
    total_steps: int
    num_parameters: int
    memory: MemoryEstimate
    run_dir: Path
    resume_from: Path | None
    accelerate_config: dict | None  # generated (None when the user gave --config-file)
    user_config_file: Path | None
    deepspeed_config: dict | None
    main_port: int | None = None
    extra_accelerate_args: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    @property
    def node_suffix(self) -> str:
        # Each node of a multi-node run writes its own files: the run directory is usually shared.
        return f".node{self.node_rank}" if self.nodes > 1 and self.accelerate_config and "machine_rank" in self.accelerate_config else ""

    @property
    def config_path(self) -> Path:
        return self.user_config_file or self.launch_dir / f"accelerate_config{self.node_suffix}.yaml"

    def train_argv(self) -> list[str]:
        return ["-m", "launcher", "train", str(self.recipe_path), *self.overrides]

    def argv(self) -> list[str]:
        accelerate = Path(sys.executable).with_name("accelerate")
        launcher = [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
        return [*launcher, "--config_file", str(self.config_path), *self.extra_accelerate_args, *self.train_argv()]

    def command(self) -> str:
        return shlex.join(self.argv())


def detect_device() -> tuple[str, int]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ("cuda", count) if count else ("cpu", 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _read_accelerate_config(path: Path) -> dict:
    """The user's accelerate config, read with accelerate's own loader (so we see what it sees)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.is_file():
        raise LauncherError(f"--config-file: {path} not found")
    try:
        config = load_config_from_file(str(path))
    except Exception as exc:  # accelerate raises ValueError/TypeError/yaml errors for bad files
        raise LauncherError(f"--config-file: {path} is not a valid accelerate config ({exc})") from None
    return config.to_dict()


def _env_view(config: dict) -> dict[str, str]:
    """The ACCELERATE_* environment `accelerate launch --config_file` would hand each rank."""
    env = {"ACCELERATE_MIXED_PRECISION": str(config.get("mixed_precision") or "no")}
    if str(config.get("distributed_type", "")).endswith("DEEPSPEED"):
        ds = config.get("deepspeed_config") or {}
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(ds.get("zero_stage", 2))
        env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] = str(ds.get("offload_param_device") or "none")
        env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] = str(ds.get("offload_optimizer_device") or "none")
        if ds.get("gradient_clipping") is not None:
            env["ACCELERATE_GRADIENT_CLIPPING"] = str(ds["gradient_clipping"])
        if ds.get("zero3_save_16bit_model") is not None:
            env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = str(ds["zero3_save_16bit_model"]).lower()
        if ds.get("deepspeed_config_file"):
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds["deepspeed_config_file"])
        if ds.get("gradient_accumulation_steps") not in (None, "", 1, "1"):
            env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(ds["gradient_accumulation_steps"])
    if str(config.get("distributed_type", "")).endswith("FSDP"):
        fsdp = config.get("fsdp_config") or {}
        env["ACCELERATE_USE_FSDP"] = "true"
        env["FSDP_VERSION"] = str(fsdp.get("fsdp_version", 1))
        for key in ("reshard_after_forward", "offload_params", "activation_checkpointing"):
            if fsdp.get(f"fsdp_{key}") is not None:
                env[f"FSDP_{key.upper()}"] = str(fsdp[f"fsdp_{key}"]).lower()
    return env


def generated_accelerate_config(strategy: str, precision: str, nodes: int, node_rank: int, world_size: int,
                                main_address: str | None, main_port: int | None, device: str) -> dict:
    """The accelerate config for a plan. Batch sizes and clipping are deliberately absent: the
    launcher writes them into the DeepSpeed config from the recipe."""
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": nodes,
        "num_processes": world_size,
        "machine_rank": node_rank,
        "mixed_precision": PRECISION_TO_ACCELERATE[precision],
        "main_training_function": "main",
        # Accelerate's CPU mode would start one process without MPI; its torchrun path (MULTI_GPU)
        # starts N CPU ranks, and the launcher then picks gloo.
        "use_cpu": False,
        "same_network": True,
        "rdzv_backend": "static",
    }
    if device == "cuda":
        config["gpu_ids"] = "all"
    if is_deepspeed(strategy):
        stage = DEEPSPEED_STAGES[strategy]
        offload = "cpu" if strategy == "zero3_offload" else "none"
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": offload,
            "offload_param_device": offload,
            **({"zero3_init_flag": True, "zero3_save_16bit_model": True} if stage == 3 else {}),
        }
    elif is_fsdp(strategy):
        config["distributed_type"] = "FSDP"
        # What accelerate would build its plugin from; each rank builds the same plugin from the
        # recipe (engine/fsdp.py), and checks these against it (plan.fsdp_strategy_from_accelerate_env).
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": FSDP_RESHARD_AFTER_FORWARD[strategy],
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": False,
        }
    elif world_size > 1:
        config["distributed_type"] = "MULTI_GPU"
    else:
        config["distributed_type"] = "NO"
    if nodes > 1:
        config["main_process_ip"] = main_address
        config["main_process_port"] = main_port
    elif main_port is not None:
        config["main_process_port"] = main_port
    return config


def build_plan(recipe_path: str | Path, overrides: list[str], request: LaunchRequest) -> LaunchPlan:
    from ..data import prepare_data
    from ..model_io import load_tokenizer
    from ..engine.outputs import decide_start
    from ..sampling import steps_per_epoch
    from ..tasks import TASKS

    if request.nodes < 1:
        raise LauncherError(f"--nodes {request.nodes}: need at least 1 node")
    if request.nproc is not None and request.nproc < 1:
        raise LauncherError(f"--nproc {request.nproc}: need at least 1 process per node")
    if not 0 <= request.node_rank < request.nodes:
        raise LauncherError(f"--node-rank {request.node_rank}: must be between 0 and --nodes - 1 ({request.nodes - 1})")
    if request.nodes > 1 and not request.rendezvous_at_runtime and (not request.main_address or not request.main_port):
        raise LauncherError("--nodes > 1 needs --main-address (node 0's address) and --main-port, the same on every node")
    overrides = list(overrides)
    if request.strategy:
        overrides.append(f"distributed.strategy={request.strategy}")
    recipe = load_recipe(recipe_path, overrides)
    device, gpus = detect_device()

    user_config = None
    nodes = request.nodes
    if request.config_file is not None:
        user_config = _read_accelerate_config(request.config_file)
        gpu_ids = str(user_config.get("gpu_ids") or "all")
        if device == "cpu" and (gpu_ids not in ("all", "") or user_config.get("mixed_precision") == "fp16"):
            raise LauncherError(
                f"--config-file {request.config_file} selects GPUs (gpu_ids: {gpu_ids}, mixed_precision: "
                f"{user_config.get('mixed_precision')}) but this machine has none; use accelerate_configs/cpu.yaml"
            )
        nodes = request.nodes if request.nodes > 1 else int(user_config.get("num_machines") or 1)
        world = int(user_config.get("num_processes") or 1)
        procs_per_node = request.nproc or max(world // nodes, 1)
        env_view = _env_view(user_config)
    else:
        procs_per_node = request.nproc or max(gpus, 1)
        env_view = {}
    world_size = nodes * procs_per_node

    strategy = resolve_strategy(recipe.distributed.strategy, env_view)
    if is_deepspeed(strategy) and importlib.util.find_spec("deepspeed") is None:
        raise LauncherError(f"strategy {strategy} needs DeepSpeed, which is not installed; pip install deepspeed, or use --strategy ddp")
    batch = resolve_batch(recipe.training, world_size)
    check_accelerate_accumulation(env_view, batch)
    check_accelerate_precision(env_view, recipe.training.precision)
    check_accelerate_zero3_export(env_view, strategy)
    check_accelerate_clipping(env_view, recipe.training.max_grad_norm)
    if recipe.training.precision == "fp16" and device == "cpu":
        raise TopologyError("training.precision=fp16 needs a GPU; on CPU use fp32")
    if is_deepspeed(strategy) and recipe.training.on_nonfinite_loss == "skip":
        raise TopologyError("training.on_nonfinite_loss=skip works with DDP only; use on_nonfinite_loss=error with DeepSpeed")
    check_fsdp(strategy, recipe.training)

    start = decide_start(recipe)
    task = TASKS[recipe.task](recipe)
    # Tokenize now (the run reads the cache): steps count training *features*, which for some tasks
    # (long QA contexts split into windows, packed dialogues) are not one per raw row.
    data = prepare_data(recipe, task, load_tokenizer(recipe))
    examples = len(data.features["train"])
    per_epoch = steps_per_epoch(examples, batch)
    if per_epoch == 0:
        raise LauncherError(
            f"{data.sources['train']}: {examples} training rows are fewer than one global batch ({batch.describe()})"
        )
    total_steps = total_optimizer_steps(recipe.training, per_epoch)
    parameters = task.count_parameters()
    memory = memory_estimate(parameters, strategy, recipe.training.precision, world_size)

    main_port = request.main_port or (free_port() if world_size > 1 and nodes == 1 else None)
    generated = None
    extra: list[str] = []
    if user_config is None:
        generated = generated_accelerate_config(strategy, recipe.training.precision, nodes, request.node_rank,
                                                world_size, request.main_address, main_port, device)
    else:
        if request.nproc is not None or request.nodes > 1:
            extra += ["--num_processes", str(world_size), "--num_machines", str(nodes)]
        if request.nodes > 1:
            extra += ["--machine_rank", str(request.node_rank), "--main_process_ip", request.main_address,
                      "--main_process_port", str(request.main_port)]
    return LaunchPlan(
        recipe=recipe, recipe_path=Path(recipe_path), overrides=overrides, strategy=strategy, device=device,
        nodes=nodes, procs_per_node=procs_per_node, node_rank=request.node_rank, batch=batch,
        train_examples=examples, steps_per_epoch=per_epoch, total_steps=total_steps, num_parameters=parameters,
        memory=memory, run_dir=start.run_dir, resume_from=start.resume_from, accelerate_config=generated,
        user_config_file=request.config_file,
        deepspeed_config=deepspeed_config(strategy, batch, recipe.training) if is_deepspeed(strategy) else None,
        main_port=main_port, extra_accelerate_args=extra,
    )


def describe(plan: LaunchPlan) -> list[tuple[str, str]]:
    """The plan as (label, value) rows, for the table `launcher run` prints."""
    training, memory = plan.recipe.training, plan.memory
    backend = "nccl" if plan.device == "cuda" else "gloo"
    rows = [
        ("recipe", f"{plan.recipe_path} ({plan.recipe.task}, model {plan.recipe.model.name_or_path})"),
        ("world size", f"{plan.nodes} node(s) x {plan.procs_per_node} process(es) = {plan.world_size} ({plan.device}, {backend})"),
        ("batch", plan.batch.describe()),
        ("strategy", plan.strategy),
        ("precision", training.precision),
        ("steps", f"{plan.total_steps} optimizer steps; {plan.steps_per_epoch} per epoch over {plan.train_examples:,} training features"),
        ("parameters", f"{plan.num_parameters:,}"),
        ("memory / rank", f"parameters {format_bytes(memory.parameters)}, gradients {format_bytes(memory.gradients)}, "
                          f"optimizer state {format_bytes(memory.optimizer)} = {format_bytes(memory.device_total)} on "
                          f"{plan.device}" + (f"; {format_bytes(memory.cpu)} offloaded to CPU" if memory.cpu else "")
                          + " (model states only; activations extra)"),
        ("run directory", str(plan.run_dir) + (f" (resuming from {plan.resume_from.name})" if plan.resume_from else "")),
        ("accelerate config", str(plan.config_path)),
    ]
    if plan.deepspeed_config:
        rows.append(("deepspeed config", str(plan.launch_dir / "deepspeed_config.json")))
    if plan.nodes > 1:
        rows.append(("this node", f"rank {plan.node_rank} of {plan.nodes}; main {plan.accelerate_config.get('main_process_ip') if plan.accelerate_config else '?'}:{plan.main_port}"))
    return rows


def write_launch_files(plan: LaunchPlan, command: bool = True) -> None:
    import json

    import yaml

    from ..engine.outputs import write_text_atomic

    if plan.accelerate_config is not None:
        write_text_atomic(plan.config_path, yaml.safe_dump(plan.accelerate_config, sort_keys=False))
    if plan.deepspeed_config is not None:
        write_text_atomic(plan.launch_dir / "deepspeed_config.json", json.dumps(plan.deepspeed_config, indent=2) + "\n")
    if command:
        command_file = plan.launch_dir / f"command{plan.node_suffix}.sh"
        write_text_atomic(command_file, "#!/bin/sh\n" + plan.command() + "\n")
        os.chmod(command_file, 0o755)
