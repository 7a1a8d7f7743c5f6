"""Extractive question answering (SQuAD v1.1 / v2.0 style): a question and a context -> the span of
the context that answers it (or, with ``question_answering.allow_unanswerable``, no answer).

Data: the question is ``data.text_column``, the context ``data.text_pair_column``, the answers
``data.label_column`` in SQuAD format ``{"text": [...], "answer_start": [...]}`` (a JSON string in a
CSV cell works too). Training uses the first answer; evaluation scores against all of them.

One raw example becomes one or more **feature rows**: a context longer than ``data.max_length``
is cut into windows of the context that overlap by ``question_answering.doc_stride`` tokens, each
preceded by the question. Every feature row carries

- ``example_id``: the feature's own id, unique in the split: ``example_index * WINDOW_LIMIT + window``
  (what the engine shards, gathers and de-duplicates evaluation records on);
- ``example_index``: its raw example's position in the split, and ``window``: its window number;
- ``start_positions``/``end_positions``: the answer's first/last token in this window, or the CLS
  position when the answer is not (entirely) inside it, or the example has none;
- ``offset_mapping``: per token its ``[start, end)`` character span in the context, ``None`` for the
  question, special and padding tokens; ``window_start``/``window_text``: where the window's context
  text starts and the text itself (so a span maps to its characters without the raw split);
- ``answers``: the gold answer texts (empty: unanswerable); ``cls_index``.

Loss: ``(CE(start) + CE(end)) / 2`` per feature row, summed; one target per feature row. Logits of
padding positions are masked out, so the loss does not depend on how much a batch is padded.

Evaluation: per feature row, the ``n_best`` best valid spans (both ends inside the context, end >=
start, at most ``max_answer_length`` tokens; score = start logit + end logit), as character spans and
text of the context, and the no-answer (CLS) score. ``compute_metrics`` groups the gathered feature
records by example and takes the best span over all of its windows - wherever (on whichever rank)
they were evaluated; with allow_unanswerable it answers nothing when the smallest no-answer score of
the example beats that span by more than ``null_score_diff_threshold`` (as Hugging Face's run_qa).
Metrics: SQuAD exact match and F1 (fractions), via ``metrics.squad_scores`` (v2.0 rules and
HasAns_/NoAns_ breakdowns with allow_unanswerable).
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from pydantic import Field

from ..errors import DataError, ModelError, RecipeError
from ..metrics import squad_scores
from ..model_io import load_pretrained_model
from ..schema import Section
from .base import Batch, Record, Task, load_pretrained_config, pad_columns

WINDOW_LIMIT = 100_000  # windows per example; a feature's id is example_index * WINDOW_LIMIT + window
QA_METRIC_KEYS = {"exact_match": ["exact_match"], "f1": ["f1"]}
_SPLIT_COLUMN = "_qa_split"  # added by clean_split so the encoder can name the split in its errors


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse_answers(value) -> tuple[list[str], list[int]]:
    """SQuAD answers (a mapping, or its JSON text) -> (texts, starts). Raises ValueError saying why not."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is text that is not JSON ({exc.msg})") from None
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ValueError('must be {"text": [...], "answer_start": [...]}')
    texts, starts = value["text"], value["answer_start"]
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)):
        raise ValueError('must hold lists: {"text": [...], "answer_start": [...]}')
    if len(texts) != len(starts):
        raise ValueError(f"has {len(texts)} answer text(s) but {len(starts)} answer_start value(s)")
    for text, start in zip(texts, starts):
        if not isinstance(text, str):
            raise ValueError(f"answer text {text!r} is not text")
        if isinstance(start, float) and start.is_integer():
            start = int(start)
        if not isinstance(start, (int, np.integer)) or isinstance(start, bool):
            raise ValueError(f"answer_start {start!r} is not an integer")
    return list(texts), [int(s) for s in starts]


def answer_problem(context: str, text: str, start: int) -> str | None:
    """Why an answer does not sit at answer_start in its context (None when it does)."""
    if not text.strip():
        return f"answer {text!r} is empty"
    if 0 <= start and context[start:start + len(text)] == text:
        return None
    found = context.find(text)
    where = f"it occurs at {found}" if found >= 0 else "it does not occur in the context"
    return f"answer {_short(text)} is not at answer_start {start} of the context ({where})"


def best_spans(start_logits: torch.Tensor, end_logits: torch.Tensor, context_mask: torch.Tensor,
               max_answer_length: int, n_best: int):
    """The ``n_best`` highest-scoring valid spans of each row: both ends in the context, end >= start,
    at most ``max_answer_length`` tokens; score = start logit + end logit. Exact (every valid span is
    considered), computed on the logits' device. Returns (scores, starts, ends), each ``[rows, k]``
    sorted best first; missing spans have score ``-inf``."""
    rows, length = start_logits.shape
    width = min(max_answer_length, length)
    neg = torch.finfo(start_logits.dtype).min
    start = start_logits.masked_fill(~context_mask, neg)
    end = end_logits.masked_fill(~context_mask, neg)
    # band[r, i, d] = end[r, i + d]: the end logit of the span that starts at i and is d + 1 tokens long
    band = F.pad(end, (0, width - 1), value=neg).unfold(1, width, 1)
    band_mask = F.pad(context_mask, (0, width - 1), value=False).unfold(1, width, 1)
    valid = context_mask[:, :, None] & band_mask
    scores = (start[:, :, None] + band).masked_fill(~valid, float("-inf")).reshape(rows, length * width)
    k = min(n_best, length * width)
    top, flat = scores.topk(k, dim=1)
    starts = torch.div(flat, width, rounding_mode="floor")
    return top, starts, starts + flat % width


def choose_answers(records: list[Record], version_2: bool, null_threshold: float = 0.0) -> dict[int, dict]:
    """Feature records (any order, from any rank) -> per example index: the chosen answer.

    The best candidate span over all windows of the example (ties: lower feature id, then earlier span);
    with ``version_2``, no answer (``""``) when the smallest no-answer score over the windows exceeds
    that span's score by more than ``null_threshold``."""
    by_example: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        by_example[record["example"]].append(record)
    chosen = {}
    for example, features in by_example.items():
        best = None
        for feature in sorted(features, key=lambda r: r["id"]):
            for score, start_char, end_char, text in feature["candidates"]:
                key = (-score, feature["id"], start_char, end_char)
                if best is None or key < best[0]:
                    best = (key, score, start_char, end_char, text)
        null_score = min(f["null_score"] for f in features)
        answer = {"text": "", "score": None, "start": None, "end": None, "null_score": null_score,
                  "answers": features[0]["answers"]}
        if best is not None:
            answer.update(text=best[4], score=best[1], start=best[2], end=best[3])
            if version_2 and null_score - best[1] > null_threshold:
                answer.update(text="", start=None, end=None)
        chosen[example] = answer
    return chosen


class QuestionAnsweringSection(Section):
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


class QuestionAnsweringTask(Task):
    settings_key = "question_answering"
    settings_schema = QuestionAnsweringSection
    settings_description = (
        "Extractive question answering settings (task: question_answering): windows, answer length, unanswerable questions."
    )
    name = "question_answering"
    registered = True
    auto_model_class = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    head_modules = ("qa_outputs",)
    metric_keys = QA_METRIC_KEYS
    default_metrics = ("exact_match", "f1")
    pipeline_task = None  # transformers 5 removed the "question-answering" pipeline

    def __init__(self, recipe):
        super().__init__(recipe)
        self.settings: QuestionAnsweringSection = self.section()
        self._sources: dict[str, str] = {}
        data = recipe.data
        if not data.text_pair_column:
            raise RecipeError(
                "data.text_pair_column: question_answering needs the context column (data.text_column is the "
                "question, data.text_pair_column the context, data.label_column the answers)"
            )
        stride = self.settings.doc_stride
        if stride is not None and stride >= data.max_length:
            raise RecipeError(
                f"question_answering.doc_stride={stride} must be smaller than data.max_length={data.max_length} "
                f"(windows overlap by doc_stride tokens and also hold the question); e.g. data.max_length=384 "
                f"with doc_stride=128"
            )
        hub = [m for m in recipe.evaluation.metrics if m.startswith("evaluate:")]
        if hub:
            raise RecipeError(
                f"evaluation.metrics: {hub[0]} is not available for question_answering; use exact_match and f1 "
                f"(the official SQuAD scoring, computed offline)"
            )

    @property
    def version_2(self) -> bool:
        return self.settings.allow_unanswerable

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        data = self.recipe.data
        return {"data.text_column": data.text_column, "data.text_pair_column": data.text_pair_column,
                "data.label_column": data.label_column}

    def cache_inputs(self) -> dict:
        s = self.settings
        return {"question_answering": {"doc_stride": s.doc_stride, "allow_unanswerable": s.allow_unanswerable,
                                       "drop_bad_answers": s.drop_bad_answers}}

    def clean_split(self, split: str, dataset, source: str):
        data, settings = self.recipe.data, self.settings
        self._sources[split] = source
        questions = dataset[data.text_column]
        contexts = dataset[data.text_pair_column]
        answers = dataset[data.label_column]
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        keep, dropped = [], 0
        for position, (question, context, value, row) in enumerate(zip(questions, contexts, answers, rows)):
            where = f"{source} row {row + 1}"
            for key, column, text in (("text_column", data.text_column, question),
                                      ("text_pair_column", data.text_pair_column, context)):
                if not isinstance(text, str) or (key == "text_pair_column" and not text.strip()):
                    what = "empty" if text is None or isinstance(text, str) else type(text).__name__
                    raise DataError(f"{where}: data.{key} {column!r} is {what}, expected text")
            if value is None:
                raise DataError(
                    f"{where}: the answers ({data.label_column}) are empty; give "
                    f'{{"text": [...], "answer_start": [...]}} (empty lists for an unanswerable question)'
                )
            try:
                texts, starts = parse_answers(value)
            except ValueError as exc:
                raise DataError(f"{where}: the answers ({data.label_column}) {exc}") from None
            if not texts and not settings.allow_unanswerable:
                raise DataError(
                    f"{where}: the question has no answer ({data.label_column}.text is empty); set "
                    f"question_answering.allow_unanswerable=true for SQuAD 2.0-style data, or remove the row"
                )
            problems = [p for p in (answer_problem(context, t, s) for t, s in zip(texts, starts)) if p]
            if problems:
                if settings.drop_bad_answers:
                    dropped += 1
                    continue
                raise DataError(
                    f"{where}: {problems[0]}; fix the row or set question_answering.drop_bad_answers=true"
                )
            keep.append(position)
        if dropped:
            dataset = dataset.select(keep)
        if _SPLIT_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(_SPLIT_COLUMN)
        dataset = dataset.add_column(_SPLIT_COLUMN, [split] * len(dataset))
        return dataset, dropped

    def encoder(self, tokenizer):
        import pyarrow as pa

        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                f"question_answering needs a fast tokenizer (character offsets of tokens); "
                f"{type(tokenizer).__name__} is not one: use a model with a tokenizer.json"
            )
        data, settings = self.recipe.data, self.settings
        max_length, stride = data.max_length, settings.doc_stride
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        cls_id = tokenizer.cls_token_id
        sources = self._sources
        int_list = pa.list_(pa.int64())

        def fail(rows, position, message):
            split = rows[_SPLIT_COLUMN][position] if _SPLIT_COLUMN in rows else None
            source = sources.get(split, f"data.{split}" if split else "data")
            row = rows["_row"][position] + 1 if "_row" in rows else position + 1
            raise DataError(f"{source} row {row}: {message}")

        def encode(rows, indices):
            questions = [q.lstrip() for q in rows[data.text_column]]
            contexts = rows[data.text_pair_column]
            answers = [parse_answers(value) for value in rows[data.label_column]]
            # Each window must hold the question, the special tokens, the overlap and at least one new
            # context token (the tokenizer would stop the process otherwise).
            question_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
            for position, length in enumerate(question_lengths):
                room = max_length - specials - length
                if room < 1 or (stride is not None and room <= stride):
                    need = f"more than question_answering.doc_stride={stride}" if stride is not None else "at least 1"
                    fail(rows, position,
                         f"the question is {length} tokens, which leaves {max(room, 0)} context tokens per window at "
                         f"data.max_length={max_length}; a window needs {need}: raise data.max_length, lower "
                         f"question_answering.doc_stride, or shorten the question")
            encoded = tokenizer(
                questions, contexts, truncation="only_second", max_length=max_length, stride=stride or 0,
                return_overflowing_tokens=True, return_offsets_mapping=True,
            )
            sample_of = encoded.pop("overflow_to_sample_mapping")
            offsets_of = encoded.pop("offset_mapping")
            out = {key: [] for key in ("example_id", "example_index", "window", "start_positions", "end_positions",
                                       "cls_index", "offset_mapping", "window_start", "window_text", "answers")}
            windows: dict[int, int] = defaultdict(int)
            for feature, sample in enumerate(sample_of):
                window = windows[sample]
                windows[sample] += 1
                if stride is None and window == 1:
                    fail(rows, sample,
                         f"question + context do not fit in data.max_length={max_length} tokens; set "
                         f"question_answering.doc_stride (e.g. {max(1, max_length // 4)}) to split long contexts "
                         f"into overlapping windows, or raise data.max_length")
                if window >= WINDOW_LIMIT:
                    fail(rows, sample, f"the context needs more than {WINDOW_LIMIT} windows; raise data.max_length "
                                       f"or question_answering.doc_stride")
                ids = encoded["input_ids"][feature]
                sequence_ids = encoded.sequence_ids(feature)
                offsets = [list(span) if sequence_ids[k] == 1 else None for k, span in enumerate(offsets_of[feature])]
                in_context = [k for k, span in enumerate(offsets) if span is not None]
                cls_index = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
                context = contexts[sample]
                if in_context:
                    first, last = in_context[0], in_context[-1]
                    window_start, window_end = offsets[first][0], offsets[last][1]
                else:
                    first = last = None
                    window_start = window_end = 0
                start_token = end_token = cls_index
                texts, starts = answers[sample]
                if texts and in_context:
                    start_char, end_char = starts[0], starts[0] + len(texts[0])
                    if window_start <= start_char and end_char <= window_end:
                        start_token = first
                        while start_token <= last and offsets[start_token] is not None and offsets[start_token][0] <= start_char:
                            start_token += 1
                        start_token -= 1
                        end_token = last
                        while end_token >= first and offsets[end_token] is not None and offsets[end_token][1] >= end_char:
                            end_token -= 1
                        end_token += 1
                index = indices[sample]
                out["example_id"].append(index * WINDOW_LIMIT + window)
                out["example_index"].append(index)
                out["window"].append(window)
                out["start_positions"].append(start_token)
                out["end_positions"].append(end_token)
                out["cls_index"].append(cls_index)
                out["offset_mapping"].append(offsets)
                out["window_start"].append(window_start)
                out["window_text"].append(context[window_start:window_end])
                out["answers"].append(texts)
            columns = {key: list(values) for key, values in encoded.items()}
            columns.update(out)
            # An explicit schema: a batch where every answer list is empty (or every offset None) would
            # otherwise be typed "null" and clash with the next batch.
            types = {key: int_list for key in encoded}
            types.update(example_id=pa.int64(), example_index=pa.int64(), window=pa.int64(),
                         start_positions=pa.int64(), end_positions=pa.int64(), cls_index=pa.int64(),
                         offset_mapping=pa.list_(int_list), window_start=pa.int64(), window_text=pa.string(),
                         answers=pa.list_(pa.string()))
            schema = pa.schema([(key, types[key]) for key in columns])
            return pa.Table.from_pydict(columns, schema=schema)

        return encode

    # ---- model --------------------------------------------------------------------------
    def model_config_kwargs(self) -> dict:
        return {"num_labels": 2}  # qa_outputs: one start and one end logit per token

    def build_model(self, tokenizer):
        location, config = load_pretrained_config(self.recipe, **self.model_config_kwargs())
        return load_pretrained_model(self.auto_model_class, location, self.recipe, config=config)

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        pads = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
        batch: Batch = pad_columns(rows, pads, self.pad_to_multiple_of)
        size, width = batch["input_ids"].shape
        for key in ("start_positions", "end_positions", "example_id", "example_index", "cls_index"):
            batch[key] = torch.tensor(rows[key], dtype=torch.long)
        context_mask = torch.zeros(size, width, dtype=torch.bool)
        for row, offsets in enumerate(rows["offset_mapping"]):
            context_mask[row, : len(offsets)] = torch.tensor([span is not None for span in offsets], dtype=torch.bool)
        batch["context_mask"] = context_mask
        for key in ("offset_mapping", "window_start", "window_text", "answers"):
            batch[key] = rows[key]
        return batch

    def model_inputs(self, batch: Batch) -> dict:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["start_positions"].numel(), dtype=torch.float64)

    def _masked(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        logits = logits.float()
        mask = batch.get("attention_mask")
        if mask is None:
            return logits
        return logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)

    def _feature_losses(self, outputs, batch: Batch) -> torch.Tensor:
        start = F.cross_entropy(self._masked(outputs.start_logits, batch), batch["start_positions"], reduction="none")
        end = F.cross_entropy(self._masked(outputs.end_logits, batch), batch["end_positions"], reduction="none")
        return (start + end) / 2

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        return self._feature_losses(outputs, batch).sum()

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        lines = super().describe_batch(batch, tokenizer)
        described = []
        for row, line in enumerate(lines):
            start, end = int(batch["start_positions"][row]), int(batch["end_positions"][row])
            if start == int(batch["cls_index"][row]):
                answer = "no answer in this window"
            else:
                answer = f"answer tokens {start}..{end} {tokenizer.decode(batch['input_ids'][row][start:end + 1])!r}"
            example, window = int(batch["example_index"][row]), int(batch["example_id"][row]) % WINDOW_LIMIT
            described.append(f"example {example} window {window}: {answer} <- {line}")
        return described

    # ---- evaluation ---------------------------------------------------------------------
    def records(self, outputs, batch: Batch) -> list[Record]:
        settings = self.settings
        start_logits, end_logits = outputs.start_logits.float(), outputs.end_logits.float()
        losses = self._feature_losses(outputs, batch).tolist()
        cls = batch["cls_index"].to(start_logits.device)
        rows = torch.arange(start_logits.shape[0], device=start_logits.device)
        null_scores = (start_logits[rows, cls] + end_logits[rows, cls]).tolist()
        context_mask = batch["context_mask"].to(start_logits.device)
        scores, starts, ends = (t.tolist() for t in best_spans(
            start_logits, end_logits, context_mask, settings.max_answer_length, settings.n_best))
        records = []
        for row, (feature_id, example) in enumerate(zip(batch["example_id"].tolist(), batch["example_index"].tolist())):
            offsets, base, text = batch["offset_mapping"][row], batch["window_start"][row], batch["window_text"][row]
            candidates = []
            for score, start, end in zip(scores[row], starts[row], ends[row]):
                if score == float("-inf"):
                    break
                start_char, end_char = offsets[start][0], offsets[end][1]
                span = text[start_char - base:end_char - base]
                if span:
                    candidates.append([score, start_char, end_char, span])
            records.append({"id": feature_id, "example": example, "candidates": candidates,
                            "null_score": null_scores[row], "answers": list(batch["answers"][row]),
                            "loss": losses[row]})
        return records

    def compute_metrics(self, records: list[Record]) -> dict:
        chosen = choose_answers(records, self.version_2, self.settings.null_score_diff_threshold)
        predictions = {example: answer["text"] for example, answer in chosen.items()}
        references = {example: answer["answers"] for example, answer in chosen.items()}
        scores = squad_scores(predictions, references, version_2=self.version_2)
        results: dict = {}
        exact = "exact" if self.version_2 else "exact_match"
        wanted = self.recipe.evaluation.metrics
        for name, key in (("exact_match", exact), ("f1", "f1")):
            if name not in wanted:
                continue
            results[name] = scores[key]
            for group in ("HasAns", "NoAns"):
                if f"{group}_{key}" in scores:
                    results[f"{group}_{name}"] = scores[f"{group}_{key}"]
        for group in ("HasAns", "NoAns"):
            if f"{group}_total" in scores:
                results[f"{group}_total"] = scores[f"{group}_total"]
        results["loss"] = float(np.mean([r["loss"] for r in records])) if records else float("nan")
        results["num_examples"] = len(chosen)
        results["num_features"] = len(records)
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        chosen = choose_answers(records, self.version_2, self.settings.null_score_diff_threshold)
        questions = raw_split[self.recipe.data.text_column]
        rows = []
        for example in sorted(chosen):
            answer = chosen[example]
            row = {"id": example, "question": questions[example], "prediction": answer["text"],
                   "answers": answer["answers"], "start": answer["start"],
                   "score": None if answer["score"] is None else round(answer["score"], 6)}
            if self.version_2:
                row["null_score"] = round(answer["null_score"], 6)
            rows.append(row)
        return rows
