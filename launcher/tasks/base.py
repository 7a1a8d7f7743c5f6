"""The Task interface: what a task knows. It knows nothing about ranks, devices or DeepSpeed.

A task turns raw rows into features, builds its model, collates a batch, computes the training
loss as a *sum* over its supervised targets (the engine normalizes over the whole optimizer step),
turns model outputs into per-example records, and computes metrics from all records at once.
Adding a task = one module implementing this + a recipe + tests; the engine does not change.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from typing import Any, Callable, ClassVar

import torch

from .. import timing
from ..errors import ModelError
from ..model_io import load_error, model_location, probe_hub_config
from ..schema import Recipe, Section

Batch = dict[str, Any]
Record = dict[str, Any]  # one example's evaluation result; must hold "id" (its index in the split)


class Task:
    name: ClassVar[str]
    registered: ClassVar[bool] = False  # True on the concrete task classes recipes may name
    auto_model_class: ClassVar[str]  # the transformers Auto class that builds this task's model
    peft_task_type: ClassVar[str]  # peft.TaskType name for peft-based fine-tuning methods
    head_modules: ClassVar[tuple[str, ...]] = ()  # module names of the task head (trained by PEFT methods too)
    # metric name (evaluation.metrics entry) -> the scalar keys it produces (for best_metric)
    metric_keys: ClassVar[dict[str, list[str]]]
    default_metrics: ClassVar[tuple[str, ...]] = ()  # evaluation.metrics when the recipe names none
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})  # metric keys where smaller wins
    pipeline_task: ClassVar[str | None] = None
    # The task's own recipe section (e.g. `sft:`): its key, its schema and one line for the reference.
    # The recipe schema picks it up from the registry (launcher/tasks/__init__.py); the task reads it
    # with `self.section()`.
    settings_key: ClassVar[str | None] = None
    settings_schema: ClassVar[type[Section] | None] = None
    settings_description: ClassVar[str] = ""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        # What the engine tells the task about where it runs (the task never looks it up itself):
        self.pad_to_multiple_of = 1  # pad batches to a multiple of this (8 on GPUs, 1 on CPUs)
        # generate() gathers sharded weights in every step (ZeRO-3 over several ranks): every rank must
        # keep stepping until all ranks' sequences are done
        self.synced_generation = False
        self.say: Callable[[str], None] = _print  # the engine's one voice (rank 0 only) for data reports

    def section(self):
        """The task's recipe section, or its defaults when the recipe has none."""
        value = getattr(self.recipe, self.settings_key, None) if self.settings_key else None
        return value if value is not None else self.settings_schema()

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        """recipe key -> column name that must exist in ``split``."""
        raise NotImplementedError

    def fit(self, train) -> None:
        """Learn whatever the task needs from the training split (e.g. the label set)."""

    def best_is_greater(self) -> bool:
        """Direction of evaluation.best_metric: the recipe's greater_is_better, else the task's."""
        evaluation = self.recipe.evaluation
        if evaluation.greater_is_better is not None:
            return evaluation.greater_is_better
        return evaluation.best_metric not in self.lower_is_better

    def cache_inputs(self) -> dict:
        """Recipe settings besides data.* that shape the features (part of the data cache key)."""
        return {}

    def fitted_state(self) -> dict:
        """What ``fit`` learned, as JSON (stored with cached data so a later run can skip fitting)."""
        return {}

    def restore_fitted(self, state: dict) -> None:
        """Undo ``fitted_state``."""

    def clean_split(self, split: str, dataset, source: str):
        """Validate one split's rows (raise DataError naming the row) and return it, possibly filtered.
        Returns (dataset, number_of_dropped_rows)."""
        return dataset, 0

    def length_limits(self) -> str:
        """The recipe settings that cut examples (for the truncation report)."""
        return f"data.max_length={self.recipe.data.max_length}"

    def encoder(self, tokenizer):
        """A batched ``datasets.map`` function ``(rows, indices) -> features``. Each feature row
        carries ``example_id``: the index of its raw row in the split."""
        raise NotImplementedError

    # ---- model --------------------------------------------------------------------------
    def build_model(self, tokenizer):
        raise NotImplementedError

    def model_config_kwargs(self) -> dict:
        """Extra config attributes to set when loading (e.g. num_labels / id2label)."""
        return {}

    def model_config(self):
        """The config of the model this task builds (the recipe's overrides applied), without weights."""
        return load_pretrained_config(self.recipe, **self.model_config_kwargs())[1]

    def meta_model(self):
        """The model this task would build, on the meta device: its shape and parameters, no weights."""
        import transformers

        with torch.device("meta"):
            return getattr(transformers, self.auto_model_class).from_config(
                self.model_config(), trust_remote_code=self.recipe.model.trust_remote_code
            )

    def count_parameters(self) -> int:
        """Parameters of the model this task would build, without loading weights (meta device)."""
        return sum(p.numel() for p in self.meta_model().parameters())

    def length_settings(self) -> dict[str, tuple[Section, str]]:
        """Recipe key -> (section, field) of each token length the model is asked to take (checked
        against its position limit)."""
        return {"data.max_length": (self.recipe.data, "max_length")}

    def check_limits(self) -> None:
        """Lengths the model cannot take, found before any work: a model with learned absolute position
        embeddings (BERT: 512) fails with an index error at the first longer batch, mid-training. A length
        the recipe sets is refused; a default is lowered to the limit, with a notice. Called by `launcher
        check`, `launcher run/slurm` and every rank at start (all decide alike)."""
        config = self.model_config()
        limit, source = position_limit(config)
        if limit is None:
            return
        for key, (section, field) in self.length_settings().items():
            length = getattr(section, field)
            if length <= limit:
                continue
            if field in section.model_fields_set:
                raise ModelError(
                    f"{key}={length} is longer than this {config.model_type} model can take ({source} = {limit} "
                    f"positions); set {key} to at most {limit}"
                )
            setattr(section, field, limit)
            self.say(f"note: {key} lowered from its default {length} to {limit}, the most this {config.model_type} "
                     f"model can take ({source})")

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        raise NotImplementedError

    def collate_train(self, rows: dict[str, list], tokenizer) -> Batch:
        """One training micro-batch. The same as ``collate`` unless the task packs its training rows
        (causal_lm_sft with ``sft.packing``); evaluation always uses ``collate``."""
        return self.collate(rows, tokenizer)

    def model_inputs(self, batch: Batch) -> dict:
        raise NotImplementedError

    def count_targets(self, batch: Batch) -> torch.Tensor:
        """Number of supervised targets in the batch (examples, or tokens for token-level tasks)."""
        raise NotImplementedError

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        """Sum (not mean) of the loss over the batch's supervised targets."""
        raise NotImplementedError

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        """One line per example: what the model sees, decoded (for `launcher debug`)."""
        lines = []
        for row, ids in enumerate(batch["input_ids"].tolist()):
            length = int(batch["attention_mask"][row].sum()) if "attention_mask" in batch else len(ids)
            lines.append(f"[{length} tokens] {tokenizer.decode(ids[:length])!r}")
        return lines

    # ---- evaluation ---------------------------------------------------------------------
    def predict_batch(self, model, batch: Batch, tokenizer) -> list[Record]:
        """Per-example records for one evaluation batch; ``model`` is the plain (unwrapped) module. The
        default is one forward pass; tasks that generate override it (every rank calls this the same
        number of times; pass ``synced_gpus=self.synced_generation`` to generate())."""
        return self.records(model(**self.model_inputs(batch)), batch)

    def records(self, outputs, batch: Batch) -> list[Record]:
        raise NotImplementedError

    def compute_metrics(self, records: list[Record]) -> dict:
        raise NotImplementedError

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        raise NotImplementedError


def _print(message: str) -> None:
    # Outside the engine (launcher check/run) a task's reports are side notes: stdout may be a recipe.
    print(message, file=sys.stderr, flush=True)


# Feature column a task may add: True where tokenization cut the example at a length limit. Data
# preparation counts it per split and the run reports the counts (truncation is never silent).
CUT_COLUMN = "cut_at_max_length"


def truncated_flags(encoded, max_length: int) -> list[bool]:
    """Which rows of a ``tokenizer(..., truncation=True, max_length=...)`` call lost tokens."""
    encodings = getattr(encoded, "encodings", None)
    if encodings:  # fast tokenizers keep what truncation cut off
        return [bool(e.overflowing) for e in encodings]
    return [len(ids) >= max_length for ids in encoded["input_ids"]]  # slow ones: rows at the limit


def pad_columns(rows: dict[str, list], pad_values: dict[str, int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Dynamic padding: every listed column to the longest sequence in the batch, rounded up to
    ``multiple``. Columns absent from ``rows`` are skipped."""
    present = [key for key in pad_values if key in rows]
    width = max(len(seq) for seq in rows[present[0]])
    width = -(-width // multiple) * multiple
    return {
        key: torch.tensor([seq + [pad_values[key]] * (width - len(seq)) for seq in rows[key]], dtype=torch.long)
        for key in present
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str().encode()).hexdigest()[:20]
    return _hash({"name": tokenizer.name_or_path, "vocab": len(tokenizer)})


# Models whose position ids start after the padding index (RoBERTa's family): two positions fewer.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "roberta-prelayernorm", "data2vec-text"}


def position_limit(config) -> tuple[int | None, str]:
    """(positions the model can take, where that number comes from), or None for position encodings
    without a fixed table (rotary, relative: T5, Llama, Qwen, ...), which do not fail on longer inputs."""
    if getattr(config, "rope_theta", None) is not None or getattr(config, "rope_parameters", None) or \
            getattr(config, "rope_scaling", None) is not None or getattr(config, "relative_attention_num_buckets", None):
        return None, ""
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None, ""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if config.model_type in _OFFSET_POSITIONS:
                return value - (getattr(config, "pad_token_id", 1) or 1) - 1, f"{key} minus its padding offset"
            return value, key
    return None, ""


def load_pretrained_config(recipe: Recipe, **task_kwargs):
    """AutoConfig with the recipe's overrides; every override key must exist in the config."""
    import difflib

    from transformers import AutoConfig

    location = model_location(recipe)
    probe_hub_config(location, recipe.model.revision)  # an unreachable Hub: one line at once, not after the Hub client's ~23 s of retries
    try:
        config = AutoConfig.from_pretrained(
            location, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
        )
    except OSError as exc:  # not on disk, not in the Hub cache, Hub unreachable
        raise load_error("model.name_or_path", location, exc, "config") from None
    for key, value in recipe.model.config_overrides.items():
        if not hasattr(config, key):
            close = difflib.get_close_matches(key, list(config.to_dict()), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ModelError(
                f"model.config_overrides.{key}: not an attribute of this {config.model_type} config{hint}"
            )
        setattr(config, key, value)
    for key, value in task_kwargs.items():
        setattr(config, key, value)
    _import_architecture(config)
    return location, config


def _import_architecture(config) -> None:
    """Import the model's module now, and count it as library import time (start-up accounting):
    transformers imports it lazily on first use, which takes a second or more for most models."""
    with timing.counted_as_import():
        try:
            from transformers.models.auto.configuration_auto import model_type_to_module_name

            importlib.import_module(f"transformers.models.{model_type_to_module_name(config.model_type)}.modeling_{model_type_to_module_name(config.model_type)}")
        except Exception:  # remote-code or unusual models: they are imported when built
            pass
