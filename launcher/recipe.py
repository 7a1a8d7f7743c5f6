"""The recipe: one YAML file, validated by a typed schema, that describes a whole fine-tuning job.

Loading goes: YAML (safe loader) -> ``base:`` chain merged (child wins, dicts merge key by key)
-> ``a.b=value`` overrides applied -> pydantic validation. Every problem becomes one
``RecipeError`` line naming the file and dotted key, with a did-you-mean for misspelled keys.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import RecipeError

STRATEGIES = ("auto", "ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_grad_op")


class _Section(BaseModel):
    # extra="forbid" is what turns a misspelled key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(_Section):
    name_or_path: str = Field(
        description="Pretrained model: a local directory, `pkg://PACKAGE/dir` (a model shipped in a "
        "Python package), or a Hugging Face Hub id (needs network)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer location if not the model's own.")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Model config attributes to change before loading, e.g. `{hidden_dropout_prob: 0.0}`. "
        "Each key must already exist in the model's config.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the model to run. Off unless you trust the source."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for Hub models.")
    gguf_file: str | None = Field(
        None, description="A GGUF file inside model.name_or_path (a directory) to load the weights from, dequantized "
        "to fp32 (needs the gguf package; task causal_lm_sft only). model.tokenizer must then name a tokenizer directory."
    )


class DataSection(_Section):
    dataset: str | None = Field(
        None,
        description="Hugging Face Hub dataset id (e.g. `glue`). When set, train/validation/test are split "
        "names; when unset they are local files (csv, tsv, json, jsonl, parquet; .gz/.bz2/.xz/.zst too).",
    )
    dataset_config: str | None = Field(None, description="Hub dataset configuration name (e.g. `sst2`).")
    train: str | None = Field(None, description="Training split name (Hub) or file path.")
    validation: str | None = Field(
        None, description="Validation split/file. If unset, `validation_size` is carved from train."
    )
    test: str | None = Field(None, description="Test split/file. If unset, `test_size` is carved from train.")
    validation_size: float = Field(
        0.1,
        ge=0,
        description="Used when `validation` is unset: a fraction of train (0 < x < 1) or a row count (>= 1). "
        "0 disables validation.",
    )
    test_size: float = Field(
        0,
        ge=0,
        description="Used when `test` is unset: a fraction of train (0 < x < 1) or a row count (>= 1), "
        "held out before validation is carved. 0 means no test split.",
    )
    split_seed: int = Field(42, description="Seed for carving validation/test splits (independent of training.seed).")
    text_column: str = Field("text", description="Column holding the text.")
    text_pair_column: str | None = Field(None, description="Second text column for pair tasks (e.g. NLI).")
    label_column: str = Field("label", description="Column holding the label (int or string).")
    labels: list[str | int] | None = Field(
        None,
        description="The label set, in id order. If unset: the sorted distinct labels of the training split.",
    )
    drop_other_labels: bool = Field(
        False,
        description="Drop rows whose label is not in `labels` (counted and reported). "
        "If false, such a row is an error.",
    )
    max_length: int = Field(128, gt=0, description="Truncate inputs to this many tokens.")
    max_train_samples: int | None = Field(None, gt=0, description="Use only the first N training rows (debugging).")
    max_eval_samples: int | None = Field(
        None, gt=0, description="Use only the first N rows of validation and test."
    )
    cache_dir: str | None = Field(
        None,
        description="Where tokenized datasets are cached (default: $LAUNCHER_CACHE or ~/.cache/recipe-launcher).",
    )

    @model_validator(mode="after")
    def _splits(self) -> "DataSection":
        if self.dataset is None and self.train is None:
            raise ValueError("give data.train (a file) or data.dataset (a Hub dataset id)")
        return self


class TrainingSection(_Section):
    epochs: float = Field(3, gt=0, description="Number of passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(8, gt=0, description="Examples per forward/backward on one rank.")
    grad_accum_steps: int | None = Field(
        None, gt=0, description="Micro-batches accumulated per optimizer step (default 1, or derived from global_batch_size)."
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description="Examples per optimizer step over all ranks = micro_batch_size x grad_accum_steps x world size. "
        "If set, grad_accum_steps is derived from it (and must divide evenly).",
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and LayerNorm weights).")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warmup."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of total steps used for linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    max_grad_norm: float = Field(
        1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables clipping."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or bf16/fp16 mixed precision. fp16 needs a GPU; on CPU use fp32 (bf16 is very slow there)."
    )
    seed: int = Field(42, description="Seed for model head init, dropout and data order.")
    log_every: int = Field(
        10, gt=0,
        description="Log loss/lr/throughput every N optimizer steps. The loss is read from the device only "
        "then (and before validation/checkpoints), so a small value costs a host-device sync per step.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (mega-batches of 50 global batches sorted by "
        "length, then shuffled): much less padding, order still random and seeded, exact resume kept.",
    )
    pad_to_multiple_of: int | None = Field(
        None, gt=0,
        description="Pad each batch's length up to a multiple of this (default: 8 on GPU for tensor cores, "
        "1 on CPU where padding only costs time).",
    )
    compile: bool = Field(False, description="torch.compile the model (DDP only; first steps are slow while it compiles).")
    on_nonfinite_loss: Literal["error", "skip"] = Field(
        "error",
        description="A NaN/inf loss: stop with an error naming the step, or skip that update and count it "
        "(skip: DDP only; DeepSpeed has already reduced the gradients by then).",
    )


class EvaluationSection(_Section):
    every_steps: int | None = Field(None, gt=0, description="Evaluate on validation every N optimizer steps.")
    every_epoch: bool = Field(True, description="Evaluate on validation at the end of each epoch.")
    micro_batch_size: int | None = Field(None, gt=0, description="Eval batch per rank (default: 2x training micro batch).")
    metrics: list[str] | None = Field(
        None,
        description="Metrics to compute (offline implementations); default: the task's standard metrics "
        "(classification: accuracy, precision, recall, f1). `evaluate:NAME` loads a Hugging Face `evaluate` "
        "metric instead (needs network).",
    )
    best_metric: str | None = Field(
        None,
        description="Metric that picks the best checkpoint, e.g. `accuracy`, `f1_macro` or `loss`. "
        "When set, the exported model and the test run use the best validation weights.",
    )
    greater_is_better: bool | None = Field(
        None, description="Direction of best_metric (default: the task's - lower wins for loss and perplexity, higher for the rest)."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement of best_metric."
    )

    @model_validator(mode="after")
    def _early_stopping_needs_metric(self) -> "EvaluationSection":
        if self.early_stopping_patience is not None and self.best_metric is None:
            raise ValueError("early_stopping_patience needs evaluation.best_metric")
        return self


class DistributedSection(_Section):
    strategy: Literal[STRATEGIES] = Field(
        "auto",
        description="auto (what `accelerate launch` was configured with, else DDP), ddp, DeepSpeed "
        "zero0/zero1/zero2/zero3/zero3_offload, or PyTorch FSDP2: fsdp (weights, gradients and optimizer state "
        "sharded) or fsdp_grad_op (gradients and optimizer state sharded; weights stay whole from forward to backward).",
    )
    timeout_minutes: float = Field(
        30, gt=0, description="Process-group timeout: how long a collective may wait for a missing rank."
    )


METHODS = ("full", "lora", "prompt_tuning", "prefix_tuning", "ia3", "adapter", "bitfit")


class FinetuneSection(_Section):
    method: Literal[METHODS] = Field(
        "full",
        description="full (every weight), or parameter-efficient: lora, prompt_tuning, prefix_tuning, ia3 "
        "(via peft), adapter (bottleneck adapters after each transformer block), bitfit (biases + task head).",
    )
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names LoRA/IA3 adapt (default: peft's choice for the architecture)."
    )
    num_virtual_tokens: int = Field(20, gt=0, description="Prompt/prefix tuning: learned virtual tokens.")
    adapter_size: int = Field(64, gt=0, description="Bottleneck adapter hidden size.")
    merge_on_export: bool = Field(
        False,
        description="Also export the base model with the adapter merged in (<dir>/model-merged; lora and ia3 only).",
    )

    @model_validator(mode="after")
    def _mergeable(self) -> "FinetuneSection":
        if self.merge_on_export and self.method not in ("lora", "ia3"):
            raise ValueError(
                f"merge_on_export works for lora and ia3; {self.method} adds computation that cannot be folded "
                f"into the base weights"
            )
        return self


class PromptSection(_Section):
    template: str = Field(
        description="The prompt for one example, with {text} (and {text_pair}) placeholders; for a masked LM it "
        "must contain {mask} where the label word goes. E.g. 'Review: {text}\\nSentiment:'."
    )
    verbalizer: dict[str, str] = Field(
        description="Label -> the word the model should produce for it (each must be one token), e.g. "
        "{positive: ' good', negative: ' bad'}. Every label in the data needs one."
    )
    shots: int = Field(0, ge=0, description="k demonstrations from the training split prepended to each prompt (0 = zero-shot).")
    shot_seed: int = Field(42, description="Seed for drawing the demonstrations (the same for every example and rank).")
    separator: str = Field("\n\n", description="Between demonstrations and the prompt.")


class GenerationSection(_Section):
    """Sequence-to-sequence settings (task: seq2seq). Metrics: evaluation.metrics [rouge, bleu]."""

    max_target_length: int = Field(
        128, gt=0, description="Truncate target texts to this many tokens for the training (and eval) loss; "
        "ROUGE/BLEU score the full reference text."
    )
    max_new_tokens: int = Field(128, gt=0, description="Generate at most this many tokens per example when evaluating.")
    num_beams: int = Field(1, ge=1, description="Beam search width when evaluating; 1 = greedy decoding.")
    source_prefix: str = Field(
        "", description="Text put before every source text, e.g. `summarize: ` or `translate English to German: ` "
        "(what T5 checkpoints were trained with)."
    )


class QuestionAnsweringSection(_Section):
    """Extractive question answering settings (task: question_answering). Metrics: evaluation.metrics
    [exact_match, f1]."""

    doc_stride: int | None = Field(
        128, ge=0,
        description="A context longer than data.max_length is split into windows that overlap by this many "
        "tokens (every question must leave more room than this). null: no splitting; an example that does "
        "not fit in data.max_length is an error.",
    )
    max_answer_length: int = Field(30, gt=0, description="Longest answer span the model may predict, in tokens.")
    n_best: int = Field(20, gt=0, description="Best-scoring candidate spans kept per window when choosing an example's answer.")
    allow_unanswerable: bool = Field(
        False,
        description="SQuAD 2.0 style: questions without an answer (answers.text empty) are allowed, the model may "
        "answer nothing, and metrics add HasAns_/NoAns_ breakdowns. If false, an unanswered row is an error.",
    )
    null_score_diff_threshold: float = Field(
        0.0, description="With allow_unanswerable: answer nothing when the no-answer score exceeds the best span's "
        "score by more than this.",
    )
    drop_bad_answers: bool = Field(
        False, description="Drop rows whose answer text is not at its answer_start in the context (counted and "
        "reported). If false, such a row is an error.",
    )


class RelationSection(_Section):
    """Relation extraction settings (task: relation_extraction). Spans are character offsets into
    data.text_column, end exclusive: text[head_start:head_end] is the head entity."""

    head_start_column: str = Field("head_start", description="Column with the head entity's first character offset.")
    head_end_column: str = Field("head_end", description="Column with the head entity's end offset (exclusive).")
    tail_start_column: str = Field("tail_start", description="Column with the tail entity's first character offset.")
    tail_end_column: str = Field("tail_end", description="Column with the tail entity's end offset (exclusive).")
    no_relation_label: str | None = Field(
        "no_relation",
        description="The label meaning 'no relation' (the negative class): left out of micro precision/recall/F1, "
        "as in TACRED. It must be one of the labels; null if every label is a relation.",
    )
    head_markers: tuple[str, str] = Field(
        ("[E1]", "[/E1]"),
        description="Inserted before and after the head entity; added to the tokenizer as special tokens (the model's "
        "embeddings grow to match, and the exported tokenizer includes them).",
    )
    tail_markers: tuple[str, str] = Field(("[E2]", "[/E2]"), description="Inserted before and after the tail entity.")

    @model_validator(mode="after")
    def _distinct_markers(self) -> "RelationSection":
        markers = [*self.head_markers, *self.tail_markers]
        if any(not marker or marker != marker.strip() for marker in markers):
            raise ValueError(f"entity markers must be non-empty, without surrounding spaces; got {markers}")
        if len(set(markers)) != len(markers):
            raise ValueError(f"the four entity markers must all differ; got {markers}")
        return self


class SFTSection(_Section):
    """Supervised fine-tuning on dialogues (task: causal_lm_sft). Metrics: evaluation.metrics [perplexity]."""

    system_prompt: str | None = Field(
        None, description="A system message put first in every conversation that has none (otherwise the chat "
        "template's own default system prompt, if it has one, applies)."
    )
    generate_max_new_tokens: int = Field(
        0, ge=0, description="Greedily generate up to this many tokens for the last assistant turn of every test "
        "conversation and write them to predictions/test.jsonl next to the reference reply; 0: no generation."
    )


# ---- task-specific sections (one class per task that needs settings; add new ones above this line) ----


class CheckpointSection(_Section):
    every_steps: int | None = Field(None, gt=0, description="Write a checkpoint every N optimizer steps.")
    every_epoch: bool = Field(False, description="Write a checkpoint at the end of each epoch.")
    keep_last: int = Field(2, ge=1, description="Keep the newest N step checkpoints (the best weights are kept separately).")
    resume: str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in the run directory if there is one; "
        "never: start fresh (refused if the directory holds a run, unless output.overwrite); or a checkpoint path.",
    )


class OutputSection(_Section):
    dir: str = Field("runs/{name}", description="Run directory. `{name}` is replaced by the recipe name.")
    overwrite: bool = Field(False, description="Allow reusing a directory that already holds a run.")
    save_predictions: bool = Field(True, description="Write per-example test predictions (predictions/test.jsonl).")
    export_model: bool = Field(True, description="Export model + tokenizer (safetensors) to <dir>/model.")


class Recipe(_Section):
    name: str = Field(description="Run name; used in the default output directory.")
    task: str = Field("sequence_classification", description="Task module to run (see launcher/tasks).")
    model: ModelSection
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    generation: GenerationSection | None = Field(
        None, description="Sequence-to-sequence settings (task: seq2seq): target length, decoding, source prefix."
    )
    question_answering: QuestionAnsweringSection | None = Field(
        None, description="Extractive question answering settings (task: question_answering): windows, answer length, "
        "unanswerable questions."
    )
    relation: RelationSection | None = Field(
        None, description="Relation extraction settings (task: relation_extraction): entity span columns, the "
        "no-relation label, entity markers."
    )
    sft: SFTSection | None = Field(
        None, description="Dialogue fine-tuning settings (task: causal_lm_sft): system prompt, test-set generations."
    )
    # task-specific sections: add new fields above this line (default None or a default_factory)
    prompt: PromptSection | None = Field(
        None, description="Prompt-based evaluation (`launcher eval`): score a causal or masked LM zero-/k-shot."
    )
    output: OutputSection = Field(default_factory=OutputSection)

    _source: Path | None = PrivateAttr(None)  # the recipe file, for paths relative to it

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from .tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}{_did_you_mean(value, TASKS)}; known: {', '.join(TASKS)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a non-empty name without '/' (it becomes a directory name)")
        return value

    @model_validator(mode="after")
    def _metrics_known(self) -> "Recipe":
        from .metrics import check_metric_names
        from .tasks import TASKS

        task = TASKS[self.task]
        if self.evaluation.metrics is None:
            self.evaluation.metrics = list(task.default_metrics)
        check_metric_names(self.evaluation.metrics, self.evaluation.best_metric, task.metric_keys)
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))


# --------------------------------------------------------------------------------------------
# Loading: YAML, base inheritance, overrides, readable errors.


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _section_fields(model: type[BaseModel], loc: tuple) -> dict | None:
    """The fields of the schema node at ``loc`` (None if loc does not lead to a model)."""
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return None
        sub = _model_in(field.annotation)
        if sub is None:
            return None
        model = sub
    return model.model_fields


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def all_dotted_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every valid dotted key of the recipe schema (used for suggestions and docs)."""
    model = model or Recipe
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        sub = _model_in(field.annotation)
        if sub is not None:
            keys.extend(all_dotted_keys(sub, dotted + "."))
    return keys


def _unknown_key_message(loc: tuple) -> str:
    dotted = ".".join(str(p) for p in loc)
    parent, key = loc[:-1], str(loc[-1])
    fields = _section_fields(Recipe, parent) or {}
    prefix = ".".join(str(p) for p in parent)
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"{dotted}: unknown key; did you mean {suggestion}?"
    # The key may exist in another section (e.g. learning_rate put under model:).
    elsewhere = [k for k in all_dotted_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"{dotted}: unknown key here; did you mean {elsewhere[0]}?"
    valid = ", ".join(fields) if fields else "(none)"
    return f"{dotted}: unknown key; valid keys here: {valid}"


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the source and dotted key."""
    lines = []
    for item in err.errors():
        loc = tuple(p for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: {_unknown_key_message(loc)}")
            continue
        dotted = ".".join(str(p) for p in loc)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if item["type"] == "missing":
            msg = "required key is missing"
        elif "input" in item and item["type"] not in ("value_error",) and not isinstance(item["input"], dict):
            msg = f"{msg} (got {item['input']!r})"
        lines.append(f"{source}: {dotted}: {msg}" if dotted else f"{source}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Point at where the broken construct starts (context_mark, e.g. an unclosed "["), not only
        # where the parser gave up, which is often the next line.
        start = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        end = getattr(exc, "problem_mark", None)
        where = f" line {start.line + 1}, column {start.column + 1}" if start else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context else problem
        if end is not None and start is not None and (end.line, end.column) != (start.line, start.column):
            detail += f" (noticed at line {end.line + 1}, column {end.column + 1})"
        raise RecipeError(f"{path}:{where}: invalid YAML: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def deep_merge(base: dict, child: dict) -> dict:
    """Child values win; nested mappings merge key by key; lists and scalars are replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise RecipeError(f"{path}: base: recipes form a cycle ({chain})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: must be a path to another recipe, got {base!r}")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    if not base_path.exists():
        raise RecipeError(f"{path}: base: {base} not found (looked at {base_path})")
    return deep_merge(_load_with_bases(base_path, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.learning_rate=3e-5`` -> (['training', 'learning_rate'], '3e-5' parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. training.learning_rate=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part} is a value, not a section")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with readable lines."""
    path = Path(path)
    data = _load_with_bases(path)
    data = apply_overrides(data, overrides or [])
    source = str(path) + (" (with overrides)" if overrides else "")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None
    recipe._source = path.resolve()
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def recipe_base_dir(recipe: Recipe) -> Path | None:
    return recipe._source.parent if recipe._source else None
