"""Full weights in and out of a (possibly sharded) model: snapshot, restore, export."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .outputs import replace_dir_atomic


def full_state_dict(accelerator, model) -> dict | None:
    """The complete weights on CPU: on every rank for DDP/ZeRO-0/1/2, on rank 0 only under ZeRO-3.
    A collective under ZeRO-3: every rank must call it."""
    state = accelerator.get_state_dict(model)
    if state is None:
        return None
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def is_zero3(model) -> bool:
    return bool(getattr(model, "zero_optimization_partition_weights", lambda: False)())


def restore_state_dict(accelerator, model, state: dict | None) -> None:
    """Load weights from ``full_state_dict`` back into the live model (collective under ZeRO-3)."""
    module = accelerator.unwrap_model(model)
    if is_zero3(model):
        import deepspeed

        # Partitioned parameters: gather each, let rank 0 (which holds the snapshot) write it, and
        # DeepSpeed re-partitions the new values to every rank on exit.
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if accelerator.is_main_process:
                    param.data.copy_(state[name].to(param.device, param.dtype))
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"restoring weights: missing {missing}, unexpected {unexpected}")


def restore_exported(accelerator, model, directory: Path) -> None:
    """Load weights written by ``export_pretrained`` back into the live model (collective under ZeRO-3)."""
    from safetensors.torch import load_file

    needs_file = accelerator.is_main_process or not is_zero3(model)
    state = load_file(str(directory / "model.safetensors")) if needs_file else None
    restore_state_dict(accelerator, model, state)


def export_pretrained(accelerator, model, tokenizer, target: Path, state: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer into ``target``, atomically; all ranks call this."""
    if state is None:
        state = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        module = accelerator.unwrap_model(model)
        # save_original_format=False: write the names the model has in memory. transformers 5 would
        # otherwise "revert" load-time renamings, and under ZeRO-3 it records the legacy
        # LayerNorm.weight -> gamma renaming, exporting keys no plain BERT has.
        module.save_pretrained(staging, state_dict=state, safe_serialization=True, save_original_format=False)
        tokenizer.save_pretrained(staging)
        replace_dir_atomic(staging, target)
    accelerator.wait_for_everyone()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); under ZeRO-3 uses the full (not partitioned) sizes."""
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
    # foreach is the fast path on CPU; fused needs CUDA (or recent CPU builds) and changes nothing else.
    return {"fused": True} if torch.cuda.is_available() else {"foreach": True}
