"""One fine-tuning run on one rank, in four verbs: setup, train, finish (evaluate + export), and the
optimizer step in between, readable top to bottom.

Loss normalization: each micro-batch contributes ``loss_sum * world_size / targets_in_step`` where
``targets_in_step`` counts supervised targets over all micro-batches of all ranks in this optimizer
step. DDP and DeepSpeed average gradients over ranks (divide by world_size), so the update is the
gradient of the mean loss over the whole global batch, however it is split.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext

import torch

from ..data import prepare_data
from ..errors import DataError
from ..model_io import load_tokenizer
from ..plan import is_deepspeed
from ..recipe import Recipe, recipe_to_yaml
from ..sampling import rank_micro_batches, steps_per_epoch
from ..tasks import TASKS
from .evaluate import predict, to_device
from .log import RankLog, format_seconds
from .outputs import (
    check_output_dir,
    prepare_output_dir,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from .setup import build_accelerator, plan_topology
from .weights import (
    count_parameters,
    export_pretrained,
    full_state_dict,
    fused_adamw_kwargs,
    optimizer_param_groups,
    restore_state_dict,
)


def _quiet_libraries(is_main: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_warning() if is_main else transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)


class FineTuneRun:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.step = 0
        self.epoch = 0
        self.best: dict | None = None  # {"metric", "value", "step", "metrics"}
        self.best_state = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.stop_early = False
        self.last_validation: dict | None = None
        self.last_validation_step = -1

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        recipe = self.recipe
        self.topology = plan_topology(recipe)
        self.accelerator = accelerator = build_accelerator(recipe, self.topology)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.log = log = RankLog(self.rank, self.world_size)
        _quiet_libraries(accelerator.is_main_process)
        from accelerate.utils import set_seed

        set_seed(recipe.training.seed)
        self.task = task = TASKS[recipe.task](recipe)
        self.out_dir = check_output_dir(recipe)
        self.tokenizer = load_tokenizer(recipe)
        self.data = prepare_data(recipe, task, self.tokenizer, accelerator.local_main_process_first)
        batch = self.topology.batch
        self.train_features = self.data.features["train"]
        self.steps_per_epoch = steps_per_epoch(len(self.train_features), batch)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.data.sources['train']}: {len(self.train_features)} training rows are fewer than one "
                f"global batch ({batch.describe()}); lower training.micro_batch_size / grad_accum_steps"
            )
        training = recipe.training
        self.total_steps = training.max_steps or math.ceil(training.epochs * self.steps_per_epoch)
        self.model = task.build_model(self.tokenizer)

        # Everything the user could have got wrong has been checked; now the run directory appears.
        if accelerator.is_main_process:
            prepare_output_dir(self.out_dir)
            write_text_atomic(self.out_dir / "recipe.yaml", recipe_to_yaml(recipe))
            if self.topology.deepspeed_config:
                write_json_atomic(self.out_dir / "deepspeed_config.json", self.topology.deepspeed_config)
            log.metrics_path = self.out_dir / "metrics.jsonl"
        accelerator.wait_for_everyone()

        optimizer = torch.optim.AdamW(
            optimizer_param_groups(self.model, training.weight_decay),
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            **fused_adamw_kwargs(),
        )
        from transformers import get_scheduler

        warmup = training.warmup_steps if training.warmup_steps is not None else round(training.warmup_ratio * self.total_steps)
        # The scheduler stays ours (not handed to accelerate/DeepSpeed): accelerate's wrapper steps it
        # num_processes times per call, DeepSpeed would step it inside engine.step. One owner, one step.
        self.scheduler = get_scheduler(
            training.lr_scheduler if training.lr_scheduler != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.total_steps,
        )
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.deepspeed = is_deepspeed(self.topology.strategy)
        self._announce(warmup)

    def _announce(self, warmup: int) -> None:
        log, data, batch = self.log, self.data, self.topology.batch
        trainable, total = count_parameters(self.model)
        sizes = ", ".join(f"{name} {len(ds)}" for name, ds in data.features.items())
        dropped = {k: v for k, v in data.dropped.items() if v}
        log.info(f"run directory: {self.out_dir}")
        log.info(
            f"strategy {self.topology.strategy} on {self.world_size} process(es) ({self.topology.backend}, "
            f"{self.accelerator.device.type}); precision {self.recipe.training.precision}"
        )
        log.info(f"batch: {batch.describe()}")
        log.info(
            f"data: {sizes}" + (f"; dropped rows with other labels: {dropped}" if dropped else "")
            + ("; features from cache" if all(data.cached.values()) else "")
        )
        tail = len(self.train_features) - self.steps_per_epoch * batch.global_batch_size
        log.info(
            f"steps: {self.total_steps} ({self.steps_per_epoch} per epoch, {tail} examples per epoch fall off "
            f"the last incomplete global batch), warmup {warmup}"
        )
        log.info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.1f}%)")
        log.event({"event": "start", "world_size": self.world_size, "strategy": self.topology.strategy,
                   **batch.as_dict(), "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                   "trainable_parameters": trainable, "parameters": total,
                   "examples": {k: len(v) for k, v in data.features.items()}, "dropped": data.dropped})

    # ------------------------------------------------------------------------------------
    def train(self) -> None:
        recipe, training, evaluation = self.recipe, self.recipe.training, self.recipe.evaluation
        has_validation = "validation" in self.data.features
        self.model.train()
        start = window_start = time.perf_counter()
        window_loss = torch.zeros((), dtype=torch.float64)
        window_targets = 0.0
        window_steps = 0
        while self.step < self.total_steps and not self.stop_early:
            for micro_batches in rank_micro_batches(
                len(self.train_features), self.topology.batch, self.rank, training.seed, self.epoch
            ):
                loss_sum, targets, grad_norm = self._optimizer_step(micro_batches)
                self.step += 1
                window_loss += loss_sum
                window_targets += targets
                window_steps += 1
                if self.step % training.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    self._log_train(window_loss, window_targets, window_steps, grad_norm, now - window_start, now - start)
                    window_loss.zero_()
                    window_targets, window_steps, window_start = 0.0, 0, time.perf_counter()
                if has_validation and evaluation.every_steps and self.step % evaluation.every_steps == 0:
                    self.validate()
                if self.step >= self.total_steps or self.stop_early:
                    break
            else:
                self.epoch += 1
                if has_validation and evaluation.every_epoch and self.last_validation_step != self.step:
                    self.validate()
                continue
            break
        if has_validation and self.last_validation_step != self.step:
            self.validate()
        self.train_seconds = time.perf_counter() - start

    def _optimizer_step(self, micro_batches: list[list[int]]):
        accelerator, model, task = self.accelerator, self.model, self.task
        batches = [
            to_device(task.collate(self.train_features[indices], self.tokenizer), accelerator.device)
            for indices in micro_batches
        ]
        local_targets = sum(task.count_targets(batch) for batch in batches).to(torch.float64)
        step_targets = float(self._sum_over_ranks(local_targets))
        scale = self.world_size / step_targets
        step_loss = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            # Only the last micro-batch synchronizes gradients across ranks.
            sync = nullcontext() if (last or self.deepspeed) else accelerator.no_sync(model)
            with sync:
                outputs = model(**task.model_inputs(batch))
                loss_sum = task.loss_sum(outputs, batch)
                if self.deepspeed:
                    model.set_gradient_accumulation_boundary(last)
                    # We normalize ourselves; DeepSpeed must not divide by grad_accum_steps again.
                    model.backward(loss_sum * scale, scale_wrt_gas=False)
                else:
                    accelerator.backward(loss_sum * scale)
            step_loss += loss_sum.detach().to("cpu", torch.float64)
        if self.deepspeed:
            # ZeRO-0 does not report the norm it clips with; gradients are already averaged here.
            grad_norm = _grad_norm(model.parameters()) if self.topology.strategy == "zero0" else None
            model.step()  # clips (gradient_clipping), steps and zeroes at the boundary
            grad_norm = model.get_global_grad_norm() if grad_norm is None else grad_norm
        else:
            max_norm = self.recipe.training.max_grad_norm or float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return step_loss, step_targets, grad_norm

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        return self.accelerator.reduce(value.to(self.accelerator.device), reduction="sum").cpu()

    def _log_train(self, window_loss, window_targets, window_steps, grad_norm, window_seconds, elapsed) -> None:
        loss = float(self._sum_over_ranks(window_loss)) / window_targets
        samples = window_steps * self.topology.batch.global_batch_size
        rate = samples / window_seconds if window_seconds > 0 else float("nan")
        eta = (self.total_steps - self.step) * (elapsed / self.step)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        epoch = self.step / self.steps_per_epoch
        self.log.info(
            f"step {self.step}/{self.total_steps} | epoch {epoch:.2f} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad_norm {grad_norm:.3f} | {rate:.1f} samples/s | eta {format_seconds(eta)}"
        )
        self.log.event({"event": "train", "step": self.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "samples_per_second": rate, "elapsed_s": round(elapsed, 3)})

    # ------------------------------------------------------------------------------------
    def _eval_batch_size(self) -> int:
        return self.recipe.evaluation.micro_batch_size or 2 * self.recipe.training.micro_batch_size

    def evaluate(self, split: str) -> tuple[dict | None, list | None]:
        """Metrics (main process) and records for one split; all ranks must call it."""
        records = predict(self.model, self.data.features[split], self.task, self.tokenizer, self.accelerator,
                          self._eval_batch_size())
        metrics = self.task.compute_metrics(records) if records is not None else None
        return metrics, records

    def validate(self) -> None:
        from accelerate.utils import broadcast_object_list

        metrics, _ = self.evaluate("validation")
        self.last_validation_step = self.step
        evaluation = self.recipe.evaluation
        decision = [None]
        if self.accelerator.is_main_process:
            self.last_validation = metrics
            self.log.info(f"validation @ step {self.step}: {_summary(metrics)}")
            self.log.event({"event": "eval", "split": "validation", "step": self.step, **_scalars(metrics)})
            improved = False
            if evaluation.best_metric:
                value = metrics[evaluation.best_metric]
                greater = evaluation.greater_is_better
                if greater is None:
                    greater = evaluation.best_metric != "loss"
                improved = self.best is None or (value > self.best["value"] if greater else value < self.best["value"])
                if improved:
                    self.best = {"metric": evaluation.best_metric, "value": value, "step": self.step, "metrics": metrics}
            decision = [improved]
        # Every rank must take the same branch: the snapshot is a collective under ZeRO-3.
        decision = broadcast_object_list(decision) if self.world_size > 1 else decision
        if not evaluation.best_metric:
            return
        if decision[0]:
            self.best_state = full_state_dict(self.accelerator, self.model)
            self.best_step = self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
            if evaluation.early_stopping_patience and self.evals_without_improvement >= evaluation.early_stopping_patience:
                self.stop_early = True
                self.log.info(
                    f"early stopping: {evaluation.best_metric} has not improved for "
                    f"{self.evals_without_improvement} evaluations (best at step {self.best_step})"
                )

    # ------------------------------------------------------------------------------------
    def finish(self) -> dict | None:
        accelerator, log, out = self.accelerator, self.log, self.out_dir
        results: dict = {"validation": None, "test": None, "best": None}
        if self.best_step is not None and self.best_step != self.step:
            # Every rank knows best_step (the decision was broadcast); under ZeRO-3 only rank 0 holds
            # the snapshot and the restore is a collective.
            log.info(f"restoring the best weights from step {self.best_step}")
            restore_state_dict(accelerator, self.model, self.best_state)
        if accelerator.is_main_process:
            results["validation"] = self.best["metrics"] if self.best else self.last_validation
            if self.best:
                results["best"] = {k: v for k, v in self.best.items() if k != "metrics"}
        if "test" in self.data.features:
            metrics, records = self.evaluate("test")
            if accelerator.is_main_process:
                results["test"] = metrics
                log.info(f"test: {_summary(metrics)}")
                log.event({"event": "eval", "split": "test", "step": self.step, **_scalars(metrics)})
                if self.recipe.output.save_predictions:
                    rows = self.task.prediction_rows(records, self.data.raw["test"])
                    write_jsonl_atomic(out / "predictions" / "test.jsonl", rows)
        if self.recipe.output.export_model:
            export_pretrained(accelerator, self.model, self.tokenizer, out / "model", state=None)
        if accelerator.is_main_process:
            results["train"] = {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 4),
                                "runtime_s": round(self.train_seconds, 2), "world_size": self.world_size,
                                "strategy": self.topology.strategy, **self.topology.batch.as_dict()}
            write_json_atomic(out / "metrics.json", results)
            log.event({"event": "end", "step": self.step})
            if self.recipe.output.export_model:
                log.info(f"model: {out / 'model'}")
            log.info(f"metrics: {out / 'metrics.json'}")
        accelerator.wait_for_everyone()
        return results if accelerator.is_main_process else None

    def close(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            accelerator.end_training()
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _summary(metrics: dict) -> str:
    keys = [k for k in ("loss", "accuracy", "f1_macro", "precision_macro", "recall_macro") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys) + f" ({metrics.get('num_examples', '?')} examples)"


def run_training(recipe: Recipe) -> dict | None:
    run = FineTuneRun(recipe)
    try:
        run.setup()
        run.train()
        return run.finish()
    finally:
        run.close()
