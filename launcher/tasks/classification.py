"""Sequence classification: one text (or a text pair) -> one label.

Labels may be ints or strings. The label set is ``data.labels`` when given, else the sorted
distinct labels of the training split; the mapping is stored in the model config as
id2label/label2id, so the exported model (and a transformers pipeline) speaks label names.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..metrics import CLASSIFICATION_KEYS, compute_classification_metrics
from ..model_io import load_pretrained_model
from .base import CUT_COLUMN, Batch, Record, Task, load_pretrained_config, pad_columns, truncated_flags


def label_key(value) -> str:
    """A label's name. Ints and strings share one namespace: CSV readers turn "1" into 1, YAML keeps "1" a string."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


_label_key = label_key


class SequenceClassificationTask(Task):
    name = "sequence_classification"
    registered = True
    auto_model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    head_modules = ("classifier", "score")
    metric_keys = CLASSIFICATION_KEYS
    default_metrics = ("accuracy", "precision", "recall", "f1")
    pipeline_task = "text-classification"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.label_names: list[str] = []
        self.label_to_id: dict[str, int] = {}
        self.label_mask: torch.Tensor | None = None  # data.label_groups, see _group_mask

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        data = self.recipe.data
        columns = {"data.text_column": data.text_column, "data.label_column": data.label_column}
        if data.text_pair_column:
            columns["data.text_pair_column"] = data.text_pair_column
        return columns

    def fit(self, train) -> None:
        data = self.recipe.data
        if data.labels is not None:
            names = [_label_key(v) for v in data.labels]
            if len(set(names)) != len(names):
                raise DataError(f"data.labels: repeated label in {data.labels}")
        else:
            values = [v for v in set(train[data.label_column]) if v is not None]
            if all(isinstance(v, (int, np.integer)) for v in values):
                values = sorted(values)
            else:
                values = sorted(values, key=_label_key)
            names = [_label_key(v) for v in values]
        if len(names) < 2 and data.labels is not None:
            raise DataError(f"data.labels: lists {len(names)} label(s) {names}; classification needs at least 2")
        if len(names) < 2:
            raise DataError(
                f"data.label_column {data.label_column!r}: found {len(names)} distinct label(s) {names} in the "
                f"training split; classification needs at least 2"
            )
        self._set_labels(names)

    def _set_labels(self, names: list[str]) -> None:
        self.label_names = names
        self.label_to_id = {name: i for i, name in enumerate(names)}
        self.label_mask = self._group_mask()

    def _group_mask(self) -> torch.Tensor | None:
        """data.label_groups as a [labels, labels] bool matrix: row y = the labels an example labelled y is
        scored among (its group's). None without groups: every example among all labels."""
        groups = self.recipe.data.label_groups
        if groups is None:
            return None
        mask = torch.zeros(len(self.label_names), len(self.label_names), dtype=torch.bool)
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for value in group:
                name = _label_key(value)
                if name not in self.label_to_id:
                    raise DataError(f"data.label_groups: label {value!r} is not among the labels {self.label_names}")
                if name in group_of:
                    raise DataError(f"data.label_groups: label {value!r} is in groups {group_of[name]} and {index}; "
                                    f"the groups must not overlap")
                group_of[name] = index
        missing = [name for name in self.label_names if name not in group_of]
        if missing:
            raise DataError(f"data.label_groups: labels {missing} are in no group; each label needs one")
        for name, index in group_of.items():
            members = [self.label_to_id[_label_key(v)] for v in groups[index]]
            mask[self.label_to_id[name], members] = True
        return mask

    def scored_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logits an example is scored on: with data.label_groups, those outside its label's group are -inf
        (no probability, no gradient); without, all of them."""
        if self.label_mask is None:
            return logits
        allowed = self.label_mask.to(logits.device)[labels]
        return logits.masked_fill(~allowed, float("-inf"))

    def clean_split(self, split: str, dataset, source: str):
        data = self.recipe.data
        labels = dataset[data.label_column]
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        keep, dropped = [], 0
        for position, (value, row) in enumerate(zip(labels, rows)):
            key = None if value is None else _label_key(value)
            if key in self.label_to_id:
                keep.append(position)
            elif data.drop_other_labels:
                dropped += 1
            elif value is None:
                raise DataError(f"{source} row {row + 1}: the label ({data.label_column}) is empty; fill it or drop the row")
            else:
                where = "in data.labels" if data.labels is not None else "among the training labels"
                raise DataError(
                    f"{source} row {row + 1}: label {value!r} is not {where} {self.label_names}; fix the row, "
                    f"list it in data.labels, or set data.drop_other_labels=true"
                )
        for column_key in ("text_column", "text_pair_column"):
            column = getattr(data, column_key)
            if column is None:
                continue
            texts = dataset[column]
            for position in keep:
                if not isinstance(texts[position], str):
                    raise DataError(
                        f"{source} row {rows[position] + 1}: data.{column_key} {column!r} is "
                        f"{'empty' if texts[position] is None else type(texts[position]).__name__}, expected text"
                    )
        if dropped:
            dataset = dataset.select(keep)
        return dataset, dropped

    def fitted_state(self) -> dict:
        return {"label_names": self.label_names}

    def restore_fitted(self, state: dict) -> None:
        self._set_labels(list(state["label_names"]))

    def encoder(self, tokenizer):
        data = self.recipe.data
        label_to_id = self.label_to_id

        def encode(rows, indices):
            pairs = rows[data.text_pair_column] if data.text_pair_column else None
            features = tokenizer(rows[data.text_column], pairs, truncation=True, max_length=data.max_length)
            features[CUT_COLUMN] = truncated_flags(features, data.max_length)
            features["labels"] = [label_to_id[_label_key(v)] for v in rows[data.label_column]]
            features["example_id"] = list(indices)
            return features

        return encode

    # ---- model --------------------------------------------------------------------------
    def model_config_kwargs(self) -> dict:
        return {
            "num_labels": len(self.label_names),
            "id2label": dict(enumerate(self.label_names)),
            "label2id": dict(self.label_to_id),
            "problem_type": "single_label_classification",
        }

    def build_model(self, tokenizer):
        location, config = load_pretrained_config(self.recipe, **self.model_config_kwargs())
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id  # needed to find the last token in GPT-style heads
        return load_pretrained_model(self.auto_model_class, location, self.recipe, config=config)

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        batch: Batch = pad_columns(rows, pads, self.pad_to_multiple_of)
        batch["labels"] = torch.tensor(rows["labels"], dtype=torch.long)
        batch["example_id"] = torch.tensor(rows["example_id"], dtype=torch.long)
        return batch

    def model_inputs(self, batch: Batch) -> dict:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["labels"].numel(), dtype=torch.float64)

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.scored_logits(outputs.logits.float(), batch["labels"]), batch["labels"], reduction="sum")

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        lines = super().describe_batch(batch, tokenizer)
        return [f"label {self.label_names[y]!r} <- {line}" for y, line in zip(batch["labels"].tolist(), lines)]

    # ---- evaluation ---------------------------------------------------------------------
    def records(self, outputs, batch: Batch) -> list[Record]:
        logits = self.scored_logits(outputs.logits.float(), batch["labels"])
        losses = F.cross_entropy(logits, batch["labels"], reduction="none")
        probabilities = logits.softmax(-1)
        return [
            {"id": int(i), "label": int(y), "prediction": int(p), "loss": float(loss), "probabilities": probs}
            for i, y, p, loss, probs in zip(
                batch["example_id"].tolist(),
                batch["labels"].tolist(),
                logits.argmax(-1).tolist(),
                losses.tolist(),
                probabilities.tolist(),
            )
        ]

    def compute_metrics(self, records: list[Record]) -> dict:
        predictions = [r["prediction"] for r in records]
        references = [r["label"] for r in records]
        results = compute_classification_metrics(self.recipe.evaluation.metrics, predictions, references, self.label_names)
        results["loss"] = float(np.mean([r["loss"] for r in records])) if records else float("nan")
        results["num_examples"] = len(records)
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        data = self.recipe.data
        texts = raw_split[data.text_column]
        pairs = raw_split[data.text_pair_column] if data.text_pair_column else None
        rows = []
        for r in records:
            row = {"id": r["id"], "text": texts[r["id"]]}
            if pairs is not None:
                row["text_pair"] = pairs[r["id"]]
            row["label"] = self.label_names[r["label"]]
            row["prediction"] = self.label_names[r["prediction"]]
            row["probabilities"] = {name: round(p, 6) for name, p in zip(self.label_names, r["probabilities"])}
            rows.append(row)
        return rows
