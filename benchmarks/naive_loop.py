"""The classic tutorial loop: pad every example to max_length, no dynamic padding, plain PyTorch.

Run by bench.py: python benchmarks/naive_loop.py RECIPE STEPS OUT_JSON. Same split, model, optimizer
settings and schedule as the other two; only the batching is the tutorial's.
"""

from __future__ import annotations

import time

_start = time.perf_counter()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

_imports = time.perf_counter()
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler  # noqa: E402

import_seconds = time.perf_counter() - _imports


def main(recipe_path: str, steps: int, out_json: str) -> None:
    from launcher.data import load_validated_splits
    from launcher.model_io import model_location
    from launcher.recipe import load_recipe
    from launcher.tasks import TASKS

    recipe = load_recipe(recipe_path)
    training, data = recipe.training, recipe.data
    torch.manual_seed(training.seed)
    task = TASKS[recipe.task](recipe)
    splits = load_validated_splits(recipe, task).raw
    location = model_location(recipe)
    tokenizer = AutoTokenizer.from_pretrained(location)

    def tensors(split):
        encoded = tokenizer(list(split[data.text_column]), padding="max_length", truncation=True,
                            max_length=data.max_length, return_tensors="pt")
        labels = torch.tensor([task.label_to_id[str(v)] for v in split[data.label_column]])
        return TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)

    train = DataLoader(tensors(splits["train"]), batch_size=training.micro_batch_size, shuffle=True, drop_last=True)
    dev = DataLoader(tensors(splits["validation"]), batch_size=2 * training.micro_batch_size)
    model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=len(task.label_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay)
    scheduler = get_scheduler(training.lr_scheduler, optimizer, round(training.warmup_ratio * steps), steps)
    model.train()
    marks, step = {}, 0
    while step < steps:
        for input_ids, attention_mask, labels in train:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            now = time.perf_counter()
            marks.setdefault("first", now)
            marks["last"] = now
            if step == steps:
                break
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for input_ids, attention_mask, labels in dev:
            predictions = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
            correct += int((predictions == labels).sum())
            total += len(labels)
    result = {
        "steady_seconds": marks["last"] - marks["first"], "steps": steps, "micro_batch_size": training.micro_batch_size,
        "first_step_since_start": marks["first"] - _start, "import_seconds": import_seconds,
        "dev_accuracy": correct / total, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(out_json, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
