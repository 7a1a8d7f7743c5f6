"""Token classification (named-entity recognition): a sentence given as words -> one tag per word.

Data: each row holds a list of words (``data.text_column``) and a list of exactly as many tags
(``data.label_column``). Left at the schema defaults ``text``/``label``, those two keys mean the
columns ``tokens``/``tags`` here (the usual names in NER datasets; a column literally named ``text``
or ``label`` has to be renamed). Tags are strings (``B-PER``, ``I-PER``, ``O``; any scheme
``metrics.entity_scores`` chunks: IOB1, BIO, IOBES) or ints that index ``data.labels``.

Label set: ``data.labels`` (tag names in id order), else the sorted distinct tags of the training
split with ``O`` first. A tag outside it in any split is an error naming the split, row and tag
(``data.drop_other_labels`` drops such rows instead, counted). The mapping is stored in the model
config as id2label/label2id.

Features: the words are tokenized with ``is_split_into_words=True`` (a fast tokenizer's word_ids);
only the **first sub-token of each word** is supervised, with the word's tag; further sub-tokens,
special tokens and padding get -100. Inputs are truncated to ``data.max_length``: the words that lose
all their sub-tokens are counted per example and predicted ``O`` in evaluation, so the metrics still
score every word of every example, and ``truncated_examples``/``truncated_words`` say how many were
cut (``untokenized_words`` likewise counts words the tokenizer turns into nothing, e.g. ``""``). In
training, cut words are simply not supervised.

Loss: summed cross-entropy over the supervised tokens; targets = supervised tokens, so the engine's
normalization over the whole optimizer step weighs every word the same, however the global batch is
split over micro-batches and ranks.

Metrics, on the gathered records (word level): entity precision/recall/F1 (micro; macro and
weighted averages) and per type from ``metrics.entity_scores`` (seqeval's default mode), word
accuracy (``accuracy``: correct tags / words), eval loss (mean over supervised tokens).

Reused from sequence classification: the label bookkeeping (label_names/label_to_id and the
fitted state cached with the data), building the model from ``auto_model_class`` with
``model_config_kwargs``, and which batch columns the model takes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError, RecipeError
from ..metrics import entity_scores, hub_metric
from ..schema import DataSection
from .base import Batch, Record, pad_columns
from .classification import SequenceClassificationTask

OUTSIDE = "O"  # the tag of words outside any entity, and the prediction for words the model never saw
NER_METRIC_KEYS = {
    "accuracy": ["accuracy"],
    "precision": ["precision", "precision_macro", "precision_weighted"],
    "recall": ["recall", "recall_macro", "recall_weighted"],
    "f1": ["f1", "f1_macro", "f1_weighted"],
}
# The schema-wide defaults of data.text_column / data.label_column, and what they mean for this task.
_COLUMN_DEFAULTS = {
    "text_column": (DataSection.model_fields["text_column"].default, "tokens"),
    "label_column": (DataSection.model_fields["label_column"].default, "tags"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    return f"a {type(value).__name__}"


class TokenClassificationTask(SequenceClassificationTask):
    name = "token_classification"
    registered = True
    auto_model_class = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    head_modules = ("classifier",)
    metric_keys = NER_METRIC_KEYS
    default_metrics = ("precision", "recall", "f1", "accuracy")
    pipeline_task = "token-classification"

    # ---- columns ------------------------------------------------------------------------
    def _column(self, key: str) -> str:
        value = getattr(self.recipe.data, key)
        schema_default, task_default = _COLUMN_DEFAULTS[key]
        return task_default if value == schema_default else value

    @property
    def words_column(self) -> str:
        return self._column("text_column")

    @property
    def tags_column(self) -> str:
        return self._column("label_column")

    def required_columns(self, split: str) -> dict[str, str]:
        if self.recipe.data.text_pair_column:
            raise RecipeError(
                f"data.text_pair_column: {self.name} tags one sequence of words per row; unset text_pair_column"
            )
        return {"data.text_column": self.words_column, "data.label_column": self.tags_column}

    # ---- label set ----------------------------------------------------------------------
    def fit(self, train) -> None:
        data = self.recipe.data
        if data.labels is not None:
            names = list(data.labels)
            bad = [name for name in names if not isinstance(name, str) or not name]
            if bad:
                raise DataError(f"data.labels: {self.name} needs tag names such as [O, B-PER, I-PER], got {bad[0]!r}")
            if len(set(names)) != len(names):
                raise DataError(f"data.labels: repeated tag in {names}")
            where = "data.labels lists"
        else:
            seen: set[str] = set()
            for tags in train[self.tags_column]:
                for tag in tags if isinstance(tags, list) else ():
                    if _is_int(tag):
                        raise DataError(
                            f"data.label_column {self.tags_column!r}: the training tags are integers; give their "
                            f"names in data.labels, in id order (e.g. [O, B-PER, I-PER])"
                        )
                    if isinstance(tag, str) and tag:
                        seen.add(tag)
            names = sorted(seen)
            if OUTSIDE in seen:
                names = [OUTSIDE] + [name for name in names if name != OUTSIDE]
            where = f"data.label_column {self.tags_column!r}: the training split has"
        if len(names) < 2:
            raise DataError(f"{where} {len(names)} distinct tag(s) {names}; {self.name} needs at least 2")
        self.label_names = names
        self.label_to_id = {name: i for i, name in enumerate(names)}

    def _tag_id(self, tag) -> int | None:
        """The id of a tag (a name in the label set, or an int indexing it); None if it has none."""
        if _is_int(tag):
            return tag if 0 <= tag < len(self.label_names) else None
        return self.label_to_id.get(tag) if isinstance(tag, str) else None

    def clean_split(self, split: str, dataset, source: str):
        data = self.recipe.data
        words_column, tags_column = self.words_column, self.tags_column
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        keep, dropped = [], 0
        for position, (words, tags, row) in enumerate(zip(dataset[words_column], dataset[tags_column], rows)):
            where = f"{source} row {row + 1}"
            if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
                found = _shown(words) if not isinstance(words, list) else "a list holding a non-string"
                raise DataError(f"{where}: data.text_column {words_column!r} must be a list of words (strings), got {found}")
            if not words:
                raise DataError(f"{where}: data.text_column {words_column!r} is an empty list of words; remove the row")
            if not isinstance(tags, list):
                raise DataError(f"{where}: data.label_column {tags_column!r} must be a list of tags, got {_shown(tags)}")
            if len(tags) != len(words):
                raise DataError(
                    f"{where}: {len(words)} words ({words_column}) but {len(tags)} tags ({tags_column}); every word "
                    f"needs exactly one tag"
                )
            bad = next(((i, tag) for i, tag in enumerate(tags) if self._tag_id(tag) is None), None)
            if bad is None:
                keep.append(position)
                continue
            if data.drop_other_labels:
                dropped += 1
                continue
            index, tag = bad
            word = f"word {index + 1} {words[index]!r}"
            if tag is None or tag == "":
                raise DataError(f"{where}: the tag of {word} is empty; every word needs a tag ({OUTSIDE} outside entities)")
            if _is_int(tag):
                raise DataError(
                    f"{where}: tag {tag} of {word} is not an index into data.labels (0..{len(self.label_names) - 1}); "
                    f"fix the row, or set data.drop_other_labels=true"
                )
            known = "in data.labels" if data.labels is not None else "among the training tags"
            raise DataError(
                f"{where}: tag {tag!r} of {word} is not {known} {self.label_names}; fix the row, list it in "
                f"data.labels, or set data.drop_other_labels=true"
            )
        if dropped:
            dataset = dataset.select(keep)
        return dataset, dropped

    # ---- features -----------------------------------------------------------------------
    def encoder(self, tokenizer):
        _check_word_tokenizer(tokenizer, self.recipe)
        words_column, tags_column = self.words_column, self.tags_column
        max_length = self.recipe.data.max_length
        tag_id = self._tag_id

        def encode(rows, indices):
            words = rows[words_column]
            features = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            # Untruncated, only to tell words cut off by max_length from words that yield no token at all.
            whole = tokenizer(words, is_split_into_words=True, add_special_tokens=False, verbose=False)
            labels, word_index, word_labels, cut_words, empty_words = [], [], [], [], []
            for i, tags in enumerate(rows[tags_column]):
                ids = [tag_id(tag) for tag in tags]
                positions = features.word_ids(i)
                row_labels, row_index = [-100] * len(positions), [-1] * len(positions)
                previous = None
                for position, word in enumerate(positions):
                    if word is not None and word != previous:  # the first sub-token of a word
                        row_labels[position], row_index[position] = ids[word], word
                    previous = word
                kept = {w for w in positions if w is not None}
                present = {w for w in whole.word_ids(i) if w is not None}
                labels.append(row_labels)
                word_index.append(row_index)
                word_labels.append(ids)
                cut_words.append(len(present - kept))
                empty_words.append(len(tags) - len(present))
            features["labels"] = labels
            features["word_index"] = word_index  # the word a supervised position stands for, else -1
            features["word_labels"] = word_labels  # every word's gold tag id (cut words too)
            features["cut_words"] = cut_words
            features["empty_words"] = empty_words
            features["example_id"] = list(indices)
            return features

        return encode

    # ---- model --------------------------------------------------------------------------
    def model_config_kwargs(self) -> dict:
        kwargs = super().model_config_kwargs()  # the tag set as num_labels / id2label / label2id
        del kwargs["problem_type"]  # a sequence-level setting; the token head has its own loss
        return kwargs

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100,
                "word_index": -1}
        batch: Batch = pad_columns(rows, pads, self.pad_to_multiple_of)
        batch["example_id"] = torch.tensor(rows["example_id"], dtype=torch.long)
        for key in ("word_labels", "cut_words", "empty_words"):  # host-side, for the records
            batch[key] = rows[key]
        return batch

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != -100).sum().to(torch.float64)

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        logits = outputs.logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        lines = []
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist()):
            length = int(sum(mask))
            tokens = tokenizer.convert_ids_to_tokens(ids[:length])
            shown = [f"{token}/{self.label_names[y]}" if y >= 0 else token for token, y in zip(tokens, labels)]
            lines.append(f"[{length} tokens] " + " ".join(shown))
        return lines

    # ---- evaluation ---------------------------------------------------------------------
    def records(self, outputs, batch: Batch) -> list[Record]:
        logits = outputs.logits.float()
        labels = batch["labels"]
        token_losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        losses = token_losses.sum(1).tolist()
        targets = (labels != -100).sum(1).tolist()
        predicted = logits.argmax(-1).tolist()
        positions = batch["word_index"].tolist()
        records = []
        for b, example in enumerate(batch["example_id"].tolist()):
            gold = list(batch["word_labels"][b])
            prediction = [-1] * len(gold)  # -1: the model saw no token of this word (predicted O)
            for position, word in enumerate(positions[b]):
                if word >= 0:
                    prediction[word] = predicted[b][position]
            records.append({"id": int(example), "gold": gold, "prediction": prediction, "loss": losses[b],
                            "targets": int(targets[b]), "cut_words": int(batch["cut_words"][b]),
                            "empty_words": int(batch["empty_words"][b])})
        return records

    def _tags(self, ids: list[int]) -> list[str]:
        return [self.label_names[i] if i >= 0 else OUTSIDE for i in ids]

    def compute_metrics(self, records: list[Record]) -> dict:
        references = [self._tags(r["gold"]) for r in records]
        predictions = [self._tags(r["prediction"]) for r in records]
        scores = entity_scores(references, predictions)
        results: dict = {}
        for name in self.recipe.evaluation.metrics or self.default_metrics:
            if name.startswith("evaluate:"):  # e.g. evaluate:seqeval takes the tag sequences as they are
                results.update(hub_metric(name.split(":", 1)[1])(predictions, references, self.label_names))
            else:
                results.update({key: scores[key] for key in NER_METRIC_KEYS[name]})
        results["support"] = scores["support"]
        results["per_type"] = scores["per_type"]
        targets = sum(r["targets"] for r in records)
        results["loss"] = sum(r["loss"] for r in records) / targets if targets else float("nan")
        results["num_examples"] = len(records)
        results["num_words"] = sum(len(r["gold"]) for r in records)
        results["truncated_examples"] = sum(1 for r in records if r["cut_words"])
        results["truncated_words"] = sum(r["cut_words"] for r in records)
        results["untokenized_words"] = sum(r["empty_words"] for r in records)
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        words = raw_split[self.words_column]
        return [
            {"id": r["id"], "words": words[r["id"]], "tags": self._tags(r["gold"]),
             "predicted_tags": self._tags(r["prediction"]), "truncated_words": r["cut_words"]}
            for r in records
        ]


def _check_word_tokenizer(tokenizer, recipe) -> None:
    """Word-aligned labels need a fast tokenizer that accepts pre-split words."""
    key = "model.tokenizer" if recipe.model.tokenizer else "model.name_or_path"
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{key}: {TokenClassificationTask.name} needs a fast (Rust) tokenizer to align tags with sub-tokens "
            f"(word_ids); this one is {type(tokenizer).__name__}"
        )
    try:
        tokenizer([["probe"]], is_split_into_words=True)
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{key}: the tokenizer cannot encode pre-split words ({first}); byte-level BPE tokenizers (GPT-2, "
            f"RoBERTa) need add_prefix_space=True in their tokenizer_config.json"
        ) from None
