"""Sequence to sequence: a source text -> a target text (summarization, translation), with an
encoder-decoder model (T5, BART, mT5, Marian, ... : ``AutoModelForSeq2SeqLM``).

Data: ``data.text_column`` is the source (``generation.source_prefix`` is put before it, truncated to
``data.max_length`` tokens), ``data.label_column`` the target (truncated to
``generation.max_target_length`` tokens for the loss). Training minimizes the summed token
cross-entropy over the target tokens (teacher forcing); the number of targets is the number of target
tokens, so the engine's normalization makes the loss a per-token mean over the whole optimizer step.

Evaluation generates (greedy, or beam search with ``generation.num_beams``) at most
``generation.max_new_tokens`` tokens per example and scores the decoded text against the full
reference text of the data (not its truncated tokens): ``rouge`` -> rouge1/rouge2/rougeL/rougeLsum
(fractions 0..1, as ``rouge_score``; rougeLsum over sentences split at . ! ? and newlines) and
``bleu`` -> bleu (0..100, as ``sacrebleu``); also ``gen_len`` (mean generated tokens, up to and
including the end-of-sequence token) and ``loss`` (teacher-forced token cross-entropy per target
token). Under DeepSpeed ZeRO-3 every generation step is a collective, so generation runs with
``synced_gpus``: a rank whose batch finished keeps stepping (without output) until every rank's has.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, ModelError
from ..model_io import load_pretrained_model
from ..text_metrics import bleu_score, rouge_scores
from .base import CUT_COLUMN, Batch, Record, Task, load_pretrained_config, pad_columns, truncated_flags

ROUGE_KEYS = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
SEQ2SEQ_KEYS = {"rouge": ROUGE_KEYS, "bleu": ["bleu"]}
IGNORE_INDEX = -100  # label positions that are padding (torch cross-entropy's default ignore_index)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, for rougeLsum (which scores a union LCS over ``\\n``-separated sentences):
    a break after ``.``, ``!`` or ``?`` followed by whitespace, and at existing newlines."""
    return "\n".join(s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip())


def generation_settings(recipe):
    """The recipe's ``generation`` section, or its defaults when the recipe has none."""
    from ..recipe import GenerationSection

    return recipe.generation if recipe.generation is not None else GenerationSection()


class Seq2SeqTask(Task):
    name = "seq2seq"
    registered = True
    auto_model_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    head_modules = ("lm_head",)
    metric_keys = SEQ2SEQ_KEYS
    default_metrics = ("rouge", "bleu")  # evaluation.metrics when the recipe names none

    def __init__(self, recipe):
        super().__init__(recipe)
        self.generation = generation_settings(recipe)
        self._tokenizer = None  # the tokenizer batches are collated with; predict_batch decodes with it

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        data = self.recipe.data
        return {"data.text_column": data.text_column, "data.label_column": data.label_column}

    def cache_inputs(self) -> dict:
        return {"source_prefix": self.generation.source_prefix, "max_target_length": self.generation.max_target_length}

    def clean_split(self, split: str, dataset, source: str):
        data = self.recipe.data
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        for column_key, what in (("text_column", "source"), ("label_column", "target")):
            column = getattr(data, column_key)
            for value, row in zip(dataset[column], rows):
                if not isinstance(value, str) or not value.strip():
                    found = "empty" if value is None or isinstance(value, str) else f"a {type(value).__name__} ({value!r})"
                    raise DataError(
                        f"{source} row {row + 1}: the {what} text (data.{column_key} {column!r}) is {found}; "
                        f"every row needs a non-empty {what} text: fill or drop the row"
                    )
        return dataset, 0

    def length_limits(self) -> str:
        return (f"data.max_length={self.recipe.data.max_length} (source) or generation.max_target_length="
                f"{self.generation.max_target_length} (target)")

    def encoder(self, tokenizer):
        data, generation = self.recipe.data, self.generation
        prefix = generation.source_prefix

        def encode(rows, indices):
            sources = [prefix + text for text in rows[data.text_column]]
            encoded = tokenizer(sources, truncation=True, max_length=data.max_length)
            targets = tokenizer(text_target=rows[data.label_column], truncation=True,
                                max_length=generation.max_target_length)
            return {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": targets["input_ids"],
                "reference": list(rows[data.label_column]),  # metrics score against the full text
                "example_id": list(indices),
                CUT_COLUMN: [source or target for source, target in zip(
                    truncated_flags(encoded, data.max_length), truncated_flags(targets, generation.max_target_length))],
            }

        return encode

    # ---- model --------------------------------------------------------------------------
    def build_model(self, tokenizer):
        location, config = load_pretrained_config(self.recipe)
        if not getattr(config, "is_encoder_decoder", False):
            raise ModelError(
                f"model.name_or_path: {location} is a {config.model_type} model, not an encoder-decoder; task "
                f"seq2seq needs one (T5, BART, mT5, Marian, Pegasus, ...)"
            )
        if getattr(config, "decoder_start_token_id", None) is None:
            # (config_overrides cannot add it: overrides may only change attributes the config has)
            raise ModelError(
                f"model.name_or_path: the {config.model_type} config in {location} has no decoder_start_token_id, "
                f"which builds the decoder inputs from the targets; add it to its config.json (T5: the pad token "
                f"id, BART: the eos token id)"
            )
        model = load_pretrained_model("AutoModelForSeq2SeqLM", location, self.recipe, config=config)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            key = "model.tokenizer" if self.recipe.model.tokenizer else "model.name_or_path"
            raise ModelError(
                f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {vocab} "
                f"(token ids past {vocab - 1} would index nothing); use the model's own tokenizer"
            )
        return model

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        self._tokenizer = tokenizer
        batch: Batch = pad_columns(rows, {"input_ids": tokenizer.pad_token_id, "attention_mask": 0},
                                   self.pad_to_multiple_of)
        batch["labels"] = pad_columns({"labels": rows["labels"]}, {"labels": IGNORE_INDEX}, self.pad_to_multiple_of)["labels"]
        batch["example_id"] = torch.tensor(rows["example_id"], dtype=torch.long)
        batch["reference"] = list(rows["reference"])
        return batch

    def model_inputs(self, batch: Batch) -> dict:
        # With labels the model builds its decoder inputs itself (labels shifted right after its
        # decoder_start_token_id, -100 read as padding).
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum().to(torch.float64)

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        logits = outputs.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        lines = super().describe_batch(batch, tokenizer)
        targets = [tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in batch["labels"].tolist()]
        return [f"{line} -> target [{sum(1 for t in row if t != IGNORE_INDEX)} tokens] {target!r}"
                for line, target, row in zip(lines, targets, batch["labels"].tolist())]

    # ---- evaluation ---------------------------------------------------------------------
    def predict_batch(self, model, batch: Batch, accelerator) -> list[Record]:
        """Teacher-forced loss, then generation. Every rank calls this the same number of times (the
        engine's eval sharding); under ZeRO-3 both the forward and each generation step gather the
        partitioned weights from all ranks, so generation is synced across ranks."""
        from ..engine.weights import forward_gathers_weights

        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RuntimeError("seq2seq: predict_batch before any batch was collated (no tokenizer to decode with)")
        outputs = model(**self.model_inputs(batch))
        labels = batch["labels"]
        logits = outputs.logits.float()
        token_losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        loss_sums = token_losses.sum(-1).tolist()
        target_tokens = (labels != IGNORE_INDEX).sum(-1).tolist()

        generator = accelerator.unwrap_model(model)
        generated = generator.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.generation.max_new_tokens,
            num_beams=self.generation.num_beams,
            do_sample=False,
            # A rank whose batch finished early must keep stepping with the others: under ZeRO-3 each
            # forward gathers weight shards from every rank (FSDP likewise).
            synced_gpus=forward_gathers_weights(model) and accelerator.num_processes > 1,
        )
        sequences = generated[:, 1:].tolist()  # drop the decoder start token
        eos = _eos_ids(generator, tokenizer)
        lengths = [_generated_length(row, eos) for row in sequences]
        texts = tokenizer.batch_decode([row[:n] for row, n in zip(sequences, lengths)], skip_special_tokens=True)
        return [
            {"id": int(i), "prediction": text.strip(), "reference": reference, "gen_len": n,
             "loss_sum": float(loss), "target_tokens": int(count)}
            for i, text, reference, n, loss, count in zip(
                batch["example_id"].tolist(), texts, batch["reference"], lengths, loss_sums, target_tokens
            )
        ]

    def compute_metrics(self, records: list[Record]) -> dict:
        predictions = [r["prediction"] for r in records]
        references = [r["reference"] for r in records]
        results: dict = {}
        for name in self.recipe.evaluation.metrics or self.default_metrics:
            if name == "rouge":
                # rougeLsum needs one sentence per line; rouge1/2/L ignore line breaks.
                results.update(rouge_scores([split_sentences(p) for p in predictions],
                                            [split_sentences(r) for r in references], rouge_types=ROUGE_KEYS))
            elif name == "bleu":
                bleu = bleu_score(predictions, [[r] for r in references])
                results["bleu"] = bleu["score"]
                results["bleu_details"] = {k: bleu[k] for k in ("precisions", "bp", "ratio", "sys_len", "ref_len")}
            elif name.startswith("evaluate:"):
                from ..metrics import hub_metric

                results.update(hub_metric(name.split(":", 1)[1])(predictions, references, []))
            else:  # the recipe validation (metric_keys) lets nothing else through
                raise ValueError(f"evaluation.metrics: {name!r} is not a seq2seq metric")
        tokens = sum(r["target_tokens"] for r in records)
        results["loss"] = sum(r["loss_sum"] for r in records) / tokens if tokens else float("nan")
        results["gen_len"] = float(np.mean([r["gen_len"] for r in records])) if records else float("nan")
        results["num_examples"] = len(records)
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        sources = raw_split[self.recipe.data.text_column]
        return [
            {"id": r["id"], "source": sources[r["id"]], "reference": r["reference"], "prediction": r["prediction"],
             "gen_len": r["gen_len"], "loss": r["loss_sum"] / r["target_tokens"] if r["target_tokens"] else None}
            for r in records
        ]


def _eos_ids(model, tokenizer) -> set[int]:
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    ids = set(value) if isinstance(value, (list, tuple)) else {value}
    return {int(i) for i in ids if i is not None}


def _generated_length(tokens: list[int], eos: set[int]) -> int:
    """Tokens generated up to and including the first end-of-sequence token (the rest is padding)."""
    for position, token in enumerate(tokens):
        if token in eos:
            return position + 1
    return len(tokens)
