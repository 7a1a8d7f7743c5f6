"""The `accelerate launch` backend: a plan -> an accelerate config file and the command line that
starts every rank of this node. The one module that knows accelerate's config keys and flags (a new
backend, e.g. torchrun-only, is one more module like this)."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
import yaml

from ..errors import LauncherError
from ..files import write_text_atomic

# Functions below take a launch/plan.py LaunchPlan (named in annotations only: plan.py builds on this
# module, not the other way round).

PRECISION_TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class UserConfig:
    """A user's own accelerate config file (--config-file), read once with accelerate's own loader."""

    path: Path
    num_machines: int
    num_processes: int
    gpu_ids: str
    mixed_precision: str
    distributed_type: str
    env: dict[str, str] = field(default_factory=dict)  # the ACCELERATE_* view each rank will get

    @property
    def selects_gpus(self) -> bool:
        return self.gpu_ids not in ("all", "") or self.mixed_precision == "fp16"

    @property
    def is_deepspeed(self) -> bool:
        return self.distributed_type.endswith("DEEPSPEED")


def read_user_config(path: Path) -> UserConfig:
    from accelerate.commands.config.config_args import load_config_from_file

    if not path.is_file():
        raise LauncherError(f"--config-file: {path} not found")
    try:
        config = load_config_from_file(str(path)).to_dict()
    except Exception as exc:  # accelerate raises ValueError/TypeError/yaml errors for bad files
        raise LauncherError(f"--config-file: {path} is not a valid accelerate config ({exc})") from None
    return UserConfig(path=path, num_machines=int(config.get("num_machines") or 1),
                      num_processes=int(config.get("num_processes") or 1), gpu_ids=str(config.get("gpu_ids") or "all"),
                      mixed_precision=str(config.get("mixed_precision") or "no"),
                      distributed_type=str(config.get("distributed_type", "")), env=env_view(config))


def env_view(config: dict) -> dict[str, str]:
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


# DeepSpeed over several machines: by default accelerate hands the whole job to DeepSpeed's own
# runner (pdsh/ssh from node 0, a `deepspeed` executable on PATH). We start every node ourselves (one
# `launcher run` per node, or one srun task per node), so each node must be started like DDP's:
# torchrun with its machine rank - accelerate calls that launcher "standard".
MULTINODE_DEEPSPEED_LAUNCHER = "standard"


def generated_config(plan: "LaunchPlan", *, per_node: bool = True) -> dict:
    """The accelerate config for a plan. Batch sizes and clipping are deliberately absent: each rank
    writes them into the DeepSpeed config from the recipe. ``per_node=False``: the parts every node
    shares (Slurm fills in machine rank and main address at run time)."""
    strategy = plan.strategy
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": plan.nodes,
        "num_processes": plan.world_size,
        "mixed_precision": PRECISION_TO_ACCELERATE[plan.recipe.training.precision],
        "main_training_function": "main",
        # Accelerate's CPU mode would start one process without MPI; its torchrun path (MULTI_GPU)
        # starts N CPU ranks, and the launcher then picks gloo.
        "use_cpu": False,
        "same_network": True,
        "rdzv_backend": "static" if per_node else "c10d",
    }
    if per_node:
        config["machine_rank"] = plan.node_rank
    if plan.device == "cuda":
        config["gpu_ids"] = "all"
    if strategy.is_deepspeed:
        offload = "cpu" if strategy.offload else "none"
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": strategy.zero_stage,
            "offload_optimizer_device": offload,
            "offload_param_device": offload,
            **({"zero3_init_flag": True, "zero3_save_16bit_model": True} if strategy.zero_stage == 3 else {}),
        }
        if plan.nodes > 1:
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = MULTINODE_DEEPSPEED_LAUNCHER
    elif strategy.is_fsdp:
        config["distributed_type"] = "FSDP"
        # What accelerate would build its plugin from; each rank builds the same plugin from the
        # recipe (engine/fsdp.py), and checks these against it (plan.fsdp_strategy_from_accelerate_env).
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": strategy.reshard_after_forward,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": False,
        }
    elif plan.world_size > 1:
        config["distributed_type"] = "MULTI_GPU"
    else:
        config["distributed_type"] = "NO"
    if per_node:
        if plan.nodes > 1:
            config["main_process_ip"] = plan.main_address
            config["main_process_port"] = plan.main_port
        elif plan.main_port is not None:
            config["main_process_port"] = plan.main_port
    return config


def node_suffix(plan: "LaunchPlan") -> str:
    # Each node of a multi-node run writes its own files: the run directory is usually shared.
    per_node = plan.nodes > 1 and plan.user_config is None and not plan.rendezvous_at_runtime
    return f".node{plan.node_rank}" if per_node else ""


def config_path(plan: "LaunchPlan") -> Path:
    if plan.user_config is not None:
        return plan.user_config.path
    return plan.launch_dir / f"accelerate_config{node_suffix(plan)}.yaml"


def command_path(plan: "LaunchPlan") -> Path:
    return plan.launch_dir / f"command{node_suffix(plan)}.sh"


def _user_config_args(plan: "LaunchPlan") -> list[str]:
    """Flags that adapt a user's own config file to what the command line asked for."""
    user, args = plan.user_config, []
    if user is None:
        return args
    if plan.nodes != user.num_machines or plan.world_size != user.num_processes:
        args += ["--num_processes", str(plan.world_size), "--num_machines", str(plan.nodes)]
    if plan.nodes > 1 and plan.main_address is not None and not plan.rendezvous_at_runtime:
        args += ["--machine_rank", str(plan.node_rank), "--main_process_ip", str(plan.main_address),
                 "--main_process_port", str(plan.main_port)]
    if plan.nodes > 1 and user.is_deepspeed:
        args += ["--deepspeed_multinode_launcher", MULTINODE_DEEPSPEED_LAUNCHER]
    return args


def launcher_prefix() -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def argv(plan: "LaunchPlan") -> list[str]:
    return [*launcher_prefix(), "--config_file", str(config_path(plan)), *_user_config_args(plan), *plan.train_argv()]


def command(plan: "LaunchPlan") -> str:
    return shlex.join(argv(plan))


def write_launch_files(plan: "LaunchPlan", command_file: bool = True) -> None:
    """The accelerate config this node's command uses (unless the user gave their own) and the command."""
    if plan.user_config is None:
        write_text_atomic(config_path(plan), yaml.safe_dump(generated_config(plan), sort_keys=False))
    if command_file:
        path = command_path(plan)
        write_text_atomic(path, "#!/bin/sh\n" + command(plan) + "\n")
        os.chmod(path, 0o755)
