"""The model card (README.md) written into every export: what the model is, what it was trained on
and how, how well it does, and how to load it. Built with huggingface_hub's ModelCard (metadata
header + markdown), so the Hub and ``ModelCard.load`` read it.

Also the upload to the Hub (``output.push_to_hub``), which sends an export with its card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .schema import Recipe

# transformers pipelines by model class (transformers 5 has none for extractive QA and seq2seq)
PIPELINES = {"AutoModelForSequenceClassification": "text-classification",
             "AutoModelForTokenClassification": "token-classification",
             "AutoModelForCausalLM": "text-generation"}
PEFT_METHODS = ("lora", "ia3", "prompt_tuning")
HEADLINE = ("accuracy", "f1_macro", "f1", "exact_match", "precision", "recall", "bleu", "rouge1", "rougeL",
            "perplexity", "loss")


@dataclass
class CardFacts:
    """What the engine knows about an export when it writes it."""

    recipe: Recipe
    auto_model_class: str
    model_config: dict  # the task's config kwargs for the base model (labels)
    data: dict  # split -> {"source", "rows", "features"}
    plan: dict  # world_size, strategy, micro/accum/global batch, total_steps
    step: int  # the optimizer step these weights are from
    metrics: dict = field(default_factory=dict)  # split -> scalar metrics
    best: dict | None = None
    versions: dict = field(default_factory=dict)
    example: object = None  # one input from the data, for the load snippet
    merged: bool = False  # a merged export (model-merged/): a plain model whatever the method


def _is_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _example(value):
    """One input the pipeline takes: text; words joined; a conversation up to its last reply."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        turns = [dict(v) for v in value]
        while turns and turns[-1].get("role") == "assistant" and len(turns) > 1:
            turns.pop()
        return turns
    return value if isinstance(value, str) else "Hello"


def load_snippet(facts: CardFacts, location: str) -> str:
    """Python that loads the export at ``location`` and runs it once on ``facts.example``."""
    recipe = facts.recipe
    method = "full" if facts.merged else recipe.finetune.method
    example = _example(facts.example)
    if recipe.generation is not None and isinstance(example, str):
        example = recipe.generation.source_prefix + example  # what the model was trained to read
    pipeline_task = PIPELINES.get(facts.auto_model_class)
    if method in ("full", "bitfit") and pipeline_task:
        extra = ", max_new_tokens=32" if pipeline_task == "text-generation" else ""
        name = {"text-classification": "classifier", "token-classification": "tagger"}.get(pipeline_task, "generator")
        return (f"from transformers import pipeline\n\n"
                f"{name} = pipeline({pipeline_task!r}, model={location!r})\n"
                f"print({name}({example!r}{extra}))\n")
    if method in ("full", "bitfit"):
        return (f"from transformers import {facts.auto_model_class}, AutoTokenizer\n\n"
                f"model = {facts.auto_model_class}.from_pretrained({location!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({location!r})\n"
                + _run_once(facts, example))
    if method in PEFT_METHODS:
        base_kwargs = dict(facts.model_config)
        if recipe.model.gguf_file:
            base_kwargs["gguf_file"] = recipe.model.gguf_file
        kwargs = "".join(f", {k}={v!r}" for k, v in base_kwargs.items())
        return (f"from peft import PeftModel\n"
                f"from transformers import {facts.auto_model_class}, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained({location!r})\n"
                f"base = {facts.auto_model_class}.from_pretrained({recipe.model.name_or_path!r}{kwargs})\n"
                f"if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # the task added tokens\n"
                f"    base.resize_token_embeddings(len(tokenizer))\n"
                f"model = PeftModel.from_pretrained(base, {location!r}).eval()\n"
                + _run_once(facts, example))
    # bottleneck adapters and prefix tuning are the launcher's own (peft has none that fits)
    return (f"from launcher.finetune import load_exported\n\n"
            f"model, tokenizer = load_exported({location!r})\n" + _run_once(facts, example))


def _generate_kwargs(recipe: Recipe) -> str:
    """Decoding as the run's evaluation did it (generation.*), else greedy up to 32 tokens."""
    generation = recipe.generation
    if generation is None:
        return "max_new_tokens=32"
    return f"max_new_tokens={generation.max_new_tokens}, num_beams={generation.num_beams}"


def _run_once(facts: CardFacts, example) -> str:
    if facts.auto_model_class in ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
        generate = _generate_kwargs(facts.recipe)
        if isinstance(example, list):
            return (f"inputs = tokenizer.apply_chat_template({example!r}, add_generation_prompt=True, "
                    f"return_tensors='pt', return_dict=True)\n"
                    f"print(tokenizer.decode(model.generate(**inputs, {generate})[0], skip_special_tokens=True))\n")
        return (f"inputs = tokenizer([{example!r}], return_tensors='pt')\n"
                f"print(tokenizer.batch_decode(model.generate(**inputs, {generate}), skip_special_tokens=True))\n")
    if facts.auto_model_class == "AutoModelForQuestionAnswering":
        return ("inputs = tokenizer('What is it?', 'It is an example.', return_tensors='pt')\n"
                "print(model(**inputs).start_logits.argmax(-1), model(**inputs).end_logits.argmax(-1))\n")
    return (f"logits = model(**tokenizer([{example!r}], return_tensors='pt')).logits\n"
            f"print([model.config.id2label[int(i)] for i in logits.argmax(-1).flatten()])\n")


def _table(header: tuple[str, ...], rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def render(facts: CardFacts, location: str) -> str:
    """The card's text (metadata + markdown) for an export that lives at ``location``."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe = facts.recipe
    method = "full" if facts.merged else recipe.finetune.method
    adapter = method in PEFT_METHODS
    base = recipe.model.name_or_path
    metadata = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag=PIPELINES.get(facts.auto_model_class),
        base_model=base if _is_hub_id(base) else None,
        datasets=[recipe.data.dataset] if recipe.data.dataset and _is_hub_id(recipe.data.dataset) else None,
        tags=["recipe-launcher", recipe.task, method],
    )
    training = recipe.training
    hyper = [("method", method + (f" (r {recipe.finetune.lora_r}, alpha {recipe.finetune.lora_alpha})" if method == "lora" else "")),
             ("weights from optimizer step", f"{facts.step} of {facts.plan.get('total_steps', '?')}"),
             ("epochs" if training.max_steps is None else "max_steps", training.epochs if training.max_steps is None else training.max_steps),
             ("batch", f"micro {facts.plan.get('micro_batch_size')} x accumulation {facts.plan.get('grad_accum_steps')} x "
                       f"world size {facts.plan.get('world_size')} = global {facts.plan.get('global_batch_size')}"),
             ("strategy", facts.plan.get("strategy")), ("precision", training.precision),
             ("learning rate", f"{training.learning_rate:g} ({training.lr_scheduler}, warmup "
                               f"{training.warmup_steps if training.warmup_steps is not None else training.warmup_ratio})"),
             ("weight decay", training.weight_decay), ("max grad norm", training.max_grad_norm), ("seed", training.seed)]
    data_rows = [(split, f"`{info['source']}`", info["rows"], info["features"]) for split, info in facts.data.items()]
    splits = [s for s in ("validation", "test") if facts.metrics.get(s)]
    keys = [k for k in HEADLINE if any(k in facts.metrics[s] for s in splits)]
    keys += sorted({k for s in splits for k in facts.metrics[s]} - set(keys) - {"num_examples"})
    metric_rows = [(k, *(_number(facts.metrics[s].get(k, "")) for s in splits)) for k in keys]
    best = facts.best
    kind = "adapter" if method not in ("full", "bitfit") else "model"
    body = [
        f"# {recipe.name}",
        "",
        f"A {recipe.task.replace('_', ' ')} {kind} fine-tuned from `{base}`"
        + (f" (GGUF file `{recipe.model.gguf_file}`)" if recipe.model.gguf_file else "")
        + f" with **{method}** fine-tuning by recipe-launcher, from the recipe below.",
        "",
        "## How to load",
        "",
        "```python",
        load_snippet(facts, location).rstrip(),
        "```",
        "",
        "Any export of this launcher also reloads with `launcher.finetune.load_exported(DIR)`.",
        "",
        "## Data",
        "",
        _table(("split", "source", "rows", "features"), data_rows),
        "",
        "## Training",
        "",
        _table(("setting", "value"), hyper),
        "",
        "## Results",
        "",
        (_table(("metric", *splits), metric_rows) if metric_rows else "No evaluation was run."),
        "",
    ]
    if best:
        body += [f"Best validation {best['metric']}: {_number(best['value'])} at step {best['step']} "
                 f"(these weights are from step {facts.step}).", ""]
    body += ["## Framework versions", ""] + [f"- {name} {version}" for name, version in facts.versions.items()] + [""]
    body += ["## Recipe", "", "<details><summary>the resolved recipe</summary>", "", "```yaml",
             yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).rstrip(), "```", "", "</details>", ""]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body)).content


def write(directory: Path, facts: CardFacts, location: Path | None = None) -> None:
    """README.md in ``directory`` (an export being written); ``location``: where it will live."""
    (directory / "README.md").write_text(render(facts, str(location or directory)), encoding="utf-8")


def push_to_hub(model_dir: Path, metrics_file: Path, repo_id: str, private: bool, facts: CardFacts) -> str:
    """Upload an export, its card (loading from the Hub repository) and the run's metrics; returns the
    repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, ignore_patterns=["README.md"],
                      commit_message="Upload model (recipe-launcher)")
    api.upload_file(path_or_fileobj=render(facts, repo_id).encode(), path_in_repo="README.md", repo_id=repo_id)
    if metrics_file.exists():
        api.upload_file(path_or_fileobj=str(metrics_file), path_in_repo="metrics.json", repo_id=repo_id)
    return str(url)
