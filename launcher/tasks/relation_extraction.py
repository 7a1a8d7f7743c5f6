"""Relation extraction: a sentence with two marked entities -> the relation between them.

Entity-marker classification (Baldini Soares et al. 2019, "Matching the Blanks"): markers are
inserted around the head and tail entities (defaults ``[E1] ... [/E1]`` and ``[E2] ... [/E2]``,
``relation.head_markers``/``tail_markers``) and the marked sentence is classified like any text.
The markers are added to the tokenizer as special tokens (never split, not lower-cased), the
model's input embeddings are resized to the grown vocabulary (new rows: transformers' mean
resizing, seeded), and the exported tokenizer carries them.

**The classifier reads the pooled [CLS] output** (``AutoModelForSequenceClassification``), not the
marker start tokens (the paper's best variant, "entity start"): the model stays a stock transformers
class, so the export reloads with ``AutoModelForSequenceClassification.from_pretrained`` and its own
tokenizer (give it marked text, e.g. ``prediction_rows``' ``marked_text``), and PEFT methods treat
it like any sequence classifier. Self-attention lets [CLS] read the markers; an entity-start head
would need a custom model class to train and to reload.

Fine-tuning methods: full and bitfit export every weight. Under peft methods (lora, ia3,
prompt_tuning) the marker embeddings stay at their initial values, and peft saves the resized
embedding matrix with the adapter (``launcher.finetune.load_exported`` resizes the base to the
tokenizer before loading it). adapter and prefix_tuning export only their own weights, so with new
markers they are refused (markers the tokenizer already has work with every method).

Data: the sentence (``data.text_column``), the relation label (``data.label_column``), and the head
and tail entity spans as character offsets, end exclusive (columns ``relation.head_start_column``
... ``tail_end_column``, default ``head_start``/``head_end``/``tail_start``/``tail_end``). A span
that is empty, outside the text, or overlaps the other one is an error naming the row. A marker is
inserted with one space between it and the entity (``... [E1] Marie Curie [/E1] ...``).

Inputs are truncated to ``data.max_length``; an example that loses one of its markers that way is
still classified, and counted in the metrics as ``truncated_examples``.

Everything else is sequence classification's (labels, loss: one target per example, records, the
exact gather): this task subclasses it and changes the text the tokenizer sees. Metrics:
``metrics.relation_f1`` micro precision/recall/F1 without ``relation.no_relation_label``
(TACRED convention) and their macro averages, per relation, plus accuracy, the confusion matrix and
eval loss.
"""

from __future__ import annotations

import torch

from pydantic import Field, model_validator

from ..errors import DataError, RecipeError
from ..finetune import OWN_METHODS
from ..metrics import accuracy, classification_report, hub_metric, relation_f1
from ..schema import Section
from .base import Batch, Record, load_pretrained_config
from .classification import SequenceClassificationTask

RELATION_METRIC_KEYS = {
    "accuracy": ["accuracy"],
    "precision": ["precision", "precision_macro"],
    "recall": ["recall", "recall_macro"],
    "f1": ["f1", "f1_macro"],
}
_ROLES = ("head", "tail")


def mark_entities(text: str, head: tuple[int, int], tail: tuple[int, int], head_markers, tail_markers) -> str:
    """``text`` with the markers around the two (disjoint) character spans."""
    spans = sorted([(head, head_markers), (tail, tail_markers)])
    pieces, at = [], 0
    for (start, end), (opening, closing) in spans:
        pieces += [text[at:start], opening, " ", text[start:end], " ", closing]
        at = end
    pieces.append(text[at:])
    return "".join(pieces)


def _offset(value) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class RelationSection(Section):
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


class RelationExtractionTask(SequenceClassificationTask):
    settings_key = "relation"
    settings_schema = RelationSection
    settings_description = (
        "Relation extraction settings (task: relation_extraction): entity span columns, the no-relation label, entity markers."
    )
    name = "relation_extraction"
    registered = True
    metric_keys = RELATION_METRIC_KEYS
    default_metrics = ("precision", "recall", "f1", "accuracy")

    def __init__(self, recipe):
        super().__init__(recipe)
        self.settings: RelationSection = self.section()

    @property
    def markers(self) -> list[str]:
        return [*self.settings.head_markers, *self.settings.tail_markers]

    def _span_columns(self) -> dict[str, str]:
        """recipe key -> column, for head start/end and tail start/end."""
        return {f"relation.{role}_{edge}_column": getattr(self.settings, f"{role}_{edge}_column")
                for role in _ROLES for edge in ("start", "end")}

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        if self.recipe.data.text_pair_column:
            raise RecipeError(
                f"data.text_pair_column: {self.name} reads one sentence (data.text_column) with entity spans; "
                f"unset text_pair_column"
            )
        return {**super().required_columns(split), **self._span_columns()}

    def fit(self, train) -> None:
        super().fit(train)
        negative = self.settings.no_relation_label
        if negative is not None and negative not in self.label_to_id:
            raise DataError(
                f"relation.no_relation_label: {negative!r} is not one of the labels {self.label_names}; set it to the "
                f"label that means 'no relation' (e.g. Other), or to null if every label is a relation"
            )

    def cache_inputs(self) -> dict:
        return {"relation": self.settings.model_dump(mode="json")}

    def clean_split(self, split: str, dataset, source: str):
        dataset, dropped = super().clean_split(split, dataset, source)  # labels and texts
        columns = self._span_columns()
        values = {key: dataset[column] for key, column in columns.items()}
        texts = dataset[self.recipe.data.text_column]
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        for position, (text, row) in enumerate(zip(texts, rows)):
            where = f"{source} row {row + 1}"
            spans = {}
            for role in _ROLES:
                offsets = []
                for edge in ("start", "end"):
                    key = f"relation.{role}_{edge}_column"
                    value = values[key][position]
                    offset = _offset(value)
                    if offset is None:
                        found = "empty" if value is None else f"{value!r}"
                        raise DataError(f"{where}: {key} {columns[key]!r} is {found}; expected a character offset (an integer)")
                    offsets.append(offset)
                start, end = offsets
                if start < 0 or end > len(text):
                    raise DataError(
                        f"{where}: the {role} span [{start}, {end}) is outside the text ({len(text)} characters); "
                        f"spans are character offsets, end exclusive"
                    )
                if start >= end:
                    raise DataError(
                        f"{where}: the {role} span [{start}, {end}) is {'empty' if start == end else 'reversed'}; "
                        f"the end offset is exclusive: text[start:end] is the entity"
                    )
                spans[role] = (start, end)
            (head_start, head_end), (tail_start, tail_end) = spans["head"], spans["tail"]
            if head_start < tail_end and tail_start < head_end:
                raise DataError(
                    f"{where}: the head span [{head_start}, {head_end}) {text[head_start:head_end]!r} and the tail span "
                    f"[{tail_start}, {tail_end}) {text[tail_start:tail_end]!r} overlap; they must be disjoint"
                )
        return dataset, dropped

    def marked_texts(self, rows) -> list[str]:
        columns = list(self._span_columns().values())
        settings = self.settings
        return [
            mark_entities(text, (int(hs), int(he)), (int(ts), int(te)), settings.head_markers, settings.tail_markers)
            for text, hs, he, ts, te in zip(rows[self.recipe.data.text_column], *(rows[c] for c in columns))
        ]

    def add_markers(self, tokenizer) -> list[int]:
        """Register the markers as the tokenizer's extra special tokens - never split, not normalized,
        saved with it - and return their ids. Idempotent; a marker already in the vocabulary keeps its id."""
        tokenizer.add_special_tokens({"extra_special_tokens": self.markers}, replace_extra_special_tokens=False)
        return tokenizer.convert_tokens_to_ids(self.markers)

    def encoder(self, tokenizer):
        marker_ids = self.add_markers(tokenizer)
        text_column = self.recipe.data.text_column
        encode_text = super().encoder(tokenizer)

        def encode(rows, indices):
            features = encode_text({**rows, text_column: self.marked_texts(rows)}, indices)
            features["truncated"] = [not all(m in ids for m in marker_ids) for ids in features["input_ids"]]
            return features

        return encode

    # ---- model --------------------------------------------------------------------------
    def build_model(self, tokenizer):
        self.add_markers(tokenizer)  # features read from the cache never ran the encoder
        model = super().build_model(tokenizer)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            method = self.recipe.finetune.method
            if method in OWN_METHODS:
                raise RecipeError(
                    f"finetune.method={method}: {self.name} adds the entity markers {self.markers} to the vocabulary, "
                    f"and this method exports only its own weights, not the new marker embeddings; use lora, ia3, "
                    f"prompt_tuning, bitfit or full, or markers the tokenizer already has (relation.head_markers/"
                    f"tail_markers)"
                )
            model.resize_token_embeddings(len(tokenizer))
        return model

    def count_parameters(self) -> int:
        _, config = load_pretrained_config(self.recipe)
        width = next((getattr(config, key) for key in ("embedding_size", "hidden_size", "n_embd", "d_model")
                      if getattr(config, key, None)), 0)
        return super().count_parameters() + len(self.markers) * width  # the marker embeddings (at most)

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        batch = super().collate(rows, tokenizer)
        batch["truncated"] = torch.tensor(rows["truncated"], dtype=torch.bool)
        return batch

    # ---- evaluation ---------------------------------------------------------------------
    def records(self, outputs, batch: Batch) -> list[Record]:
        records = super().records(outputs, batch)
        for record, truncated in zip(records, batch["truncated"].tolist()):
            record["truncated"] = truncated
        return records

    def compute_metrics(self, records: list[Record]) -> dict:
        names = self.label_names
        predictions = [r["prediction"] for r in records]
        references = [r["label"] for r in records]
        scores = relation_f1([names[i] for i in references], [names[i] for i in predictions],
                             no_relation=self.settings.no_relation_label)
        results: dict = {}
        for name in self.recipe.evaluation.metrics or self.default_metrics:
            if name.startswith("evaluate:"):
                results.update(hub_metric(name.split(":", 1)[1])(predictions, references, names))
            elif name == "accuracy":
                results.update(accuracy(predictions, references, names))
            else:
                results.update({key: scores[key] for key in RELATION_METRIC_KEYS[name]})
        results["support"] = scores["support"]
        results["per_relation"] = scores["per_relation"]
        results["confusion_matrix"] = classification_report(predictions, references, names)["confusion_matrix"]
        results["loss"] = sum(r["loss"] for r in records) / len(records) if records else float("nan")
        results["num_examples"] = len(records)
        results["truncated_examples"] = sum(1 for r in records if r["truncated"])
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        rows = super().prediction_rows(records, raw_split)  # id, text, label, prediction, probabilities
        raw = raw_split.select([r["id"] for r in records])[:]  # the records' raw rows, as columns
        spans = zip(*(raw[column] for column in self._span_columns().values()))
        out = []
        for row, record, marked, (hs, he, ts, te) in zip(rows, records, self.marked_texts(raw), spans):
            text = row["text"]
            out.append({"id": row["id"], "text": text, "head": text[int(hs):int(he)], "tail": text[int(ts):int(te)],
                        "marked_text": marked, "label": row["label"], "prediction": row["prediction"],
                        "probabilities": row["probabilities"], "truncated": record["truncated"]})
        return out
