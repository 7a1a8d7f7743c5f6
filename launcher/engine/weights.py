"""Full weights in and out of a (possibly sharded) model: snapshot, restore, export."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import model_card
from ..files import replace_dir_atomic
from ..finetune import is_peft, read_weights, save_weights, trainable_state
from .fsdp import is_fsdp_model, restore_full_state_dict


def full_state_dict(accelerator, model) -> dict | None:
    """The complete weights on CPU: on every rank for DDP/ZeRO-0/1/2, on rank 0 only under ZeRO-3
    and FSDP (empty elsewhere). A collective under ZeRO-3 and FSDP: every rank must call it."""
    state = accelerator.get_state_dict(model)
    if state is None:
        return None
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def is_zero3(model) -> bool:
    return bool(getattr(model, "zero_optimization_partition_weights", lambda: False)())


def restore_state_dict(accelerator, model, state: dict | None) -> None:
    """Load (possibly partial) weights, keyed like the live module, into the model; a collective
    under ZeRO-3 and FSDP."""
    if is_fsdp_model(model):
        restore_full_state_dict(model, state)
        return
    module = accelerator.unwrap_model(model)
    if is_zero3(model):
        import deepspeed

        # Partitioned parameters: every rank gathers each one (a collective, so all ranks walk the
        # same list), rank 0 - which holds the weights - writes it, and DeepSpeed re-partitions the
        # new values to every rank on exit.
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if accelerator.is_main_process and name in state:
                    param.data.copy_(state[name].to(param.device, param.dtype))
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"restoring weights: unexpected keys {unexpected[:5]}")


RESTORE_FILE = "trainable.safetensors"  # live-named trainable weights, for methods whose export renames them


def restore_exported(accelerator, model, directory: Path) -> None:
    """Load weights written by ``export_pretrained`` back into the live model (collective under ZeRO-3)."""
    from safetensors.torch import load_file

    state = None
    if accelerator.is_main_process or not is_zero3(model):
        restore = directory / RESTORE_FILE
        state = load_file(str(restore)) if restore.exists() else read_weights(directory)
    restore_state_dict(accelerator, model, state)


def export_pretrained(accelerator, model, tokenizer, target: Path, recipe, task, state: dict | None = None,
                      card=None) -> None:
    """Export the model (safetensors) + tokenizer (+ the model card, a ``model_card.CardFacts``) into
    ``target`` the way recipe.finetune.method needs, atomically; all ranks call this (gathering ZeRO-3
    shards is a collective)."""
    from safetensors.torch import save_file

    if state is None:
        state = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        module = accelerator.unwrap_model(model)
        save_weights(module, staging, state, recipe, task)
        if is_peft(module):
            trainable = trainable_state(module, state)
            save_file({k: v.contiguous() for k, v in trainable.items()}, str(staging / RESTORE_FILE))
        tokenizer.save_pretrained(staging)
        if card is not None:
            model_card.write(staging, card, location=target)  # replaces the card peft writes
        replace_dir_atomic(staging, target)
    accelerator.wait_for_everyone()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); under ZeRO-3 and FSDP the full (not partitioned) sizes."""
    trainable = total = 0
    for param in model.parameters():
        numel = getattr(param, "ds_numel", None) or param.numel()
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def optimizer_param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalization weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are flat partitions
        if len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def fused_adamw_kwargs() -> dict:
    # One fused kernel per step on CUDA and on the CPU (torch >= 2.4): on 2 CPU cores AdamW over MiniLM's
    # 22.7 M parameters takes 5x less CPU time fused than foreach (docs/performance.md); same update.
    return {"fused": True}
