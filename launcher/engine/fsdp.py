"""PyTorch FSDP2 through accelerate's FullyShardedDataParallelPlugin (fsdp_version 2): the plugin for
a strategy, the accelerate gap on CPU hosts, and full weights back into a sharded model.

Everything else FSDP needs goes through accelerate's own calls, which the loop already makes:
``accelerator.prepare`` shards the model, ``no_sync`` turns off gradient reduction for all but the
last micro-batch (``set_requires_gradient_sync``), ``clip_grad_norm_`` clips over all shards,
``get_state_dict`` gathers the full weights on rank 0 for export, ``save_state``/``load_state`` write
and read sharded (distributed-checkpoint) model and optimizer state.
"""

from __future__ import annotations

import torch

from ..errors import TopologyError
from ..plan import Strategy


def fsdp_plugin(strategy: Strategy):
    """The plugin for ``fsdp`` (reshard after forward) or ``fsdp_grad_op`` (keep whole until backward)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=strategy.reshard_after_forward,
        # One FSDP unit per transformer block (BertLayer, GPT2Block, T5Block, ...: choose_units names
        # them before prepare); accelerate adds one for the input embeddings, the rest goes to the root.
        auto_wrap_policy="transformer_based_wrap",
        # Checkpoints: each rank writes its own shards (torch.distributed.checkpoint).
        state_dict_type="SHARDED_STATE_DICT",
        # Every rank loads the pretrained weights itself (as under DDP). Passing False also tells
        # transformers (through FSDP_CPU_RAM_EFFICIENT_LOADING, which `accelerate launch --use_fsdp`
        # sets to true by default) not to leave the weights of ranks > 0 empty for a broadcast that
        # this plugin would then not do.
        cpu_ram_efficient_loading=False,
    )


def adopt_on_cpu(accelerator, plugin) -> None:
    """Turn an accelerate CPU (MULTI_CPU, gloo) state into FSDP2 with ``plugin``.

    Why: accelerate 1.16 selects FSDP only for accelerator device types (AcceleratorState: the FSDP
    branch sits under MULTI_GPU/MULTI_XPU/...); on a CPU host it silently ignores the plugin - with
    cpu=True every rank runs plain DDP, with cpu=False (DistributedType.NO) every rank trains alone.
    torch 2.13's fully_shard itself runs on gloo (all_gather_single, and reduce_scatter_single with
    ReduceOp.AVG, both of which gloo implements) and gives DDP's numbers (tests/integration/
    test_fsdp.py), so the launcher sets the type itself, the way accelerate does on a GPU host
    (state.py: distributed_type FSDP, fsdp_plugin). PartialState holds the type too: AcceleratorState
    copies it back from there each time it is constructed."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise TopologyError(
            f"FSDP on a CPU host: accelerate set up {accelerator.distributed_type}, expected MULTI_CPU (gloo); "
            f"start the ranks with `launcher run`, `accelerate launch` or `torchrun`"
        )
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        import accelerate

        raise TopologyError(
            f"accelerate {accelerate.__version__} did not take FSDP2 on this CPU host; run FSDP on GPUs, or use "
            f"distributed.strategy=ddp / zero1 / zero2 / zero3 here"
        )


def choose_units(accelerator, model) -> None:
    """Before ``accelerator.prepare`` under FSDP: name the blocks that become FSDP units
    (``transformer_units``), unless the accelerate config named them (fsdp_transformer_layer_cls_to_wrap)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = transformer_units(model)


def transformer_units(model) -> list[str]:
    """The ``_no_split_modules`` classes this model has, minus those holding the input or output
    embeddings (accelerate carves those into units of their own).

    Why not accelerate's default (all of ``_no_split_modules``): for BERT that includes
    BertEmbeddings, and accelerate 1.16's fsdp2_prepare_model then shards the word embeddings a second
    time, which fails on the already sharded weight ("TypeError: Invariant encountered: value was None
    when it should not be", in DeviceMesh._concatenate)."""
    embeddings = [m for m in (getattr(model, "get_input_embeddings", lambda: None)(),
                              getattr(model, "get_output_embeddings", lambda: None)()) if m is not None]
    holders = {type(module).__name__ for module in model.modules()
               if any(sub is embedding for sub in module.modules() for embedding in embeddings)}
    present = {type(module).__name__ for module in model.modules()}
    return sorted((present & set(getattr(model, "_no_split_modules", None) or [])) - holders)


def is_fsdp_model(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def restore_full_state_dict(model, state: dict) -> None:
    """Load full (possibly partial: only trainable) weights, keyed like the live module, into the
    sharded model; every rank passes the same full tensors and keeps its own shard. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    # After an evaluation (forwards without a backward) the root unit - and every unit under
    # fsdp_grad_op - still holds its gathered weights as plain tensors; loading the sharded values
    # into those fails ("aten.copy_.default got mixed torch.Tensor and DTensor").
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    incompatible = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    if incompatible.unexpected_keys:
        raise RuntimeError(f"restoring weights: unexpected keys {incompatible.unexpected_keys[:5]}")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or optimizer state (a DTensor); other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor
