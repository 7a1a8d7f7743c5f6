"""`launcher debug`: the recipe on one process, a few batches of a small subset, loudly.

For finding a recipe's bugs before a cluster job: no DeepSpeed, autograd anomaly detection on, one
decoded batch printed (what the model really sees), the evaluation and export paths run once, and
any failure shown with its full traceback.
"""

from __future__ import annotations

import os

from ..errors import LauncherError
from ..recipe import load_recipe

DEBUG_STEPS = 3


def debug_overrides(recipe) -> list[str]:
    training = recipe.training
    micro = training.micro_batch_size
    accum = training.grad_accum_steps or (training.global_batch_size // micro if training.global_batch_size else 1) or 1
    eval_batch = recipe.evaluation.micro_batch_size or 2 * micro
    return [
        "distributed.strategy=ddp",
        f"training.max_steps={DEBUG_STEPS}",
        "training.global_batch_size=null",
        f"training.grad_accum_steps={accum}",
        "training.log_every=1",
        f"data.max_train_samples={micro * accum * DEBUG_STEPS}",
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
    import torch

    from ..engine.evaluate import to_device
    from ..engine.run import FineTuneRun

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LauncherError("launcher debug runs one process; start it directly, not under accelerate launch/torchrun")
    recipe = load_recipe(recipe_path, overrides)
    changes = debug_overrides(recipe)
    recipe = load_recipe(recipe_path, [*overrides, *changes])
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
