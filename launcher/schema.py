"""The recipe schema: typed, validated sections (pydantic). Loading - YAML, ``base:`` chains, overrides,
readable errors - is launcher/recipe.py.

The core sections live here. A task's own settings (``sft:``, ``generation:``, ...) live in the task's
module: a task declares its section, the task registry (launcher/tasks/__init__.py) registers it here,
and ``recipe_schema()`` is the Recipe with every registered section. The schema also validates task
names and metric names against what the registered tasks offer - without importing any task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from .metrics import check_metric_names

STRATEGIES = ("auto", "ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_grad_op")


def path_segment(value: str) -> str:
    """A name that becomes a directory name (a recipe's, a continual stage's)."""
    if not value or "/" in value or value.startswith("."):
        raise ValueError("must be a non-empty name without '/' (it becomes a directory name)")
    return value


class Section(BaseModel):
    # extra="forbid" is what turns a misspelled key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelSection(Section):
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


class DataSection(Section):
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
    label_groups: list[list[str | int]] | None = Field(
        None,
        description="Task sequence_classification, task-incremental scoring (set by `continual.label_space: "
        "per_stage`): a partition of `labels`; each example's loss and prediction are over the labels of its own "
        "label's group only (the other logits masked out). Unset: over all labels.",
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


class TrainingSection(Section):
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
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each transformer layer's input during the forward pass and recompute the layer in "
        "backward: much less activation memory for ~1/3 more compute; the same losses. "
        "`distributed.strategy: auto` turns it on when the model would not fit otherwise.",
    )
    on_nonfinite_loss: Literal["error", "skip"] = Field(
        "error",
        description="A NaN/inf loss: stop with an error naming the step, or skip that update and count it "
        "(skip: DDP only; DeepSpeed has already reduced the gradients by then).",
    )


class EvaluationSection(Section):
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


class DistributedSection(Section):
    strategy: Literal[STRATEGIES] = Field(
        "auto",
        description="auto: `launcher run`/`launcher slurm` pick the cheapest strategy whose estimated memory fits each "
        "rank (ddp, zero1, zero2, zero3, zero3 + gradient checkpointing, zero3_offload + checkpointing; see "
        "--memory-per-rank), unless the accelerate config names DeepSpeed, which is then followed; a rank started by "
        "hand (accelerate launch/torchrun) with auto runs DDP. Or ddp, DeepSpeed zero0/zero1/zero2/zero3/zero3_offload, "
        "or PyTorch FSDP2: fsdp (weights, gradients and optimizer state sharded) or fsdp_grad_op (gradients and "
        "optimizer state sharded; weights stay whole from forward to backward).",
    )
    timeout_minutes: float = Field(
        30, gt=0, description="Process-group timeout: how long a collective may wait for a missing rank."
    )


METHODS = ("full", "lora", "prompt_tuning", "prefix_tuning", "ia3", "adapter", "bitfit")


class FinetuneSection(Section):
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


class CheckpointSection(Section):
    every_steps: int | None = Field(None, gt=0, description="Write a checkpoint every N optimizer steps.")
    every_epoch: bool = Field(False, description="Write a checkpoint at the end of each epoch.")
    keep_last: int = Field(2, ge=1, description="Keep the newest N step checkpoints (the best weights are kept separately).")
    resume: str = Field(
        "auto",
        description="auto: continue from the newest complete checkpoint in the run directory if there is one; "
        "never: start fresh (refused if the directory holds a run, unless output.overwrite); or a checkpoint path.",
    )


TRACKERS = ("tensorboard", "mlflow", "wandb")
# Keys the launcher sets itself so that a resumed run continues the same tracker run.
_TRACKER_MANAGED_KEYS = {"tensorboard": {"logging_dir", "log_dir", "purge_step"},
                         "mlflow": {"run_id", "experiment_name", "logging_dir", "run_name"},
                         "wandb": {"id", "resume", "dir", "project", "name"}}


class TrackingSection(Section):
    """Experiment trackers (accelerate's): what every run reports besides metrics.jsonl."""

    report_to: list[Literal[TRACKERS]] = Field(
        ["tensorboard"],
        description="Trackers that receive every scalar of metrics.jsonl (loss, lr, grad norm, throughput, tokens, "
        "evaluation metrics, memory), from rank 0: tensorboard (offline, under <dir>/tensorboard), mlflow "
        "(`pip install mlflow`), wandb (`pip install wandb`). [] for none.",
    )
    project: str | None = Field(
        None, description="Project: the MLflow experiment, the W&B project, the TensorBoard sub-directory "
        "(default: the recipe name)."
    )
    run_name: str | None = Field(None, description="Run name shown by MLflow and W&B (default: the recipe name).")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store, e.g. http://host:5000 (default: $MLFLOW_TRACKING_URI, "
        "else sqlite:///<dir>/mlflow.db)."
    )
    options: dict[Literal[TRACKERS], dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra keyword arguments per tracker, handed to accelerate's tracker: e.g. "
        "{tensorboard: {flush_secs: 30}, mlflow: {tags: {team: nlp}}, wandb: {entity: my-team, mode: offline}}. "
        "The run identity (ids, directories, resume) is the launcher's to set.",
    )

    @model_validator(mode="after")
    def _options_fit(self) -> "TrackingSection":
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to names a tracker twice: {self.report_to}")
        for tracker, kwargs in self.options.items():
            managed = sorted(_TRACKER_MANAGED_KEYS[tracker] & set(kwargs))
            if managed:
                raise ValueError(
                    f"options.{tracker}.{managed[0]}: set by the launcher (a resumed run must continue the same "
                    f"tracker run); remove it" + ("; use tracking.project / tracking.run_name" if managed[0] in
                                                    ("experiment_name", "project", "name", "run_name") else "")
                )
        return self


class OutputSection(Section):
    dir: str = Field("runs/{name}", description="Run directory. `{name}` is replaced by the recipe name.")
    overwrite: bool = Field(False, description="Allow reusing a directory that already holds a run.")
    save_predictions: bool = Field(True, description="Write per-example test predictions (predictions/test.jsonl).")
    export_model: bool = Field(True, description="Export model + tokenizer (safetensors) to <dir>/model.")
    # report, model card upload: see launcher/report.py and launcher/model_card.py
    report: bool = Field(
        True, description="At the end of `launcher train`, write <dir>/report/index.html (plots, metrics, recipe, "
        "plan, versions; also `launcher report <dir>`)."
    )
    push_to_hub: bool = Field(
        False, description="After the local export, upload model/ (with its model card) and metrics.json to the "
        "Hugging Face Hub repository output.hub_repo_id (needs network and a token)."
    )
    hub_repo_id: str | None = Field(None, description="Hub repository for push_to_hub, e.g. `my-org/my-model`.")
    hub_private: bool = Field(True, description="Create the Hub repository as private (push_to_hub).")

    @model_validator(mode="after")
    def _hub_repo_named(self) -> "OutputSection":
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs output.hub_repo_id (e.g. my-org/my-model)")
        if self.push_to_hub and not self.export_model:
            raise ValueError("push_to_hub uploads the exported model; it needs output.export_model=true")
        return self


class ReplaySettings(Section):
    buffer_size: int = Field(gt=0, description="Examples kept from earlier stages' training splits (an equal share "
                             "per earlier stage, chosen by `seed`).")
    ratio: float = Field(0.2, gt=0, lt=1, description="Share of each later stage's training set drawn from the "
                         "buffer (so, in expectation, of each global batch): 0.2 = one replayed example in five.")
    seed: int = Field(0, description="Seed of the buffer's choice: the buffer is a pure function of the seed and the data.")


class ContinualEwcSettings(Section):
    weight: float = Field(gt=0, description="The penalty weight lambda in lambda/2 * sum F (theta - theta*)^2.")
    fisher_samples: int = Field(200, gt=0, description="Training examples of the previous stage the diagonal "
                                "Fisher is averaged over (a seeded choice; all of them if fewer).")


class EwcSection(Section):
    """Elastic weight consolidation for one run: written by a continual run for its stages after the first;
    usable by hand with a file from `launcher fisher`."""

    fisher: str = Field(description="A file written by `launcher fisher`: the diagonal Fisher F and the anchor "
                        "weights theta* (the model it was computed on), per parameter.")
    weight: float = Field(gt=0, description="lambda: the loss gets lambda/2 * sum F (theta - theta*)^2.")


class ContinualStage(Section):
    name: str = Field(description="Stage name; its run is <output.dir>/stages/<index>-<name>.")
    data: dict[str, Any] = Field(description="This stage's `data:` keys over the recipe's own `data:` (train is "
                                 "required; test or test_size is needed for the forgetting matrix).")
    training: dict[str, Any] = Field(default_factory=dict, description="This stage's `training:` keys, e.g. `{epochs: 1}`.")

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        return path_segment(value)

    @model_validator(mode="after")
    def _keys_known(self) -> "ContinualStage":
        for section, fields in (("data", DataSection.model_fields), ("training", TrainingSection.model_fields)):
            for key in getattr(self, section):
                if key not in fields:
                    raise ValueError(f"{section}.{key}: unknown key{_did_you_mean(key, fields)}")
        if "train" not in self.data:
            raise ValueError(f"stage {self.name!r} has no data.train; each stage trains on its own data")
        return self


class ContinualSection(Section):
    """A sequence of stages trained one after another, one model carried through. One head over the union of
    the stages' label sets in stage order, fixed before the first stage (sized for all); `label_space` says
    whether an example is scored among all of them or among its own stage's."""

    stages: list[ContinualStage] = Field(min_length=2, description="The stages, in training order.")
    strategy: Literal["naive", "replay", "ewc"] = Field(
        "naive", description="naive: plain sequential fine-tuning (the baseline); replay: rehearse a buffer of "
        "earlier stages' training examples (`replay:`); ewc: elastic weight consolidation (`ewc:`)."
    )
    replay: ReplaySettings | None = Field(None, description="Replay buffer settings (strategy replay).")
    ewc: ContinualEwcSettings | None = Field(None, description="EWC settings (strategy ewc): the penalty pulls each "
                                             "stage towards the previous stage's weights, by their Fisher information.")
    metric: str = Field("accuracy", description="The metric of the forgetting matrix.")
    label_space: Literal["shared", "per_stage"] = Field(
        "shared", description="shared (class-incremental): every example is trained and predicted among all the "
        "stages' labels; per_stage (task-incremental): among its own stage's labels only (the one head's other "
        "logits masked out, so each stage has its own head sharing one output layer). Stages' label sets must then "
        "be equal or disjoint."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "ContinualSection":
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"stage name {repeated[0]!r} is used twice; give each stage its own name")
        if self.strategy == "replay" and self.replay is None:
            raise ValueError("strategy replay needs continual.replay (at least buffer_size)")
        if self.strategy != "replay" and self.replay is not None:
            raise ValueError(f"continual.replay is set but strategy is {self.strategy}; remove replay: or set strategy: replay")
        if self.strategy == "ewc" and self.ewc is None:
            raise ValueError("strategy ewc needs continual.ewc (at least weight)")
        if self.strategy != "ewc" and self.ewc is not None:
            raise ValueError(f"continual.ewc is set but strategy is {self.strategy}; remove ewc: or set strategy: ewc")
        return self


# --------------------------------------------------------------------------------------------
# What the registered tasks offer. Filled by launcher/tasks/__init__.py (tasks import this module,
# never the other way round).


@dataclass(frozen=True)
class TaskSpec:
    """What the schema needs to know of a task to validate a recipe that names it."""

    name: str
    metric_keys: dict[str, list[str]]  # evaluation.metrics entry -> the scalar keys it produces
    default_metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class SettingsSection:
    """A task's own recipe section (e.g. ``sft:``), declared in the task's module."""

    key: str
    schema: type[Section]
    description: str


_TASKS: dict[str, TaskSpec] = {}
_SECTIONS: dict[str, SettingsSection] = {}
_SCHEMAS: dict[tuple, type["Recipe"]] = {}


def register_task(spec: TaskSpec) -> None:
    _TASKS[spec.name] = spec


def register_section(section: SettingsSection) -> None:
    known = _SECTIONS.get(section.key)
    if known is not None and known.schema is not section.schema:
        raise ValueError(f"recipe section {section.key!r} is declared twice ({known.schema.__name__}, {section.schema.__name__})")
    _SECTIONS[section.key] = section


def registered_tasks() -> dict[str, TaskSpec]:
    return dict(_TASKS)


def _did_you_mean(word: str, options) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class Recipe(Section):
    """The core of a recipe. The class that validates a whole recipe is ``recipe_schema()``: this one plus
    every registered task section; both are read the same way (``recipe.sft`` etc. exist on the latter)."""

    name: str = Field(description="Run name; used in the default output directory.")
    task: str = Field("sequence_classification", description="Task module to run (see launcher/tasks).")
    model: ModelSection
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: OutputSection = Field(default_factory=OutputSection)
    continual: ContinualSection | None = Field(
        None, description="Continual learning: train `stages` one after another (`launcher run`; see docs/continual.md)."
    )
    ewc: EwcSection | None = Field(None, description="An EWC penalty for this run (set by continual runs; see docs/continual.md).")

    _source: Path | None = PrivateAttr(None)  # the recipe file, for paths relative to it

    @model_validator(mode="before")
    @classmethod
    def _first_stage_data(cls, data):
        # A continual recipe's own data: holds what every stage shares; read alone, it is its first stage's recipe.
        continual = data.get("continual") if isinstance(data, dict) else None
        stages = continual.get("stages") if isinstance(continual, dict) else None
        if isinstance(stages, list) and stages and isinstance(stages[0], dict) and isinstance(stages[0].get("data"), dict):
            own = data.get("data")
            data = {**data, "data": {**(own if isinstance(own, dict) else {}), **stages[0]["data"]}}
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in _TASKS:
            raise ValueError(f"unknown task {value!r}{_did_you_mean(value, _TASKS)}; known: {', '.join(_TASKS)}")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_path_segment(cls, value: str) -> str:
        return path_segment(value)

    @model_validator(mode="after")
    def _checkpointing_keeps_the_prefix(self) -> "Recipe":
        if self.training.gradient_checkpointing and self.finetune.method == "prefix_tuning":
            raise ValueError(
                "training.gradient_checkpointing does not work with finetune.method=prefix_tuning: the learned prefix "
                "is handed to the model as a key/value cache, which checkpointed layers drop; use lora or adapter, "
                "or turn gradient_checkpointing off"
            )
        return self

    @model_validator(mode="after")
    def _metrics_known(self) -> "Recipe":
        task = _TASKS[self.task]
        if self.evaluation.metrics is None:
            self.evaluation.metrics = list(task.default_metrics)
        check_metric_names(self.evaluation.metrics, self.evaluation.best_metric, task.metric_keys)
        return self

    def output_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name))


def recipe_schema() -> type[Recipe]:
    """The Recipe with every registered task section (``sft:``, ``generation:``, ...) as an optional field."""
    if not _TASKS:
        raise RuntimeError("no tasks are registered; import launcher (its __init__ registers launcher.tasks)")
    key = tuple(sorted((k, id(s.schema)) for k, s in _SECTIONS.items()))
    schema = _SCHEMAS.get(key)
    if schema is None:
        fields: dict[str, Any] = {
            section.key: (section.schema | None, Field(None, description=section.description))
            for section in sorted(_SECTIONS.values(), key=lambda s: s.key)
        }
        schema = create_model("Recipe", __base__=Recipe, __module__=__name__, **fields)
        _SCHEMAS[key] = schema
    return schema
