"""Where the step goes: the launcher's optimizer step beside Trainer's, in one process, interleaved.

The job of benchmarks/minilm_rt.yaml (MiniLM-L6 on the Rotten Tomatoes snippets, micro-batch 16, no
accumulation, AdamW with clipping, fp32 on the CPU). Ways, each with its own copy of the same
pretrained weights, stepped in turn (step k of every way, then step k+1, ...), so that the load of a
shared machine hits all alike:

- launcher: `FineTuneRun._optimizer_step` (collate, forward, the task's summed loss, backward,
  clipping, AdamW, scheduler) on the launcher's length-grouped batches;
- Trainer, group_by_length: transformers' Trainer's own step (`training_step`, clipping through its
  accelerator, its optimizer - adamw_torch_fused - and scheduler, `zero_grad`) on the batches of its
  own `LengthGroupedSampler` (`train_sampling_strategy="group_by_length"`), collated by
  `DataCollatorWithPadding`;
- Trainer on the launcher's batches: the same Trainer step fed the launcher's examples, step for
  step (collated by Trainer's collator): what is left when the batches are equal;
- launcher, foreach AdamW: the launcher's step with the optimizer it used before (foreach AdamW,
  not fused), on the launcher's batches.

    .venv/bin/python benchmarks/step_compare.py [--steps 30] [--tries 2] [--threads 2] [--profile 5]

After one warm-up step per way, every step runs --tries times per way (rotating who goes first) and
its fastest try counts: other processes only ever add time. Prints samples/s (sum over steps),
padding, and ratios; per-step ratios on equal batches; with --profile N, a torch.profiler table of
N steps per way grouped into the step's phases (forward, backward, optimizer, ...). Trainer's loop
around the step (callbacks, logging) is not timed here: benchmarks/bench.py runs the real thing.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
RECIPE = HERE / "minilm_rt.yaml"
WAYS = ("launcher", "Trainer, group_by_length", "Trainer on the launcher's batches", "launcher, foreach AdamW")


def build(steps: int, work: Path):
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from launcher.engine.run import FineTuneRun
    from launcher.engine.telemetry import LossWindow
    from launcher.engine.weights import optimizer_param_groups
    from launcher.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"training.max_steps={steps}", f"output.dir={work / 'run'}", "output.report=false",
                                  "output.overwrite=true"])
    run = FineTuneRun(recipe)
    run.setup()
    run.model.train()
    run.window = LossWindow()
    # A second launcher run object sharing the data, with its own model and a foreach AdamW.
    old = copy.copy(run)
    old.model = copy.deepcopy(run.model)
    training = recipe.training
    optimizer = torch.optim.AdamW(optimizer_param_groups(old.model, training.weight_decay), lr=training.learning_rate,
                                  betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_epsilon, foreach=True)
    old.optimizer = run.accelerator.prepare_optimizer(optimizer)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # the schedule costs the same
    old.window = LossWindow()

    features = run.train_features
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in features.column_names]
    train = features.select_columns(columns)
    model = copy.deepcopy(run.accelerator.unwrap_model(run.model))
    args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=training.micro_batch_size,
        learning_rate=training.learning_rate, weight_decay=training.weight_decay,
        warmup_steps=round(training.warmup_ratio * steps), lr_scheduler_type=training.lr_scheduler,
        max_grad_norm=training.max_grad_norm, max_steps=steps, seed=training.seed, report_to=[], disable_tqdm=True,
        train_sampling_strategy="group_by_length", use_cpu=not torch.cuda.is_available(), save_strategy="no")
    collator = DataCollatorWithPadding(run.tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's own loop sets before each step
    model.train()

    def trainer_step(inputs):
        trainer.training_step(model, inputs)
        trainer.accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()

    def trainer_on(indices):
        rows = train[indices]
        trainer_step(collator([{k: rows[k][i] for k in columns} for i in range(len(indices))]))

    return run, old, trainer, trainer_step, trainer_on


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per way (after one warm-up each)")
    parser.add_argument("--tries", type=int, default=2, help="times each step runs per way (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps per way")
    args = parser.parse_args()
    import torch

    from launcher.sampling import rank_micro_batches

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="step-compare-"))
    total = (args.steps + 1) * args.tries + args.profile + 1
    run, old, trainer, trainer_step, trainer_on = build(total, work)
    try:
        lengths = run._train_lengths()
        ours = rank_micro_batches(len(run.train_features), run.topology.batch, 0, run.recipe.training.seed, 0,
                                  lengths=lengths)
        theirs = iter(trainer.get_train_dataloader())
        seconds = {way: [] for way in WAYS}
        samples = {way: [] for way in WAYS}
        fed = {way: [] for way in WAYS}
        real = {way: [] for way in WAYS}
        for step in range(args.steps + 1):
            mine = next(ours)
            their_batch = next(theirs)
            steps = {
                "launcher": lambda: run._optimizer_step(mine),
                "Trainer, group_by_length": lambda: trainer_step(dict(their_batch)),
                "Trainer on the launcher's batches": lambda: trainer_on(mine[0]),
                "launcher, foreach AdamW": lambda: old._optimizer_step(mine),
            }
            fastest = {way: float("inf") for way in WAYS}
            for attempt in range(args.tries if step else 1):
                shift = (step + attempt) % len(WAYS)
                for way in WAYS[shift:] + WAYS[:shift]:
                    began = time.perf_counter()
                    steps[way]()
                    fastest[way] = min(fastest[way], time.perf_counter() - began)
            if not step:
                continue
            for way in WAYS:
                seconds[way].append(fastest[way])
                if way == "Trainer, group_by_length":
                    mask = their_batch["attention_mask"]
                    samples[way].append(mask.shape[0])
                    fed[way].append(mask.numel())
                    real[way].append(int(mask.sum()))
                else:
                    ids = mine[0]
                    samples[way].append(len(ids))
                    fed[way].append(len(ids) * int(lengths[ids].max()))
                    real[way].append(int(lengths[ids].sum()))
        profiles = {way: profile(steps_for(way, run, old, trainer_step, trainer_on, ours, theirs), args.profile)
                    for way in WAYS[:2] + WAYS[3:]} if args.profile else {}
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)

    rate = {way: sum(samples[way]) / sum(seconds[way]) for way in WAYS}
    anchor = rate["Trainer, group_by_length"]
    print(f"\nMiniLM-L6 on Rotten Tomatoes, micro-batch 16, fp32, {args.threads} thread(s), {args.steps} steps per way, "
          f"fastest of {args.tries} interleaved tries each\n")
    print("| way | samples/s | padding | real tokens/step | vs Trainer, group_by_length |")
    print("|---|---|---|---|---|")
    for way in WAYS:
        padding = 1 - sum(real[way]) / sum(fed[way])
        print(f"| {way} | {rate[way]:.1f} | {padding:.1%} | {statistics.mean(real[way]):.0f} | {rate[way] / anchor:.2f}x |")
    same = [b / a for a, b in zip(seconds["launcher"], seconds["Trainer on the launcher's batches"])]
    print(f"\nlauncher / Trainer on the same batches, per-step speed ratio: median {statistics.median(same):.2f}x "
          f"(quartiles {statistics.quantiles(same, n=4)[0]:.2f}-{statistics.quantiles(same, n=4)[2]:.2f})")
    old_new = [a / b for a, b in zip(seconds["launcher, foreach AdamW"], seconds["launcher"])]
    print(f"launcher fused / foreach AdamW, per-step speed ratio: median {statistics.median(old_new):.2f}x")
    for way, table in profiles.items():
        print(f"\nprofile, {way} ({args.profile} steps): ms per step by phase")
        for phase, ms in table:
            print(f"  {phase:<34} {ms:8.1f}")
    return 0


def steps_for(way, run, old, trainer_step, trainer_on, ours, theirs):
    if way == "launcher":
        return lambda: run._optimizer_step(next(ours))
    if way == "launcher, foreach AdamW":
        return lambda: old._optimizer_step(next(ours))
    return lambda: trainer_step(dict(next(theirs)))


def profile(step, count: int) -> list[tuple[str, float]]:
    """Wall milliseconds per step in each phase: forward, backward, optimizer, clipping, the rest."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        for _ in range(count):
            step()
        wall = time.perf_counter() - began
    events = prof.events()
    def spans(predicate):
        return sum(e.cpu_time_total for e in events if predicate(e.name)) / 1000 / count

    forward_backward = {
        "backward (autograd)": spans(lambda n: n == "autograd::engine::evaluate_function: torch::autograd::AccumulateGrad")
        + spans(lambda n: n.startswith("autograd::engine::evaluate_function:") and "AccumulateGrad" not in n),
        "optimizer step": spans(lambda n: n.startswith("Optimizer.step#")),
        "zero_grad": spans(lambda n: n.startswith("Optimizer.zero_grad#")),
        "gradient norm + clip": spans(lambda n: n in ("aten::_foreach_norm",)) ,
    }
    rows = [("whole step (wall)", wall * 1000 / count), *forward_backward.items()]
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    rows += [(f"self: {e.key[:30]}", e.self_cpu_time_total / 1000 / count) for e in top]
    return rows


if __name__ == "__main__":
    sys.exit(main())
