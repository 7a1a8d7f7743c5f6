"""`launcher eval`: evaluate without training - an exported checkpoint, the recipe's model, or a
language model prompted zero-/k-shot (recipe `prompt:`) - on any split, gathered across ranks
exactly like evaluation during training."""

from __future__ import annotations

import json
from pathlib import Path

from ..data import prepare_data
from ..errors import DataError, LauncherError
from ..files import write_json_atomic, write_jsonl_atomic
from ..finetune import load_exported
from ..model_io import load_tokenizer
from ..recipe import load_recipe
from ..schema import Recipe
from ..tasks import TASKS
from ..tasks.prompting import PromptClassificationTask
from .evaluate import predict
from .log import RankLog
from .outputs import check_writable
from .setup import build_accelerator, plan_topology, shutdown_distributed
from .telemetry import summary


def eval_recipe(recipe_path: str, overrides: list[str], checkpoint: Path | None) -> Recipe:
    """The recipe as evaluation needs it: replicas on every rank (no DeepSpeed), and - for an
    exported checkpoint - the model's own label order, so label ids mean what its head means."""
    overrides = [*overrides, "distributed.strategy=ddp"]
    if checkpoint is not None:
        config_path = checkpoint / "config.json"
        if not checkpoint.is_dir() or not config_path.exists():
            raise LauncherError(f"--checkpoint: {checkpoint} is not a model exported by the launcher (no config.json)")
        config = json.loads(config_path.read_text())
        labels = [config["id2label"][str(i)] for i in range(len(config.get("id2label", {})))]
        if labels:
            overrides.append(f"data.labels={json.dumps(labels)}")
    return load_recipe(recipe_path, overrides)


def run_evaluation(recipe_path: str, overrides: list[str], split: str, checkpoint: Path | None,
                   output: Path | None, jobs: Path | None = None) -> list[dict | None]:
    """One evaluation, or (``jobs``: a JSON list of {"overrides": [...], "output": DIR}) one per entry with
    the command line's overrides first, in one process: a continual run scores a stage's model on every
    stage seen so far without paying a process start (~5-10 s of imports) per cell."""
    each = [(overrides, output)]
    if jobs is not None:
        if output is not None:
            raise LauncherError("--output and --jobs: give each job its own \"output\" in the jobs file, not --output")
        each = [([*overrides, *entry.get("overrides", [])], Path(entry["output"])) for entry in _read_jobs(jobs)]
    recipes = [eval_recipe(recipe_path, job_overrides, checkpoint) for job_overrides, _ in each]  # all checked first
    for recipe, (_, out) in zip(recipes, each):
        check_writable(out or (recipe.output_dir() / "eval"))  # every output too, before any job writes its own
    topology = plan_topology(recipes[0])
    accelerator = build_accelerator(recipes[0], topology)
    try:
        return [_evaluate(recipe, split, checkpoint, out, accelerator) for recipe, (_, out) in zip(recipes, each)]
    finally:
        shutdown_distributed(accelerator)


def _read_jobs(path: Path) -> list[dict]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LauncherError(f"--jobs: cannot read {path} as JSON ({exc})") from None
    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and set(e) <= {"overrides", "output"} and isinstance(e.get("output"), str)
            and isinstance(e.get("overrides", []), list) and all(isinstance(o, str) for o in e.get("overrides", []))
            for e in entries):
        raise LauncherError(f'--jobs: {path} must hold a non-empty JSON list of {{"overrides": [KEY=VALUE, ...], '
                            f'"output": DIR}} objects')
    outputs = [str(Path(e["output"]).resolve()) for e in entries]
    if len(set(outputs)) != len(outputs):
        raise LauncherError(f"--jobs: {path} names one output directory for several jobs; give each its own")
    return entries


def _evaluate(recipe, split: str, checkpoint: Path | None, output: Path | None, accelerator) -> dict | None:
    from accelerate.utils import set_seed

    log = RankLog(accelerator.process_index, accelerator.num_processes)
    set_seed(recipe.training.seed)
    task = PromptClassificationTask(recipe) if recipe.prompt is not None else TASKS[recipe.task](recipe)
    task.say = log.info
    task.check_limits()
    out_dir = output or (recipe.output_dir() / "eval")
    check_writable(out_dir)
    if checkpoint is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, task, tokenizer, accelerator.local_main_process_first)
    if split not in data.features:
        raise DataError(f"--split {split}: the recipe's data has no {split} split (it has {', '.join(data.features)})")
    if checkpoint is not None:
        model, _ = load_exported(checkpoint)
    else:
        model = task.build_model(tokenizer)
    model = model.to(accelerator.device).eval()
    batch_size = recipe.evaluation.micro_batch_size or 2 * recipe.training.micro_batch_size
    what = "prompted " + task.kind + f" LM, {recipe.prompt.shots}-shot" if recipe.prompt else "model"
    log.info(f"evaluating {what} {checkpoint or recipe.model.name_or_path} on {split} "
             f"({len(data.features[split])} examples, {accelerator.num_processes} process(es))")
    records = predict(model, data.features[split], task, tokenizer, accelerator, batch_size)
    result = None
    if accelerator.is_main_process:
        metrics = task.compute_metrics(records)
        result = {"split": split, "model": str(checkpoint or recipe.model.name_or_path),
                  "prompt": recipe.prompt.model_dump() if recipe.prompt else None, "metrics": metrics}
        write_json_atomic(out_dir / f"{split}.json", result)
        write_jsonl_atomic(out_dir / f"{split}-predictions.jsonl", task.prediction_rows(records, data.raw[split]))
        log.info(f"{split}: {summary(metrics, task)}")
        log.info(f"metrics: {out_dir / f'{split}.json'}")
    accelerator.wait_for_everyone()
    return result
