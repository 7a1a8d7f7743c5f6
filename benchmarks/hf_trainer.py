"""The same fine-tune with transformers' Trainer, configured as a user would (DataCollatorWithPadding).

Run by bench.py: python benchmarks/hf_trainer.py RECIPE STEPS OUT_JSON [SEED|-] [SAMPLING] (or under
`accelerate launch --num_processes 2`: Trainer's own DDP, micro-batch per rank as the launcher's). SAMPLING is
Trainer's `train_sampling_strategy`: "random" (the default a user gets) or "group_by_length" (Trainer's
own length grouping, its best configuration for variable-length text). Uses the launcher only to load
the identical train/dev split; tokenization, batching and training are Trainer's own.
"""

from __future__ import annotations

import time

_start = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

_imports = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import_seconds = time.perf_counter() - _imports


def main(recipe_path: str, steps: int, out_json: str, seed: int | None = None, sampling: str = "random") -> None:
    from launcher.data import load_validated_splits
    from launcher.model_io import model_location
    from launcher.recipe import load_recipe
    from launcher.tasks import TASKS

    recipe = load_recipe(recipe_path, [f"training.seed={seed}"] if seed is not None else [])
    task = TASKS[recipe.task](recipe)
    splits = load_validated_splits(recipe, task).raw
    location = model_location(recipe)
    tokenizer = AutoTokenizer.from_pretrained(location)
    label_to_id = task.label_to_id

    def encode(rows):
        out = tokenizer(rows[recipe.data.text_column], truncation=True, max_length=recipe.data.max_length)
        out["labels"] = [label_to_id[str(v)] for v in rows[recipe.data.label_column]]
        return out

    columns = splits["train"].column_names
    train = splits["train"].map(encode, batched=True, remove_columns=columns)
    dev = splits["validation"].map(encode, batched=True, remove_columns=columns)
    model = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=len(task.label_names), id2label=dict(enumerate(task.label_names)), label2id=label_to_id
    )
    training = recipe.training
    args = TrainingArguments(
        output_dir=out_json + ".trainer", per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=2 * training.micro_batch_size, gradient_accumulation_steps=1,
        learning_rate=training.learning_rate, weight_decay=training.weight_decay, warmup_steps=round(training.warmup_ratio * steps),
        lr_scheduler_type=training.lr_scheduler, max_grad_norm=training.max_grad_norm, max_steps=steps,
        seed=training.seed, logging_steps=steps, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, train_sampling_strategy=sampling, use_cpu=not torch.cuda.is_available(),
        bf16=os.environ.get("BENCH_BF16") == "1",  # benchmarks/gpu_bench.py: the launcher runs bf16 there too
    )
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            marks.setdefault("first", now)
            marks["last"] = now

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[Clock()])
    trainer.train()
    dev_accuracy = trainer.evaluate()["eval_accuracy"]
    if not trainer.is_world_process_zero():
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under `accelerate launch`: Trainer runs DDP itself
    result = {
        "steady_seconds": marks["last"] - marks["first"], "steps": steps,
        "micro_batch_size": training.micro_batch_size * world,  # samples per optimizer step, all ranks
        "first_step_since_start": marks["first"] - _start, "import_seconds": import_seconds,
        "dev_accuracy": dev_accuracy, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "transformers": transformers.__version__,
    }
    with open(out_json, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None,
         sys.argv[5] if len(sys.argv) > 5 else "random")
