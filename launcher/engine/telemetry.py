"""What a run tells people about itself: the start-up summary, the per-step training line and event,
the memory report, and one-line metric summaries. The loop calls these; it does not format anything."""

from __future__ import annotations

import time

import torch

from .. import timing
from .fsdp import local_tensor
from .log import RankLog, format_seconds


def announce(log: RankLog, *, out_dir, strategy, world_size: int, backend: str, device_type: str, recipe, batch,
             data, steps_per_epoch: int, total_steps: int, warmup: int, length_limits: str,
             parameters: tuple[int, int], fresh: bool, versions: dict, gradient_checkpointing: bool = False) -> None:
    """The run's plan as this rank sees it, in log lines; and the `start` event of a fresh run."""
    trainable, total = parameters
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in data.features.items())
    dropped = {k: v for k, v in data.dropped.items() if v}
    log.info(f"run directory: {out_dir}")
    log.info(f"strategy {strategy} on {world_size} process(es) ({backend}, {device_type}); "
             f"precision {recipe.training.precision}"
             + ("; gradient checkpointing" if gradient_checkpointing else ""))
    if recipe.distributed.strategy == "auto" and str(strategy) == "ddp":
        # `launcher run`/`launcher slurm` choose auto's strategy from memory and tell every rank; a rank
        # started by hand cannot (ranks could see different memory), so it runs DDP, on every rank alike.
        log.info("distributed.strategy=auto without `launcher run`: DDP (the choice from memory is made by "
                 "`launcher run`/`launcher slurm`; set distributed.strategy to pick another)")
    log.info(f"batch: {batch.describe()}")
    log.info(
        f"data: {sizes}" + (f"; dropped rows with other labels: {dropped}" if dropped else "")
        + ("; features from cache" if all(data.cached.values()) else "")
    )
    tail = len(data.features["train"]) - steps_per_epoch * batch.global_batch_size
    log.info(
        f"steps: {total_steps} ({steps_per_epoch} per epoch, {tail} examples per epoch fall off "
        f"the last incomplete global batch), warmup {warmup}"
    )
    if any(data.truncated.values()):
        cut = ", ".join(f"{name} {count} of {len(data.features[name])}" for name, count in data.truncated.items())
        log.info(f"truncated at {length_limits}: {cut} (raise the limit to keep more of each example)")
    log.info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%; "
             f"finetune.method {recipe.finetune.method})")
    if fresh:
        log.event({"event": "start", "world_size": world_size, "strategy": str(strategy),
                   **batch.as_dict(), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                   "trainable_parameters": trainable, "parameters": total,
                   "trainable_share": trainable / max(total, 1), "finetune_method": recipe.finetune.method,
                   "gradient_checkpointing": gradient_checkpointing,
                   "examples": {k: len(v) for k, v in data.features.items()}, "dropped": data.dropped,
                   "truncated": data.truncated, "versions": versions})


def memory_report(module, optimizer, strategy) -> dict:
    """Bytes of model state this rank holds (what the plan's estimate predicts)."""
    def nbytes(tensors) -> int:  # FSDP parameters and their Adam moments: this rank's shard
        return int(sum(local_tensor(t).numel() * t.element_size() for t in tensors if torch.is_tensor(t)))

    while hasattr(optimizer, "optimizer"):  # accelerate / DeepSpeed wrappers around the torch AdamW
        optimizer = optimizer.optimizer
    state_tensors = [v for per_param in optimizer.state.values() for v in per_param.values()]
    # Under ZeRO-1/2/3 the torch optimizer steps DeepSpeed's flat fp32 partitions: a master copy
    # of this rank's share of the weights, held besides the model's own parameters.
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    master = nbytes(stepped) if strategy.is_deepspeed and strategy.zero_stage != 0 else 0
    # Under ZeRO-3 a parameter's data is a placeholder; this rank's share is its ds_tensor.
    return {"rank_parameter_bytes": nbytes(getattr(p, "ds_tensor", p.data) for p in module.parameters()),
            "rank_optimizer_state_bytes": nbytes(state_tensors) + master,
            "rank_adam_moment_bytes": nbytes(state_tensors), "rank_master_weight_bytes": master}


def first_step_event(step: int, seconds_in_loop: float, memory: dict) -> dict:
    """How long start-up took (imports vs our own work) and what the first step held in memory."""
    return {"event": "first_step", "step": step, "seconds_in_loop": round(seconds_in_loop, 3),
            "seconds_since_start": round(timing.since_process_start(), 3),
            "import_seconds": round(timing.import_seconds(), 3), **memory}


def log_train(log: RankLog, window: "LossWindow", *, step: int, total_steps: int, steps_per_epoch: int,
              global_batch_size: int, elapsed: float, steps_done: int, bar=None) -> None:
    """The training line (every log_every steps) and its `train` event: loss over the supervised
    targets since the last line, lr, grad norm, throughput."""
    loss, targets, samples_steps, grad_norm, lr, seconds, tokens, padded_tokens = window.take()
    loss = loss / targets if targets else float("nan")
    rate = samples_steps * global_batch_size / seconds if seconds > 0 else float("nan")
    eta = (total_steps - step) * (elapsed / max(steps_done, 1))
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    epoch = step / steps_per_epoch
    if bar is not None:  # the progress bar (rank 0 on a terminal)
        bar.update(f"loss {loss:.4f}  {rate:.1f} samples/s")
    log.info(
        f"step {step}/{total_steps} | epoch {epoch:.2f} | loss {loss:.4f} | lr {lr:.3e} | "
        f"grad_norm {grad_norm:.3f} | {rate:.1f} samples/s | eta {format_seconds(eta)}"
    )
    log.event({"event": "train", "step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "samples_per_second": rate, "elapsed_s": round(elapsed, 3),
               "window_s": round(seconds, 4), "samples": samples_steps * global_batch_size,
               "tokens": int(tokens), "padded_tokens": int(padded_tokens)})


class LossWindow:
    """Per-step device losses waiting to be read, and host sums since the last log line."""

    def __init__(self):
        self._steps, self._losses = [], []
        self._settled_loss = self._targets = 0.0
        self._settled_steps = 0
        self._unsettled_targets: list[float] = []
        self.grad_norm, self.lr = None, 0.0
        self.tokens = self.padded_tokens = 0.0
        self._started = time.perf_counter()

    def add(self, step, loss, targets, grad_norm, lr, tokens=0.0, padded_tokens=0.0) -> None:
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        self._steps.append(step)
        self._losses.append(loss)
        self._unsettled_targets.append(targets)
        self.grad_norm, self.lr = grad_norm, lr

    def pending(self):
        return self._steps, self._losses

    def settle(self, totals: list[float]) -> None:
        self._settled_loss += sum(totals)
        self._targets += sum(self._unsettled_targets)
        self._settled_steps += len(totals)
        self._steps, self._losses, self._unsettled_targets = [], [], []

    def take(self):
        seconds = time.perf_counter() - self._started
        values = (self._settled_loss, self._targets, self._settled_steps, self.grad_norm, self.lr, seconds,
                  self.tokens, self.padded_tokens)
        self._settled_loss = self._targets = self.tokens = self.padded_tokens = 0.0
        self._settled_steps = 0
        self._started = time.perf_counter()
        return values


def scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def summary(metrics: dict, task=None) -> str:
    """loss + the task's headline metrics (the first key of each configured metric), for log lines."""
    keys = ["loss"]
    if task is not None:
        for name in task.recipe.evaluation.metrics:
            produced = task.metric_keys.get(name, [name.split(":", 1)[-1]])
            keys.extend(produced[:1])
    present = [k for k in dict.fromkeys(keys) if isinstance(metrics.get(k), (int, float))]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in present) + f" ({metrics.get('num_examples', '?')} examples)"
