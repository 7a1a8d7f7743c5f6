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

from .. import faults, model_card, timing
from ..data import prepare_data
from ..errors import DataError, StopRequested, TrainingError
from ..model_card import CardFacts, push_to_hub
from ..model_io import load_tokenizer
from ..finetune import apply_method, enable_gradient_checkpointing, export_merged
from ..plan import total_optimizer_steps
from ..paths import resolve_path
from ..recipe import recipe_base_dir, recipe_to_yaml
from ..report import write_report
from ..schema import Recipe
from ..sampling import rank_micro_batches, steps_per_epoch
from ..tasks import TASKS
from ..tracking import accelerator_kwargs, check_trackers, start_tracking
from ..versions import library_versions
from .checkpoint import (
    TrainerState,
    best_dir,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    needs_universal,
    prune_best,
    remove_partials,
    save_checkpoint,
    universal_dir,
)
from .evaluate import predict, to_device
from .ewc import check_strategy as check_ewc_strategy, load_terms, penalty
from .fsdp import choose_units
from .log import RankLog
from ..files import replace_dir_atomic, write_json_atomic, write_jsonl_atomic, write_text_atomic
from .outputs import decide_start, output_dir_for, prepare_output_dir
from .setup import build_accelerator, plan_topology, shutdown_distributed
from .telemetry import LossWindow, announce, first_step_event, log_train, memory_report, scalars, summary
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


def attempt_start() -> float:
    """When this attempt at the run began (epoch seconds): what launched the ranks says so in
    LAUNCHER_ATTEMPT_START (`launcher run`, the sbatch script, before starting any rank), else this
    process's own start. A STOP file older than that belongs to an earlier attempt."""
    value = os.environ.get("LAUNCHER_ATTEMPT_START")
    try:
        return float(value) if value else time.time() - timing.since_process_start()
    except ValueError:
        return time.time() - timing.since_process_start()


class StopFlag:
    """Set by a stop signal to this process or by a STOP file written during this attempt (a stop
    request that arrives while the ranks are still starting up is kept, not lost); read once per step."""

    def __init__(self, stop_file, since: float):
        self.stop_file = stop_file
        self.since = since
        self.reason: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and is_current_stop_file(self.stop_file, self.since):
            self.reason = f"{self.stop_file.name} file"
        return self.reason is not None


def is_current_stop_file(path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


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
        check_trackers(recipe)
        if recipe.ewc is not None:
            check_ewc_strategy(self.topology.strategy)
        self.accelerator = accelerator = build_accelerator(recipe, self.topology,
                                                           accelerator_kwargs(recipe, output_dir_for(recipe)))
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.log = log = RankLog(self.rank, self.world_size)
        _quiet_libraries(accelerator.is_main_process)
        from accelerate.utils import set_seed

        set_seed(recipe.training.seed)
        self.task = task = TASKS[recipe.task](recipe)
        task.check_limits()
        # Multiples of 8 feed GPU tensor cores; on a CPU padding is only extra work.
        task.pad_to_multiple_of = recipe.training.pad_to_multiple_of or (8 if accelerator.device.type == "cuda" else 1)
        task.synced_generation = self.topology.strategy.shards_weights and self.world_size > 1
        task.say = log.info
        self.start = decide_start(recipe)
        self.out_dir = self.start.run_dir
        self.tokenizer = load_tokenizer(recipe)
        self.data = prepare_data(recipe, task, self.tokenizer, accelerator.local_main_process_first, log.progress)
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
        model = task.build_model(self.tokenizer)
        if training.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = apply_method(model, recipe, task)

        # Everything the user could have got wrong has been checked; now the run directory is written.
        self.stop_file = self.out_dir / "STOP"
        self.attempt_start = attempt_start()
        if accelerator.is_main_process:
            if self.start.resume_from is None:
                prepare_output_dir(self.out_dir)
            else:
                remove_partials(self.out_dir)
            if not is_current_stop_file(self.stop_file, self.attempt_start):
                self.stop_file.unlink(missing_ok=True)  # an earlier attempt's stop request was answered
            write_text_atomic(self.out_dir / "recipe.yaml", recipe_to_yaml(recipe))
            if self.topology.deepspeed_config:
                write_json_atomic(self.out_dir / "deepspeed_config.json", self.topology.deepspeed_config)
            log.metrics_path = self.out_dir / "metrics.jsonl"
        accelerator.wait_for_everyone()
        self.stop = StopFlag(self.stop_file, self.attempt_start)

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
        self.deepspeed = self.topology.strategy.is_deepspeed
        # EWC: (parameter, Fisher, anchor) of the module each rank holds whole (checked: no sharded weights).
        self.ewc_terms = None if recipe.ewc is None else load_terms(
            resolve_path(recipe.ewc.fisher, recipe_base_dir(recipe)), accelerator.unwrap_model(self.model))
        self.state = TrainerState(world_size=self.world_size, strategy=str(self.topology.strategy),
                                  global_batch_size=batch.global_batch_size)
        if self.start.resume_from is not None:
            self._resume(self.start.resume_from)
        elif self.start.note:
            log.info(self.start.note)
        resumed_step = self.state.step if self.start.resume_from is not None else None
        log.tracker = start_tracking(accelerator, recipe, self.out_dir, resumed_step, self.state.trackers)
        self._announce(warmup)

    def _resume(self, directory) -> None:
        saved = TrainerState.read(directory)
        check_resumable(saved, str(self.topology.strategy), self.world_size, self.topology.batch.global_batch_size, directory)
        if saved.world_size != self.world_size:
            how = (f"ZeRO state through its universal form {universal_dir(directory, self.out_dir)} (converted "
                   f"on first use, the checkpoint kept as it is)" if needs_universal(saved, self.world_size)
                   else "full state")
            self.log.info(f"the checkpoint was written by {saved.world_size} process(es), this run has "
                          f"{self.world_size}: loading {how}; same global batch {saved.global_batch_size}")
        self.state = load_checkpoint(self.accelerator, directory, self.out_dir, engine=self.model if self.deepspeed else None)
        self.scheduler.load_state_dict(self.state.scheduler)
        if self.accelerator.is_main_process:
            # Best weights saved after this checkpoint belong to the lost attempt.
            keep = {self.state.best["step"]} if self.state.best else set()
            prune_best(self.out_dir, keep_steps=keep)
        self.state.world_size, self.state.strategy = self.world_size, str(self.topology.strategy)
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
        announce(self.log, out_dir=self.out_dir, strategy=self.topology.strategy, world_size=self.world_size,
                 backend=self.topology.backend, device_type=self.accelerator.device.type, recipe=self.recipe,
                 batch=self.topology.batch, data=self.data, steps_per_epoch=self.steps_per_epoch,
                 total_steps=self.total_steps, warmup=warmup, length_limits=self.task.length_limits(),
                 parameters=count_parameters(self.model), fresh=self.start.resume_from is None,
                 versions=library_versions(),
                 # what the model does, not what the recipe asked: a layer that checkpoints
                 gradient_checkpointing=any(getattr(m, "gradient_checkpointing", False) is True
                                            for m in self.accelerator.unwrap_model(self.model).modules()))
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
        self.window = LossWindow()
        start = time.perf_counter()
        steps_at_start = state.step
        self._bar = self.log.progress.start("training", total=self.total_steps, completed=state.step)
        while state.step < self.total_steps and not self._early_stopped():
            batches = rank_micro_batches(len(self.train_features), self.topology.batch, self.rank,
                                         training.seed, state.epoch, start_step=state.step_in_epoch, lengths=lengths)
            for micro_batches in batches:
                if not self._optimizer_step(micro_batches):  # all ranks agreed to stop before this step
                    self._flush_losses()
                    self._stop()
                state.step += 1
                state.step_in_epoch += 1
                self._bar.advance()
                if state.step == steps_at_start + 1:
                    memory = memory_report(self.accelerator.unwrap_model(self.model), self.optimizer, self.topology.strategy)
                    self.log.event(first_step_event(state.step, time.perf_counter() - start, memory))
                if state.step % training.log_every == 0 or state.step == self.total_steps:
                    self._flush_losses()
                    log_train(self.log, self.window, step=state.step, total_steps=self.total_steps,
                              steps_per_epoch=self.steps_per_epoch, global_batch_size=self.topology.batch.global_batch_size,
                              elapsed=time.perf_counter() - start, steps_done=state.step - steps_at_start,
                              bar=self._bar)
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
        self._bar.done()
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
        faults.step_delay(resumed=self.start.resume_from is not None)
        host_batches = [task.collate_train(self.train_features[indices], self.tokenizer) for indices in micro_batches]
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
                loss_sum = faults.nonfinite_loss(loss_sum, self.rank, state.step + 1)
                loss = loss_sum * scale
                if self.ewc_terms is not None:
                    # A share per micro-batch: summed over them, and averaged over ranks (each adds the same), the
                    # step's gradient gets the penalty's gradient once.
                    loss = loss + penalty(self.ewc_terms, self.recipe.ewc.weight) / len(host_batches)
                if self.deepspeed:
                    model.set_gradient_accumulation_boundary(last)
                    # We normalize ourselves; DeepSpeed must not divide by grad_accum_steps again.
                    model.backward(loss, scale_wrt_gas=False)
                else:
                    accelerator.backward(loss)
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
            grad_norm = _grad_norm(model.parameters()) if self.topology.strategy.zero_stage == 0 else None
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

    # ------------------------------------------------------------------------------------
    def checkpoint(self):
        self._flush_losses()  # never checkpoint weights that a non-finite loss already spoiled
        self.state.scheduler = self.scheduler.state_dict()
        self.state.trackers = self.log.tracker.identity()  # a resume continues the same tracker runs
        with self.log.progress.task(f"writing checkpoint step {self.state.step}"):
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
                          self._eval_batch_size(), progress=self.log.progress, description=f"evaluating {split}")
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
            state.last_validation = scalars(metrics)
            self.validation_reports[state.step] = metrics
            self.log.info(f"validation @ step {state.step}: {summary(metrics, self.task)}")
            self.log.event({"event": "eval", "split": "validation", "step": state.step, **scalars(metrics)})
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
                              "step": state.step, "metrics": scalars(metrics)}
            state.best = broadcast_object_list([state.best])[0] if self.world_size > 1 else state.best
            with self.log.progress.task(f"saving the best weights (step {state.step})"):
                export_pretrained(self.accelerator, self.model, self.tokenizer, best_dir(self.out_dir, state.step),
                                  self.recipe, self.task, card=self._card_facts(state.step, {"validation": metrics}))
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
                log.info(f"test: {summary(metrics, self.task)}")
                log.event({"event": "eval", "split": "test", "step": state.step, **scalars(metrics)})
                if self.recipe.output.save_predictions:
                    rows = self.task.prediction_rows(records, self.data.raw["test"])
                    write_jsonl_atomic(out / "predictions" / "test.jsonl", rows)
        weights_step = state.best["step"] if state.best else state.step
        final_metrics = {"validation": results["validation"], "test": results["test"]}
        if self.recipe.output.export_model:
            with log.progress.task("exporting the model"):
                export_pretrained(accelerator, self.model, self.tokenizer, out / "model", self.recipe, self.task,
                                  card=self._card_facts(weights_step, final_metrics))
            if self.recipe.finetune.merge_on_export and accelerator.is_main_process:
                staging = out / f".model-merged.partial-{os.getpid()}"
                export_merged(out / "model", staging)
                model_card.write(staging, self._card_facts(weights_step, final_metrics, merged=True), out / "model-merged")
                replace_dir_atomic(staging, out / "model-merged")
        if accelerator.is_main_process:
            results["train"] = {"steps": state.step, "epochs": round(state.step / self.steps_per_epoch, 4),
                                "runtime_s": round(self.train_seconds, 2), "skipped_steps": self.skipped_steps,
                                "world_size": self.world_size, "strategy": str(self.topology.strategy),
                                **self.topology.batch.as_dict()}
            write_json_atomic(out / "metrics.json", results)
            import resource

            log.event({"event": "end", "step": state.step,
                       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
            if self.recipe.output.export_model:
                log.info(f"model: {out / 'model'}")
            log.info(f"metrics: {out / 'metrics.json'}")
        self._write_status("finished")
        if accelerator.is_main_process and self.recipe.output.report:
            self._write_report()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.recipe.output.push_to_hub:
            self._push_to_hub(self._card_facts(weights_step, final_metrics))
        return results if accelerator.is_main_process else None

    def _card_facts(self, step: int, metrics: dict, merged: bool = False):
        """What the model card of an export of the weights of ``step`` says (main process; else None)."""
        if not self.accelerator.is_main_process:
            return None
        data, recipe = self.data, self.recipe
        sizes = {split: {"source": data.sources.get(split, ""), "rows": len(data.raw[split]),
                         "features": len(data.features[split])} for split in data.features}
        example_split = next(s for s in ("test", "validation", "train") if s in data.raw)
        row = data.raw[example_split][0]
        plan = {"world_size": self.world_size, "strategy": str(self.topology.strategy), **self.topology.batch.as_dict(),
                "total_steps": self.total_steps}
        best = {k: v for k, v in self.state.best.items() if k != "metrics"} if self.state.best else None
        return CardFacts(recipe=recipe, auto_model_class=self.task.auto_model_class,
                         model_config=self.task.model_config_kwargs(), data=sizes, plan=plan, step=step,
                         metrics={k: scalars(v) for k, v in metrics.items() if v}, best=best,
                         versions=library_versions(), example=row.get(recipe.data.text_column), merged=merged)

    def _write_report(self) -> None:
        try:
            with self.log.progress.task("writing the report"):
                path = write_report([self.out_dir])
        except Exception as exc:  # noqa: BLE001 - the run's results are safe; the report can be rebuilt
            self.log.rank_warning(f"could not write the report ({type(exc).__name__}: {exc}); "
                                  f"retry with: launcher report {self.out_dir}")
            return
        self.log.info(f"report: {path}")

    def _push_to_hub(self, facts) -> None:
        output, model_dir = self.recipe.output, self.out_dir / "model"
        try:
            url = push_to_hub(model_dir, self.out_dir / "metrics.json", output.hub_repo_id, output.hub_private, facts)
        except Exception as exc:  # noqa: BLE001 - offline, no token, no permission: all end the same way
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrainingError(
                f"output.push_to_hub: upload to {output.hub_repo_id} failed ({type(exc).__name__}: {first}); the local "
                f"export {model_dir} is complete; upload it later with: hf upload {output.hub_repo_id} {model_dir}"
            ) from None
        self.log.info(f"pushed to the Hub: {url}")

    def close(self) -> None:
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None:
            # The model (DDP reducer / DeepSpeed engine) and the control group hold the process groups.
            self.model = self.optimizer = self.scheduler = self._gloo_group = None
            self.log.progress.close()
            shutdown_distributed(accelerator)  # (also finishes the trackers: accelerator.end_training)


def _grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def run_training(recipe: Recipe) -> dict | None:
    run = FineTuneRun(recipe)
    try:
        run.setup()
        run.train()
        return run.finish()
    finally:
        run.close()
