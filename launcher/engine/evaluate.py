"""Evaluation across ranks: every example predicted once, gathered, de-duplicated, scored once.

Each rank runs the same number of batches (see sampling.eval_shard): under ZeRO-3 a forward pass is
a collective, so a rank that stopped early would leave the others waiting forever.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..sampling import eval_shard


def batches(indices: list[int], batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def to_device(batch: dict, device) -> dict:
    """Move a collated batch to the device; on a GPU via pinned memory, so the copy is asynchronous
    and overlaps with work already queued."""
    pin = getattr(device, "type", str(device)) == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.no_grad()
def predict(model, features, task, tokenizer, accelerator, batch_size: int, progress=None,
            description: str = "evaluating") -> list[dict] | None:
    """Per-example records for the whole split, on the main process (None elsewhere). ``progress``: a
    launcher.progress.Progress showing one bar over the batches (generation included)."""
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    # Tasks get the plain module: a forward or generate() on it gathers ZeRO-3 shards through the hooks
    # DeepSpeed put on its submodules, and needs none of the wrapper's training-time bookkeeping.
    module = accelerator.unwrap_model(model)
    local: list[dict] = []
    shard = eval_shard(len(features), accelerator.num_processes, accelerator.process_index)
    with progress.task(description, total=-(-len(shard) // batch_size)) if progress else nullcontext() as bar:
        for chunk in batches(shard, batch_size):
            batch = to_device(task.collate(features[chunk], tokenizer), accelerator.device)
            local.extend(task.predict_batch(module, batch, tokenizer))
            if bar is not None:
                bar.advance()
    if was_training:
        model.train()
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    if not accelerator.is_main_process:
        return None
    unique: dict[int, dict] = {}
    for record in gathered:
        unique.setdefault(record["id"], record)  # padding duplicates carry identical predictions
    if len(unique) != len(features):
        raise RuntimeError(f"evaluation gathered {len(unique)} distinct examples, expected {len(features)}")
    return [unique[i] for i in sorted(unique)]
