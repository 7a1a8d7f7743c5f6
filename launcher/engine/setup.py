"""Distributed setup: one Accelerator per rank, built from the recipe, checked against torch.distributed."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import TopologyError
from ..plan import BatchPlan, Strategy, check_launch, deepspeed_config, resolve_batch, resolve_strategy
from ..schema import Recipe
from .fsdp import adopt_on_cpu, fsdp_plugin


@dataclass
class Topology:
    strategy: Strategy
    batch: BatchPlan
    deepspeed_config: dict | None
    backend: str


def launched_world_size(env=None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1"))


def plan_topology(recipe: Recipe, env=None) -> Topology:
    """This rank's view of the launch: the strategy (recipe vs what `accelerate launch` was told), the
    batch plan for the world size it was started in, and the same checks `launcher run` made."""
    env = os.environ if env is None else env
    strategy = resolve_strategy(recipe.distributed.strategy, env)
    batch = resolve_batch(recipe.training, launched_world_size(env))
    check_launch(recipe.training, strategy, batch, env, cuda=torch.cuda.is_available())
    ds_config = deepspeed_config(strategy, batch, recipe.training) if strategy.is_deepspeed else None
    # Gloo on CPU. Naming the backend explicitly matters: under `accelerate launch --use_deepspeed`
    # on a CPU-only host Accelerate otherwise reports num_processes=1 / process_index=0 on every rank.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Topology(strategy, batch, ds_config, backend)


def build_accelerator(recipe: Recipe, topology: Topology, trackers: dict | None = None):
    """``trackers``: accelerate's tracker arguments (log_with, project_config) from launcher/tracking.py."""
    if not torch.cuda.is_available():
        # Say it up front instead of DeepSpeed warning on every rank that it "fell back" to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    if topology.deepspeed_config is not None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise TopologyError(
                f"distributed.strategy={topology.strategy} needs DeepSpeed, which cannot be imported ({exc}); "
                f"pip install deepspeed, or use strategy ddp"
            ) from None
    # The accelerate config's DeepSpeed fields (stage, offload, accumulation, clipping, precision) were
    # read and checked against the recipe in plan_topology; the JSON we hand over already holds them.
    # Accelerate would otherwise refuse a full DeepSpeed config next to those fields.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=topology.deepspeed_config) if topology.deepspeed_config else None
    fsdp = fsdp_plugin(topology.strategy) if topology.strategy.is_fsdp else None
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.training.precision]
    distributed = "LOCAL_RANK" in os.environ or launched_world_size() > 1
    if (plugin is not None or fsdp is not None) and not distributed:
        # A single plain process under DeepSpeed or FSDP: give it the one-rank environment a launcher would.
        _single_rank_env()
        distributed = True
    handlers = []
    if distributed:
        handlers.append(
            InitProcessGroupKwargs(
                backend=topology.backend, timeout=timedelta(minutes=recipe.distributed.timeout_minutes)
            )
        )
    accelerator = Accelerator(
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp,
        # Accelerate's cpu=True path (MULTI_CPU) skips DeepSpeed's own process-group setup, so it is
        # only used for DDP and FSDP (adopt_on_cpu below); DeepSpeed on a CPU host runs with cpu=False
        # and an explicit gloo backend.
        cpu=not torch.cuda.is_available() and plugin is None,
        kwargs_handlers=handlers,
        dynamo_backend="inductor" if recipe.training.compile else "no",
        **(trackers or {}),
    )
    if fsdp is not None and not torch.cuda.is_available():
        adopt_on_cpu(accelerator, fsdp)
    check_topology(accelerator)
    return accelerator


def _single_rank_env() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def check_topology(accelerator) -> None:
    """Accelerate's view of the world must equal torch.distributed's (and the launcher's env)."""
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        dist_world, dist_rank = dist.get_world_size(), dist.get_rank()
    else:
        dist_world, dist_rank = 1, 0
    views = {
        "accelerate": (accelerator.num_processes, accelerator.process_index),
        "torch.distributed": (dist_world, dist_rank),
        "launcher environment (WORLD_SIZE/RANK)": (env_world, env_rank),
    }
    if len(set(views.values())) != 1:
        described = "; ".join(f"{name}: world {w}, rank {r}" for name, (w, r) in views.items())
        raise TopologyError(
            f"process layout disagrees ({described}); every rank would see the wrong data shard. "
            f"Launch with `accelerate launch`, `torchrun`, or `launcher run`, and do not mix launcher configs"
        )


def shutdown_distributed(accelerator) -> None:
    """End a command's distributed state while the interpreter is still fully alive. Left to
    interpreter exit, a gloo process group (kept alive by DDP's reducer or DeepSpeed's engine) is
    destroyed during finalization and can abort the process ("terminate called without an active
    exception", exit -6) after all the work is done - torchrun then reports the job as failed."""
    import gc

    import torch.distributed as dist

    accelerator.free_memory()  # drops accelerate's references to the prepared model, optimizer, engine
    gc.collect()
    accelerator.end_training()  # (accelerate destroys its process group here)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
