"""Pure arithmetic and config generation: recipe + topology -> batch plan, strategy, DeepSpeed JSON.

Nothing here touches torch.distributed; everything is unit-testable and printable. This module
is the single place where micro-batch, accumulation, world size and global batch are related.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from .errors import TopologyError
from .schema import STRATEGIES, TrainingSection

DEEPSPEED_STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
# PyTorch FSDP2 (accelerate's plugin, fsdp_version 2). Both shard gradients and optimizer state; the
# value says whether a layer's weights are sharded again right after its forward (full shard) or stay
# whole until its backward is done (SHARD_GRAD_OP: less communication, more memory during the step).
FSDP_RESHARD_AFTER_FORWARD = {"fsdp": True, "fsdp_grad_op": False}


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    global_batch_size: int

    def describe(self) -> str:
        return (
            f"micro_batch_size {self.micro_batch_size} x grad_accum_steps {self.grad_accum_steps} "
            f"x world_size {self.world_size} = global_batch_size {self.global_batch_size}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_batch(training: TrainingSection, world_size: int) -> BatchPlan:
    """Derive the missing one of (grad_accum_steps, global_batch_size); reject impossible splits."""
    if world_size < 1:
        raise TopologyError(f"world size must be >= 1, got {world_size}")
    micro = training.micro_batch_size
    per_accum_step = micro * world_size
    if training.global_batch_size is not None:
        global_batch = training.global_batch_size
        if global_batch % per_accum_step:
            raise TopologyError(
                f"training.global_batch_size={global_batch} cannot be split over world size {world_size}: "
                f"it must be a multiple of micro_batch_size {micro} x world_size {world_size} = {per_accum_step} "
                f"({global_batch} / {per_accum_step} = {global_batch / per_accum_step:g}); change "
                f"global_batch_size (e.g. {max(per_accum_step, global_batch // per_accum_step * per_accum_step)}), "
                f"micro_batch_size, or the number of processes"
            )
        accum = global_batch // per_accum_step
        if training.grad_accum_steps is not None and training.grad_accum_steps != accum:
            raise TopologyError(
                f"training.grad_accum_steps={training.grad_accum_steps} contradicts global_batch_size={global_batch}: "
                f"{global_batch} / (micro_batch_size {micro} x world_size {world_size}) = {accum}; "
                f"set only one of grad_accum_steps and global_batch_size"
            )
    else:
        accum = training.grad_accum_steps or 1
        global_batch = per_accum_step * accum
    return BatchPlan(micro, accum, world_size, global_batch)


def total_optimizer_steps(training: TrainingSection, steps_per_epoch: int) -> int:
    """max_steps if set, else epochs (possibly fractional) worth of steps, rounded up."""
    return training.max_steps or math.ceil(training.epochs * steps_per_epoch)


@dataclass(frozen=True)
class Strategy:
    """How model state is spread over the ranks: the one value that travels from the plan to every
    rank (the recipe's ``distributed.strategy`` once resolved against the launch configuration)."""

    name: str  # one of schema.STRATEGIES except "auto"

    def __post_init__(self):
        if self.name not in STRATEGIES or self.name == "auto":
            raise TopologyError(f"distributed.strategy: unknown strategy {self.name!r}; choose one of "
                                f"{', '.join(s for s in STRATEGIES if s != 'auto')}")

    def __str__(self) -> str:
        return self.name

    @property
    def is_deepspeed(self) -> bool:
        return self.name in DEEPSPEED_STAGES

    @property
    def zero_stage(self) -> int | None:
        return DEEPSPEED_STAGES.get(self.name)

    @property
    def offload(self) -> bool:
        """Optimizer state and weights live in host memory (ZeRO-3 offload)."""
        return self.name == "zero3_offload"

    @property
    def is_fsdp(self) -> bool:
        return self.name in FSDP_RESHARD_AFTER_FORWARD

    @property
    def reshard_after_forward(self) -> bool | None:
        """FSDP2: whether a layer's weights are sharded again right after its forward (None: not FSDP)."""
        return FSDP_RESHARD_AFTER_FORWARD.get(self.name)

    @property
    def shards_weights(self) -> bool:
        """Each rank holds only a shard of the weights: a forward pass (and every generation step) is a
        collective, so ranks must step together and exports gather the shards (ZeRO-3; FSDP2 in both
        forms keeps only shards between steps)."""
        return self.zero_stage == 3 or self.is_fsdp


def strategy_from_accelerate_env(env: Mapping[str, str]) -> Strategy | None:
    """The strategy an `accelerate launch` config asked for (None if it asked for none)."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return fsdp_strategy_from_accelerate_env(env)
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
    offload = {
        kind: env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none") or "none"
        for kind in ("optimizer", "param")
    }
    if all(device == "none" for device in offload.values()):
        return Strategy(f"zero{stage}")
    if stage == 3 and all(device == "cpu" for device in offload.values()):
        return Strategy("zero3_offload")
    raise TopologyError(
        f"the accelerate config asks for ZeRO-{stage} with offload_optimizer_device={offload['optimizer']}, "
        f"offload_param_device={offload['param']}; the launcher offers offload as zero3_offload (stage 3, optimizer "
        f"and parameters on cpu): use accelerate_configs/deepspeed_zero3_offload.yaml or remove the offload settings"
    )


def fsdp_strategy_from_accelerate_env(env: Mapping[str, str]) -> Strategy:
    """fsdp or fsdp_grad_op from `accelerate launch --use_fsdp` settings; what the launcher does not
    offer is refused rather than silently replaced by the recipe's plugin."""
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise TopologyError(
            f"the accelerate config asks for FSDP version {version}; the launcher runs FSDP2 only: set "
            f"fsdp_version: 2 in the accelerate config (accelerate launch --fsdp_version 2)"
        )
    for variable, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                          ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
        if env.get(variable, "false").lower() in ("true", "yes", "1"):
            raise TopologyError(f"the accelerate config sets {key}: true, which the launcher does not offer "
                                f"with FSDP; remove it (strategies fsdp and fsdp_grad_op keep everything on the device)")
    given = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    reshard = given.lower()
    if reshard not in ("true", "false", "yes", "no", "1", "0"):
        raise TopologyError(f"the accelerate config sets fsdp_reshard_after_forward: {given}; FSDP2 takes true "
                            f"(strategy fsdp) or false (strategy fsdp_grad_op)")
    return Strategy("fsdp" if reshard in ("true", "yes", "1") else "fsdp_grad_op")


def resolve_strategy(recipe_strategy: str, env: Mapping[str, str] | None = None) -> Strategy:
    """Combine the recipe's distributed.strategy with what `accelerate launch` was told.

    The two must agree; `auto` follows the launcher, and defaults to DDP (which is also what a single
    process runs: DDP over one rank is the plain model).
    """
    env = os.environ if env is None else env
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        raise TopologyError(
            f"the accelerate config names a DeepSpeed config file ({env['ACCELERATE_DEEPSPEED_CONFIG_FILE']}); "
            "the launcher generates the DeepSpeed config from the recipe: remove deepspeed_config_file from the "
            "accelerate config and set zero_stage there (or distributed.strategy in the recipe)"
        )
    launched_with = strategy_from_accelerate_env(env)
    if recipe_strategy == "auto":
        return launched_with or Strategy("ddp")
    if launched_with is not None and launched_with.name != recipe_strategy:
        raise TopologyError(
            f"distributed.strategy={recipe_strategy} but accelerate was launched with "
            f"{'DeepSpeed ' if launched_with.is_deepspeed else ''}{launched_with}; "
            f"make them agree (or set distributed.strategy=auto to follow the accelerate config)"
        )
    return Strategy(recipe_strategy)


def check_launch(training: TrainingSection, strategy: Strategy, batch: BatchPlan, env: Mapping[str, str],
                 cuda: bool) -> None:
    """Every check of a recipe against its launch: the one list, called by the launcher before anything
    starts (`launcher run/slurm`, `--dry-run`) and by every rank at start (plain `accelerate launch`,
    `torchrun`). ``env`` is the ACCELERATE_* view of the launch configuration; ``cuda`` whether the
    ranks will have GPUs."""
    # The recipe is the one source of truth for accumulation, clipping and precision.
    value = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if value not in (None, "", "1") and int(value) != batch.grad_accum_steps:
        raise TopologyError(
            f"the accelerate config sets gradient_accumulation_steps={value} but the recipe resolves to "
            f"{batch.grad_accum_steps} ({batch.describe()}); remove gradient_accumulation_steps from the "
            f"accelerate config: the recipe's training section is the one place batch sizes are set"
        )
    launched = env.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[training.precision]
    if launched not in ("", "no") and launched != wanted:
        raise TopologyError(
            f"the accelerate config sets mixed_precision={launched} but the recipe says training.precision="
            f"{training.precision}; set mixed_precision: 'no' in the accelerate config (the recipe decides) or "
            f"change training.precision"
        )
    # Exporting a ZeRO-3 model needs its shards gathered; a config that turns that off would leave no
    # full weights to export or to keep as the best model.
    value = env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
    if strategy.zero_stage == 3 and value is not None and value.lower() == "false":
        raise TopologyError(
            "the accelerate config sets zero3_save_16bit_model: false, but under ZeRO-3 the exported model and the "
            "best-model copy need the full gathered weights; set zero3_save_16bit_model: true (or remove it)"
        )
    value = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if value not in (None, "", "none", "None") and float(value) != float(training.max_grad_norm):
        raise TopologyError(
            f"the accelerate config sets gradient_clipping={value} but the recipe says training.max_grad_norm="
            f"{training.max_grad_norm}; remove gradient_clipping from the accelerate config (the recipe decides)"
        )
    if training.precision == "fp16" and not cuda:
        raise TopologyError("training.precision=fp16 needs a GPU; on CPU use fp32 (or bf16, which is slow on most CPUs)")
    if strategy.is_deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise TopologyError(f"distributed.strategy={strategy} needs DeepSpeed, which is not installed; "
                            f"pip install deepspeed, or use strategy ddp")
    if strategy.offload and not cuda:
        missing = cpu_adam_unbuildable()
        if missing:
            raise TopologyError(f"distributed.strategy={strategy} needs DeepSpeed's CPU Adam, which is not built and "
                                f"cannot be built here ({missing}); install it, or use zero3")
    if strategy.is_deepspeed and training.compile:
        raise TopologyError(f"training.compile works with DDP only, not under DeepSpeed ({strategy}); "
                            f"set training.compile=false")
    if strategy.is_fsdp and training.compile:
        raise TopologyError(f"training.compile works with DDP only, not under FSDP ({strategy}); set training.compile=false")
    if strategy.is_deepspeed and training.on_nonfinite_loss == "skip":
        raise TopologyError(
            f"training.on_nonfinite_loss=skip works with DDP only; under DeepSpeed ({strategy}) the gradients are "
            f"already reduced into ZeRO buffers when the loss is known: use on_nonfinite_loss=error"
        )


def cpu_adam_unbuildable() -> str | None:
    """Why DeepSpeed's CPU Adam (the optimizer of zero3_offload) cannot be used here, or None. DeepSpeed
    compiles it on first use (torch's JIT extensions: ninja and a C++ compiler; minutes, once per machine,
    cached under TORCH_EXTENSIONS_DIR) unless it was built at install time (DS_BUILD_CPU_ADAM=1)."""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None:
        return "DeepSpeed is not installed"
    for location in spec.submodule_search_locations or []:
        if any((Path(location) / "ops" / "adam").glob("cpu_adam*.so")):
            return None  # prebuilt
    compiler = os.environ.get("CXX", "c++")
    absent = [tool for tool, found in (("ninja", shutil.which("ninja")),
                                       (f"C++ compiler ({compiler})", shutil.which(compiler))) if not found]
    return "no " + ", no ".join(absent) + " to compile it" if absent else None


def deepspeed_config(strategy: Strategy, batch: BatchPlan, training: TrainingSection) -> dict:
    """The complete DeepSpeed JSON for a strategy: every value explicit, no "auto" left.

    Clipping is written out even when disabled because DeepSpeed 0.19 silently clips at 1.0 when
    `gradient_clipping` is absent.
    """
    stage = strategy.zero_stage
    zero: dict = {"stage": stage}
    if stage == 3:
        # Export and best-model snapshots need the full weights on rank 0; gathering them is what this
        # (oddly named) flag does, for any precision, fp32 included.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if strategy.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch_size,
        "gradient_accumulation_steps": batch.grad_accum_steps,
        "gradient_clipping": float(training.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": training.precision == "bf16"},
        "fp16": {"enabled": training.precision == "fp16", "initial_scale_power": 16},
        # We pass torch's AdamW; DeepSpeed would refuse an optimizer it has not tested with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------------------
# Per-rank memory for model states (the ZeRO paper's accounting; activations not included).

@dataclass(frozen=True)
class MemoryEstimate:
    parameters: float  # bytes per rank on the device
    gradients: float
    optimizer: float
    cpu: float  # bytes per rank moved to host memory by offload

    @property
    def device_total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def memory_estimate(num_parameters: int, strategy: Strategy, precision: str, world_size: int) -> MemoryEstimate:
    """Model-state bytes per rank: weights, gradients, and the optimizer's share - AdamW's m and v,
    plus the fp32 master copy of the weights that DeepSpeed keeps in 16-bit training (and, under
    ZeRO-1/2, in fp32 too: its partition is a separate flat copy). DDP and ZeRO-0 keep
    everything on every rank; ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3
    also the weights; offload moves the optimizer state and the weights to host memory. FSDP2
    shards gradients and optimizer state, and under `fsdp` (full shard) the weights too."""
    n = num_parameters
    stage = strategy.zero_stage or 0
    sixteen_bit_weights = precision in ("bf16", "fp16") and strategy.is_deepspeed
    weight_bytes = 2 if sixteen_bit_weights else 4
    params, grads = weight_bytes * n, weight_bytes * n
    # ZeRO-1/2 step a flat fp32 copy of this rank's partition even in fp32 training; ZeRO-3 in fp32
    # steps its partitioned weights in place (DeepSpeed: "we don't need another copy").
    master_copy = 4 if (stage in (1, 2) or sixteen_bit_weights) else 0
    optimizer = (8 + master_copy) * n
    if stage >= 1:
        optimizer /= world_size
    if stage >= 2:
        grads /= world_size
    if stage >= 3:
        params /= world_size
    if strategy.is_fsdp:
        # FSDP2 steps its fp32 shards in place (no master copy); fsdp_grad_op holds a layer's whole
        # weights from its forward to its backward, so the step's peak has them all.
        grads /= world_size
        optimizer /= world_size
        if strategy.reshard_after_forward:
            params /= world_size
    cpu = 0.0
    if strategy.offload:
        cpu = optimizer + params
        optimizer, params = 0.0, 0.0
    return MemoryEstimate(params, grads, optimizer, cpu)


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value} B"
