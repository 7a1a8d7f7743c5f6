"""Elastic weight consolidation (Kirkpatrick et al. 2017): the diagonal Fisher of a model on some data
(`launcher fisher`), and the penalty lambda/2 * sum_i F_i (theta_i - theta*_i)^2 a run adds to its loss
(recipe `ewc:`).

The Fisher is the empirical one: the mean over examples of the squared gradient of the example's
log-likelihood of its own label (one backward pass per example, the model in eval mode, so no dropout).
Each rank takes every world-size-th example of a seeded choice; the sums of squared gradients and the
example count are all-reduced, so any number of ranks gives the same Fisher (up to float summation order).
The file holds F and the anchor theta* (the weights it was computed on) per parameter name.

Own code: the continual-learning libraries (avalanche) bring their own training loop; the penalty is two
lines over the parameters, the Fisher one loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import prepare_data
from ..errors import LauncherError
from ..files import replace_dir_atomic
from ..finetune import load_exported
from ..tasks import TASKS
from .eval import eval_recipe
from .evaluate import to_device
from .log import RankLog
from .setup import build_accelerator, plan_topology, shutdown_distributed

FISHER_FILE = "fisher.safetensors"


def penalty(terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weight: float) -> torch.Tensor:
    """lambda/2 * sum F (theta - theta*)^2 over (parameter, fisher, anchor) triples."""
    total = sum((fisher * (param - anchor) ** 2).sum() for param, fisher, anchor in terms)
    return 0.5 * weight * total


def check_strategy(strategy) -> None:
    if strategy.shards_weights:
        raise LauncherError(f"ewc: distributed.strategy {strategy} shards the weights across ranks, and the EWC penalty "
                            f"needs every weight on every rank; use ddp, zero1 or zero2")


def load_terms(path: str | Path, module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (parameter, F, theta*) triples of the module's trainable parameters, from a `launcher fisher` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LauncherError(f"ewc.fisher: {path} not found; write it with launcher fisher RECIPE --checkpoint MODEL --output DIR")
    tensors = load_file(str(path))
    terms = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        fisher, anchor = tensors.get(f"fisher.{name}"), tensors.get(f"anchor.{name}")
        if fisher is None or anchor is None or fisher.shape != param.shape:
            raise LauncherError(f"ewc.fisher: {path} has no Fisher of shape {tuple(param.shape)} for parameter {name}; "
                                f"it was computed on another model")
        terms.append((param, fisher.to(param.device, param.dtype), anchor.to(param.device, param.dtype)))
    return terms


def fisher_indices(examples: int, samples: int, seed: int, world_size: int, rank: int) -> list[int]:
    """This rank's examples: every world-size-th of a seeded choice of `samples` (all, if fewer)."""
    chosen = np.random.default_rng(seed).permutation(examples)[:samples]
    return sorted(int(i) for i in chosen)[rank::world_size]


def diagonal_fisher(model, features, task, tokenizer, indices: list[int], device) -> tuple[dict, int]:
    """Sums of squared per-example log-likelihood gradients over `indices` (float64), and their count."""
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
    for index in indices:
        model.zero_grad(set_to_none=True)
        batch = to_device(task.collate(features[[index]], tokenizer), device)
        outputs = model(**task.model_inputs(batch))
        task.loss_sum(outputs, batch).backward()  # one example: - log p(label | text)
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().double().cpu() ** 2
    model.zero_grad(set_to_none=True)
    return sums, len(indices)


def run_fisher(recipe_path: str, overrides: list[str], checkpoint: Path, output: Path, samples: int) -> Path:
    """`launcher fisher`: the diagonal Fisher of an exported model on the recipe's training split -> OUTPUT/fisher.safetensors."""
    recipe = eval_recipe(recipe_path, overrides, checkpoint)
    topology = plan_topology(recipe)
    accelerator = build_accelerator(recipe, topology)
    try:
        return _fisher(recipe, checkpoint, output, samples, accelerator)
    finally:
        shutdown_distributed(accelerator)


def _fisher(recipe, checkpoint: Path, output: Path, samples: int, accelerator) -> Path:
    import torch.distributed as dist
    from safetensors.torch import save_file

    log = RankLog(accelerator.process_index, accelerator.num_processes)
    task = TASKS[recipe.task](recipe)
    task.say = log.info
    task.check_limits()
    model, tokenizer = load_exported(checkpoint)
    data = prepare_data(recipe, task, tokenizer, accelerator.local_main_process_first)
    features = data.features["train"]
    model = model.to(accelerator.device)
    indices = fisher_indices(len(features), samples, recipe.training.seed, accelerator.num_processes,
                             accelerator.process_index)
    log.info(f"Fisher of {checkpoint} over {min(samples, len(features))} training examples "
             f"({accelerator.num_processes} process(es))")
    sums, count = diagonal_fisher(model, features, task, tokenizer, indices, accelerator.device)
    names = sorted(sums)
    if accelerator.num_processes > 1:
        flat = torch.cat([sums[name].flatten() for name in names] + [torch.tensor([float(count)], dtype=torch.float64)])
        flat = flat.to(accelerator.device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        count = int(flat[-1].item())
        offset = 0
        for name in names:
            size = sums[name].numel()
            sums[name] = flat[offset:offset + size].view(sums[name].shape)
            offset += size
    target = output / FISHER_FILE
    if accelerator.is_main_process:
        state = dict(model.named_parameters())
        tensors = {f"fisher.{name}": (sums[name] / count).float().contiguous() for name in names}
        tensors.update({f"anchor.{name}": state[name].detach().float().cpu().contiguous() for name in names})
        staging = output.parent / f".partial-{output.name}"
        staging.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(staging / FISHER_FILE), metadata={"examples": str(count), "model": str(checkpoint)})
        replace_dir_atomic(staging, output)
        log.info(f"Fisher: {target} ({count} examples)")
    accelerator.wait_for_everyone()
    return target
