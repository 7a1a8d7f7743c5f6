"""One fine-tuning run on one rank: setup, train, finish. The optimizer step reads top to bottom.

Loss normalization: each micro-batch backpropagates ``loss_sum * world_size / targets_in_step``
where ``targets_in_step`` counts supervised targets over all micro-batches of all ranks in this
optimizer step. DDP and DeepSpeed average gradients over ranks (divide by world_size), so the
update is the gradient of the mean loss over the whole global batch, however it is split.

Stopping: a SIGTERM/SIGUSR1 to any rank, or a STOP file in the run directory, sets a local flag. The
flag rides on the one all-reduce every step already does, so all ranks see it at the same step, write
one checkpoint together and exit with EXIT_STOPPED.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext

import torch

from .. import faults
from ..data import prepare_data
from ..errors import DataError, StopRequested, TrainingError
from ..model_io import load_tokenizer
from ..plan import is_deepspeed, total_optimizer_steps
from ..recipe import Recipe, recipe_to_yaml
from ..sampling import rank_micro_batches, steps_per_epoch
from ..tasks import TASKS
from .checkpoint import (
    TrainerState,
    best_dir,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    prune_best,
    remove_partials,
    save_checkpoint,
)
from .evaluate import predict, to_device
from .fsdp import choose_units, local_tensor
from .log import RankLog, format_seconds
from .outputs import decide_start, prepare_output_dir, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .setup import build_accelerator, plan_topology
from .weights import (
    count_parameters,
    export_pretrained,
    fused_adamw_kwargs,
    optimizer_param_groups,
    restore_exported,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _quiet_libraries(is_main: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_warning() if is_main else transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)


class StopFlag:
    """Set by a stop signal to this process or by the STOP file; read once per step."""

    def __init__(self, stop_file):
        self.stop_file = stop_file
        self.reason: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and self.stop_file.exists():
            self.reason = f"{self.stop_file.name} file"
        return self.reason is not None


class FineTuneRun:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.state = TrainerState()
        self.train_seconds = 0.0
        self.skipped_steps = 0
        self.validation_reports: dict[int, dict] = {}  # step -> full metrics (main process, this attempt)

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
        # Multiples of 8 feed GPU tensor cores; on a CPU padding is only extra work.
        task.pad_to_multiple_of = recipe.training.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1)
        self.start = decide_start(recipe)
        self.out_dir = self.start.run_dir
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
        self.total_steps = total_optimizer_steps(training, self.steps_per_epoch)
        from ..finetune import apply_method

        self.model = apply_method(task.build_model(self.tokenizer), recipe, task)

        # Everything the user could have got wrong has been checked; now the run directory is written.
        self.stop_file = self.out_dir / "STOP"
        if accelerator.is_main_process:
            if self.start.resume_from is None:
                prepare_output_dir(self.out_dir)
            else:
                remove_partials(self.out_dir)
            self.stop_file.unlink(missing_ok=True)  # a stop request belongs to the run it stopped
            write_text_atomic(self.out_dir / "recipe.yaml", recipe_to_yaml(recipe))
            if self.topology.deepspeed_config:
                write_json_atomic(self.out_dir / "deepspeed_config.json", self.topology.deepspeed_config)
            log.metrics_path = self.out_dir / "metrics.jsonl"
        accelerator.wait_for_everyone()
        self.stop = StopFlag(self.stop_file)

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
        choose_units(accelerator, self.model)  # FSDP only
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.deepspeed = is_deepspeed(self.topology.strategy)
        self.state = TrainerState(world_size=self.world_size, strategy=self.topology.strategy,
                                  global_batch_size=batch.global_batch_size)
        if self.start.resume_from is not None:
            self._resume(self.start.resume_from)
        elif self.start.note:
            log.info(self.start.note)
        self._announce(warmup)

    def _resume(self, directory) -> None:
        saved = TrainerState.read(directory)
        check_resumable(saved, self.topology.strategy, self.world_size, self.topology.batch.global_batch_size, directory)
        self.state = load_checkpoint(self.accelerator, directory)
        self.scheduler.load_state_dict(self.state.scheduler)
        if self.accelerator.is_main_process:
            # Best weights saved after this checkpoint belong to the lost attempt.
            keep = {self.state.best["step"]} if self.state.best else set()
            prune_best(self.out_dir, keep_steps=keep)
        self.state.world_size, self.state.strategy = self.world_size, self.topology.strategy
        self.log.info(f"resumed from {directory} at step {self.state.step} (epoch {self.state.epoch}, "
                      f"step {self.state.step_in_epoch} of it)")
        if self.accelerator.is_main_process:
            # Events after the checkpoint belong to the interrupted attempt; they happen again now.
            path = self.out_dir / "metrics.jsonl"
            if path.exists():
                import json

                kept = [line for line in path.read_text().splitlines()
                        if json.loads(line).get("step", 0) <= self.state.step]
                write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.log.event({"event": "resume", "step": self.state.step, "checkpoint": str(directory)})

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
        if any(data.truncated.values()):
            cut = ", ".join(f"{name} {count} of {len(data.features[name])}" for name, count in data.truncated.items())
            log.info(f"truncated at {self.task.length_limits()}: {cut} (raise the limit to keep more of each example)")
        log.info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%; "
                 f"finetune.method {self.recipe.finetune.method})")
        if self.start.resume_from is None:
            log.event({"event": "start", "world_size": self.world_size, "strategy": self.topology.strategy,
                       **batch.as_dict(), "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                       "trainable_parameters": trainable, "parameters": total,
                       "trainable_share": trainable / max(total, 1), "finetune_method": self.recipe.finetune.method,
                       "examples": {k: len(v) for k, v in data.features.items()}, "dropped": data.dropped,
                       "truncated": data.truncated})
        self._write_status("running")

    def _write_status(self, state: str, **extra) -> None:
        if self.accelerator.is_main_process:
            write_json_atomic(self.out_dir / "status.json", {"state": state, "step": self.state.step,
                                                             "total_steps": self.total_steps, **extra})

    # ------------------------------------------------------------------------------------
    def train(self) -> None:
        recipe, training, evaluation = self.recipe, self.recipe.training, self.recipe.evaluation
        checkpointing = recipe.checkpoint
        state = self.state
        has_validation = "validation" in self.data.features
        lengths = self._train_lengths() if training.group_by_length else None
        self.model.train()
        self.window = _LossWindow()
        start = time.perf_counter()
        steps_at_start = state.step
        while state.step < self.total_steps and not self._early_stopped():
            batches = rank_micro_batches(len(self.train_features), self.topology.batch, self.rank,
                                         training.seed, state.epoch, start_step=state.step_in_epoch, lengths=lengths)
            for micro_batches in batches:
                if not self._optimizer_step(micro_batches):  # all ranks agreed to stop before this step
                    self._flush_losses()
                    self._stop()
                state.step += 1
                state.step_in_epoch += 1
                if state.step == steps_at_start + 1:
                    self._first_step_done(time.perf_counter() - start)
                if state.step % training.log_every == 0 or state.step == self.total_steps:
                    self._flush_losses()
                    self._log_train(time.perf_counter() - start, state.step - steps_at_start)
                if has_validation and evaluation.every_steps and state.step % evaluation.every_steps == 0:
                    self.validate()
                if checkpointing.every_steps and state.step % checkpointing.every_steps == 0:
                    self.checkpoint()
                if state.step >= self.total_steps or self._early_stopped():
                    break
            else:
                state.epoch += 1
                state.step_in_epoch = 0
                if has_validation and evaluation.every_epoch and state.last_validation_step != state.step:
                    self.validate()
                if checkpointing.every_epoch:
                    self.checkpoint()
                continue
            break
        if has_validation and state.last_validation_step != state.step:
            self.validate()
        self.train_seconds = time.perf_counter() - start

    def _train_lengths(self):
        import pyarrow.compute as pc

        return pc.list_value_length(self.train_features.data.column("input_ids")).to_numpy()

    def _early_stopped(self) -> bool:
        patience = self.recipe.evaluation.early_stopping_patience
        return bool(patience) and self.state.evals_without_improvement >= patience

    def _optimizer_step(self, micro_batches: list[list[int]]) -> bool:
        """One optimizer step over this rank's micro-batches. False: all ranks agreed to stop instead.

        No host-device synchronization here (unless on_nonfinite_loss=skip): the target count and
        the stop vote travel on a CPU (gloo) all-reduce, the loss stays on the device until the
        next log/validation/checkpoint."""
        accelerator, model, task, state = self.accelerator, self.model, self.task, self.state
        faults.raise_at_step(self.rank, state.step + 1)
        faults.step_delay()
        host_batches = [task.collate(self.train_features[indices], self.tokenizer) for indices in micro_batches]
        local_targets = float(sum(task.count_targets(batch) for batch in host_batches))
        tokens = [float(batch["attention_mask"].sum()) if "attention_mask" in batch else 0.0 for batch in host_batches]
        padded = [float(batch["input_ids"].numel()) for batch in host_batches]
        # One host all-reduce carries the step's target count, any rank's stop request and the
        # token counts (real and padded) that throughput is measured in.
        step_targets, stop_votes, step_tokens, step_padded = self._sum_over_ranks_on_host(
            [local_targets, float(self.stop.requested()), sum(tokens), sum(padded)]
        )
        if stop_votes > 0:
            return False
        scale = self.world_size / step_targets
        step_loss = None
        for index, host_batch in enumerate(host_batches):
            batch = to_device(host_batch, accelerator.device)
            last = index == len(host_batches) - 1
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
            step_loss = loss_sum.detach().float() if step_loss is None else step_loss + loss_sum.detach().float()
        if self.recipe.training.on_nonfinite_loss == "skip":
            (total,) = self._sum_over_ranks([float(step_loss)])  # the one per-step sync skip mode needs
            if not math.isfinite(total):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                self.log.event({"event": "skipped_step", "step": state.step + 1, "loss": total})
                return True
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
        self.window.add(state.step + 1, step_loss, step_targets, grad_norm, self.scheduler.get_last_lr()[0],
                        step_tokens, step_padded)
        return True

    def _control_group(self):
        """A CPU (gloo) process group for host-side scalars, so they never touch the GPU stream."""
        if not hasattr(self, "_gloo_group"):
            import torch.distributed as dist

            self._gloo_group = None if self.topology.backend == "gloo" else dist.new_group(backend="gloo")
        return self._gloo_group

    def _sum_over_ranks_on_host(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=self._control_group())
        return tensor.tolist()

    def _sum_over_ranks(self, values) -> list[float]:
        """Sum device values over ranks and bring them to the host (a sync: used sparingly)."""
        tensor = torch.as_tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world_size > 1:
            tensor = self.accelerator.reduce(tensor, reduction="sum")
        return tensor.tolist()

    def _flush_losses(self) -> None:
        """Bring the losses of the steps since the last flush to the host, summed over ranks, and
        stop at the first non-finite one (naming its step)."""
        steps, losses = self.window.pending()
        if not steps:
            return
        totals = self._sum_over_ranks(torch.stack(losses).double())
        for step, total in zip(steps, totals):
            if not math.isfinite(total):
                raise TrainingError(
                    f"non-finite loss ({total}) at optimizer step {step} (epoch {self.state.epoch}); "
                    f"lower training.learning_rate, check the data, or set training.on_nonfinite_loss=skip"
                )
        self.window.settle(totals)

    def _first_step_done(self, seconds_in_loop: float) -> None:
        from .. import timing

        since_start = timing.since_process_start()
        self.log.event({"event": "first_step", "step": self.state.step, "seconds_in_loop": round(seconds_in_loop, 3),
                        "seconds_since_start": round(since_start, 3), "import_seconds": round(timing.import_seconds(), 3),
                        **self._memory_report()})

    def _memory_report(self) -> dict:
        """Bytes of model state this rank holds (what the plan's estimate predicts)."""
        def nbytes(tensors) -> int:  # FSDP parameters and their Adam moments: this rank's shard
            return int(sum(local_tensor(t).numel() * t.element_size() for t in tensors if torch.is_tensor(t)))

        model = self.accelerator.unwrap_model(self.model)
        optimizer = self.optimizer
        while hasattr(optimizer, "optimizer"):  # accelerate / DeepSpeed wrappers around the torch AdamW
            optimizer = optimizer.optimizer
        state_tensors = [v for per_param in optimizer.state.values() for v in per_param.values()]
        # Under ZeRO-1/2/3 the torch optimizer steps DeepSpeed's flat fp32 partitions: a master copy
        # of this rank's share of the weights, held besides the model's own parameters.
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        master = nbytes(stepped) if self.deepspeed and self.topology.strategy != "zero0" else 0
        # Under ZeRO-3 a parameter's data is a placeholder; this rank's share is its ds_tensor.
        return {"rank_parameter_bytes": nbytes(getattr(p, "ds_tensor", p.data) for p in model.parameters()),
                "rank_optimizer_state_bytes": nbytes(state_tensors) + master,
                "rank_adam_moment_bytes": nbytes(state_tensors), "rank_master_weight_bytes": master}

    def _log_train(self, elapsed: float, steps_done: int) -> None:
        step = self.state.step
        loss, targets, samples_steps, grad_norm, lr, seconds, tokens, padded_tokens = self.window.take()
        loss = loss / targets if targets else float("nan")
        rate = samples_steps * self.topology.batch.global_batch_size / seconds if seconds > 0 else float("nan")
        eta = (self.total_steps - step) * (elapsed / max(steps_done, 1))
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        epoch = step / self.steps_per_epoch
        self.log.info(
            f"step {step}/{self.total_steps} | epoch {epoch:.2f} | loss {loss:.4f} | lr {lr:.3e} | "
            f"grad_norm {grad_norm:.3f} | {rate:.1f} samples/s | eta {format_seconds(eta)}"
        )
        self.log.event({"event": "train", "step": step, "epoch": round(epoch, 4), "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "samples_per_second": rate, "elapsed_s": round(elapsed, 3),
                        "window_s": round(seconds, 4), "samples": samples_steps * self.topology.batch.global_batch_size,
                        "tokens": int(tokens), "padded_tokens": int(padded_tokens)})

    # ------------------------------------------------------------------------------------
    def checkpoint(self):
        self._flush_losses()  # never checkpoint weights that a non-finite loss already spoiled
        self.state.scheduler = self.scheduler.state_dict()
        directory = save_checkpoint(self.accelerator, self.out_dir, self.state, self.recipe.checkpoint.keep_last)
        self.log.info(f"checkpoint: {directory}")
        self.log.event({"event": "checkpoint", "step": self.state.step, "path": str(directory)})
        return directory

    def _checkpointed_best_steps(self) -> set[int]:
        """The best weights the newest checkpoint refers to: a resume from it will need them."""
        latest = latest_checkpoint(self.out_dir)
        best = TrainerState.read(latest).best if latest else None
        return {best["step"]} if best else set()

    def _stop(self) -> None:
        reason = self.stop.reason or "another rank's request"
        self.log.info(f"stop requested ({reason}): all ranks stop at step {self.state.step}")
        directory = self.checkpoint()
        self._write_status("stopped", checkpoint=str(directory), reason=reason)
        raise StopRequested(f"stopped at step {self.state.step} ({reason}); checkpoint {directory}; "
                            f"run the same command again to resume")

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

        state, evaluation = self.state, self.recipe.evaluation
        self._flush_losses()
        metrics, _ = self.evaluate("validation")
        state.last_validation_step = state.step
        improved = [False]
        if self.accelerator.is_main_process:
            state.last_validation = _scalars(metrics)
            self.validation_reports[state.step] = metrics
            self.log.info(f"validation @ step {state.step}: {_summary(metrics, self.task)}")
            self.log.event({"event": "eval", "split": "validation", "step": state.step, **_scalars(metrics)})
            if evaluation.best_metric:
                value = metrics[evaluation.best_metric]
                greater = self.task.best_is_greater()
                best = state.best
                improved = [best is None or (value > best["value"] if greater else value < best["value"])]
        if not evaluation.best_metric:
            return
        # Every rank takes the same branch: saving the best weights is a collective under ZeRO-3.
        improved = broadcast_object_list(improved) if self.world_size > 1 else improved
        if improved[0]:
            if self.accelerator.is_main_process:
                state.best = {"metric": evaluation.best_metric, "value": metrics[evaluation.best_metric],
                              "step": state.step, "metrics": _scalars(metrics)}
            state.best = broadcast_object_list([state.best])[0] if self.world_size > 1 else state.best
            export_pretrained(self.accelerator, self.model, self.tokenizer, best_dir(self.out_dir, state.step),
                              self.recipe, self.task)
            if self.accelerator.is_main_process:
                prune_best(self.out_dir, keep_steps={state.step, *self._checkpointed_best_steps()})
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            if self._early_stopped():
                self.log.info(
                    f"early stopping: {evaluation.best_metric} has not improved for "
                    f"{state.evals_without_improvement} evaluations (best at step {state.best['step']})"
                )

    # ------------------------------------------------------------------------------------
    def finish(self) -> dict | None:
        accelerator, log, out, state = self.accelerator, self.log, self.out_dir, self.state
        results: dict = {"validation": None, "test": None, "best": None}
        if state.best is not None and state.best["step"] != state.step:
            log.info(f"restoring the best weights (step {state.best['step']}, "
                     f"{state.best['metric']} {state.best['value']:.4f})")
            restore_exported(accelerator, self.model, best_dir(out, state.best["step"]))
        if accelerator.is_main_process:
            chosen = state.best["step"] if state.best else state.last_validation_step
            fallback = state.best["metrics"] if state.best else state.last_validation
            results["validation"] = self.validation_reports.get(chosen, fallback)
            if state.best:
                results["best"] = {k: v for k, v in state.best.items() if k != "metrics"}
        if "test" in self.data.features:
            metrics, records = self.evaluate("test")
            if accelerator.is_main_process:
                results["test"] = metrics
                log.info(f"test: {_summary(metrics, self.task)}")
                log.event({"event": "eval", "split": "test", "step": state.step, **_scalars(metrics)})
                if self.recipe.output.save_predictions:
                    rows = self.task.prediction_rows(records, self.data.raw["test"])
                    write_jsonl_atomic(out / "predictions" / "test.jsonl", rows)
        if self.recipe.output.export_model:
            export_pretrained(accelerator, self.model, self.tokenizer, out / "model", self.recipe, self.task)
            if self.recipe.finetune.merge_on_export and accelerator.is_main_process:
                from ..finetune import export_merged
                from .outputs import replace_dir_atomic

                staging = out / f".model-merged.partial-{os.getpid()}"
                export_merged(out / "model", staging)
                replace_dir_atomic(staging, out / "model-merged")
        if accelerator.is_main_process:
            results["train"] = {"steps": state.step, "epochs": round(state.step / self.steps_per_epoch, 4),
                                "runtime_s": round(self.train_seconds, 2), "skipped_steps": self.skipped_steps,
                                "world_size": self.world_size, "strategy": self.topology.strategy,
                                **self.topology.batch.as_dict()}
            write_json_atomic(out / "metrics.json", results)
            import resource

            log.event({"event": "end", "step": state.step,
                       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
            if self.recipe.output.export_model:
                log.info(f"model: {out / 'model'}")
            log.info(f"metrics: {out / 'metrics.json'}")
        self._write_status("finished")
        accelerator.wait_for_everyone()
        return results if accelerator.is_main_process else None

    def close(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            from .setup import shutdown_distributed

            # The model (DDP reducer / DeepSpeed engine) and the control group hold the process groups.
            self.model = self.optimizer = self.scheduler = self._gloo_group = None
            shutdown_distributed(accelerator)


class _LossWindow:
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


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _summary(metrics: dict, task=None) -> str:
    """loss + the task's headline metrics (the first key of each configured metric), for log lines."""
    keys = ["loss"]
    if task is not None:
        for name in task.recipe.evaluation.metrics:
            produced = task.metric_keys.get(name, [name.split(":", 1)[-1]])
            keys.extend(produced[:1])
    present = [k for k in dict.fromkeys(keys) if isinstance(metrics.get(k), (int, float))]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in present) + f" ({metrics.get('num_examples', '?')} examples)"


def run_training(recipe: Recipe) -> dict | None:
    run = FineTuneRun(recipe)
    try:
        run.setup()
        run.train()
        return run.finish()
    finally:
        run.close()
