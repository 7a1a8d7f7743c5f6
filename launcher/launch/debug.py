"""`launcher debug`: the recipe on one process, a few batches of a small subset, loudly.

For finding a recipe's bugs before a cluster job: no DeepSpeed, autograd anomaly detection on, one
decoded batch printed (what the model really sees), the evaluation and export paths run once, and
any failure shown with its full traceback. It is the training path (FineTuneRun) with a few recipe
overrides, and the batch arithmetic is the plan's (resolve_batch for one process).
"""

from __future__ import annotations

import os

import torch

from ..engine.evaluate import to_device
from ..engine.run import FineTuneRun
from ..errors import LauncherError
from ..plan import resolve_batch
from ..recipe import load_recipe, with_overrides
from ..schema import Recipe

DEBUG_STEPS = 3


def debug_overrides(recipe: Recipe) -> list[str]:
    """What debug mode changes: one process, DDP, a few steps on a few batches, nothing resumed or kept."""
    batch = resolve_batch(recipe.training, world_size=1)  # the run's own split of the global batch
    eval_batch = recipe.evaluation.micro_batch_size or 2 * batch.micro_batch_size
    return [
        "distributed.strategy=ddp",
        f"training.max_steps={DEBUG_STEPS}",
        "training.global_batch_size=null",
        f"training.grad_accum_steps={batch.grad_accum_steps}",
        "training.log_every=1",
        f"data.max_train_samples={batch.global_batch_size * DEBUG_STEPS}",
        f"data.max_eval_samples={2 * eval_batch}",
        "evaluation.every_steps=null",
        "evaluation.early_stopping_patience=null",
        "checkpoint.every_steps=null",
        "checkpoint.every_epoch=false",
        "checkpoint.resume=never",
        f"output.dir={recipe.output.dir}-debug",
        "output.overwrite=true",
    ]


def run_debug(recipe_path: str, overrides: list[str]) -> dict | None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LauncherError("launcher debug runs one process; start it directly, not under accelerate launch/torchrun")
    recipe = load_recipe(recipe_path, overrides)
    changes = debug_overrides(recipe)
    recipe = with_overrides(recipe, changes)
    print("debug mode: " + ", ".join(changes))
    torch.autograd.set_detect_anomaly(True)
    run = FineTuneRun(recipe)
    try:
        run.setup()
        features = run.train_features
        first = list(range(min(recipe.training.micro_batch_size, len(features))))
        batch = to_device(run.task.collate(features[first], run.tokenizer), run.accelerator.device)
        print(f"first training batch ({len(first)} examples, padded to {batch['input_ids'].shape[1]} tokens):")
        for line in run.task.describe_batch(batch, run.tokenizer):
            print("  " + line)
        run.train()
        return run.finish()
    finally:
        run.close()
