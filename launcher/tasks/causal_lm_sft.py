"""Causal-LM supervised fine-tuning on dialogues (``task: causal_lm_sft``).

Each row holds one conversation in ``data.text_column``: a list of ``{"role": "system" | "user" |
"assistant", "content": str}`` (in a JSON/JSONL/parquet file; in a CSV cell, the same list as JSON
text). It is rendered with the tokenizer's chat template and tokenized once; the loss is on the
assistant turns only.

Which tokens are supervised: for every assistant message ``i`` the conversation is rendered twice,
``messages[:i]`` with the generation prompt (everything up to where the reply starts) and
``messages[:i + 1]`` (up to where the reply ends); both must be prefixes of the whole rendering.
The characters in between are the reply as the template writes it (content, then the template's
end-of-turn marker and whatever follows it). Tokens of that span are supervised up to and
including the last special token in it (the end-of-turn token: ``<|im_end|>``, ``<eos>``...), so
the newline a template writes after the marker is not; a template without a special end-of-turn
token has its whole span supervised. Everything else (system, user, role headers) is -100.
Token positions come from the tokenizer's offset mapping of the full rendering, so the input ids are
exactly the tokenization of the conversation.

Length: a conversation longer than ``data.max_length`` tokens is cut there (its end is lost) and
counted; one with no supervised token left (or no assistant turn at all) is dropped and counted.
The counts are logged when the data is prepared, appear in the start event's ``dropped``, and in
every evaluation's metrics (``truncated`` for that split, ``data`` for all splits).

Packing (``sft.packing: true``): each training micro-batch - the same examples the sampler gives it
without packing - becomes one row, its conversations end to end with no padding, and ``position_ids``
restarting at 0 at every conversation. No attention mask is passed, so transformers' mask builder
(masking_utils.find_packed_sequence_indices) reads the restarts and builds a block-diagonal causal
mask for eager and sdpa attention (flash attention takes the same position ids as varlen
boundaries): no token attends to another conversation. The first token of every conversation is
unsupervised, so no target crosses a boundary either. The set of examples per optimizer step, the
targets and their count are exactly those of the unpacked run: the loss and its normalization do
not change, only the padding goes. Evaluation batches stay unpacked (records are per conversation).
Cost: with eager/sdpa attention the mask spans the whole row, so attention work grows with
(micro-batch x length)^2 instead of micro-batch x length^2 (flash attention does only the blocks);
packing pays where the layers' matmuls and the vocabulary projection dominate, as with short
conversations (benchmarks/packing.py, docs/performance.md).
Families verified to honour the restarts (PACKING_MODEL_TYPES) are accepted; any other is refused
before any work, and so are prompt and prefix tuning (their virtual tokens would be shared by every
conversation of the row).

Loss: cross-entropy summed over supervised tokens; ``count_targets`` counts them, so the engine's
normalization makes the update the mean over every supervised token of the global batch, whatever
the micro-batch x accumulation x ranks split and however long each reply is.

Evaluation: per-example records carry the NLL sum and the number of supervised tokens; the metrics
are ``loss`` (mean token NLL over the split) and ``perplexity`` (exp of it). With
``sft.generate_max_new_tokens`` > 0 the last assistant turn of every test conversation is also
generated greedily (all ranks in step: ZeRO-3 generation is synced) and written to the predictions.

GGUF models (``model.gguf_file``): the weights are loaded with transformers' GGUF support
(dequantized to fp32) and the quantization marker is dropped so the model exports with
``save_pretrained``; the tokenizer must be a directory (``model.tokenizer``), written from the GGUF
file by :func:`launcher.model_io.save_gguf_tokenizer` (``python scripts/prepare_dialogue_assets.py --gguf-tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pydantic import Field

from ..errors import DataError, ModelError, RecipeError
from ..metrics import perplexity
from ..model_io import drop_gguf_quantization, gguf_config, load_model_error, load_pretrained_model, load_tokenizer
from ..schema import Section
from .base import Batch, Record, Task, load_pretrained_config, pad_columns

ROLES = ("system", "user", "assistant")
IGNORE = -100
LABEL_VERSION = 1  # part of the data cache key: bump when the supervision rule changes
# Model families whose transformers 5 code builds the causal mask with masking_utils.create_causal_mask
# from position_ids (so restarts become a block-diagonal mask); each is checked packed == unpacked in
# tests/unit/test_sft_packing.py. Add a family here only together with that test.
PACKING_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
PACKING_REFUSED_METHODS = ("prompt_tuning", "prefix_tuning")


# ---------------------------------------------------------------------------------------------
# Conversations -> input ids and labels (pure functions: unit-tested token by token)


def normalize_conversation(value, where: str, column: str, system_prompt: str | None = None) -> list[dict]:
    """Validate one row's conversation and return it as [{"role", "content"}], with the system
    prompt prepended (when given and the conversation has no system message) and trailing
    non-assistant messages removed (nothing after the last reply is supervised). DataError names
    the row and the message."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: data.text_column {column!r} is text that is not JSON ({exc.msg}); each row needs a list "
                f"of {{role, content}} messages"
            ) from None
    if not isinstance(value, (list, tuple)):
        shown = "empty" if value is None else type(value).__name__
        raise DataError(f"{where}: data.text_column {column!r} is {shown}; each row needs a list of {{role, content}} messages")
    messages = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {number} of {column!r} is not a {{role, content}} mapping ({str(message)[:60]!r})")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {number} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            shown = "empty" if content is None else type(content).__name__
            raise DataError(f"{where}: message {number} ({role}) content is {shown}, expected text")
        messages.append({"role": role, "content": content})
    if system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if messages and messages[0]["role"] == "assistant":
        raise DataError(
            f"{where}: the conversation starts with an assistant message, so there is nothing it replies to; "
            f"start it with a user or system message, or set sft.system_prompt"
        )
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens that can close a turn (every special token but unk)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids.discard(tokenizer.unk_token_id)
    return ids


def check_chat_template(tokenizer, recipe) -> None:
    if not getattr(tokenizer, "chat_template", None):
        where = recipe.model.tokenizer or recipe.model.name_or_path
        raise ModelError(
            f"model.tokenizer: the tokenizer from {where} has no chat template, which causal_lm_sft renders "
            f"conversations with; use a chat/instruct model's tokenizer, or point model.tokenizer at a directory "
            f"whose tokenizer_config.json (or chat_template.jinja) has one"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"model.tokenizer: causal_lm_sft needs a fast (tokenizers-backed) tokenizer for token offsets; "
            f"{type(tokenizer).__name__} is not one"
        )


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # the token id where supervised, IGNORE elsewhere; labels[0] is always IGNORE
    truncated: bool  # the rendering was longer than max_length and was cut
    reply_turn: int  # message index of the last assistant turn that starts within max_length (-1: none)
    prompt_length: int  # tokens before that turn's reply (the prompt a generation starts from)

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def encode_conversation(tokenizer, messages: list[dict], max_length: int, where: str = "",
                        end_ids: set[int] | None = None) -> EncodedConversation:
    """Tokenize a normalized conversation and mark its assistant tokens (see the module docstring)."""
    end_ids = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    text = render(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = [IGNORE] * len(ids)
    starts: list[tuple[int, int]] = []  # (message index, first token of its reply)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[:index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ModelError(
                f"model.tokenizer: the chat template does not render {where or 'a conversation'} prefix by prefix "
                f"(turn {index + 1} renders differently inside the whole conversation), so its assistant tokens "
                f"cannot be located; use a template that renders earlier turns unchanged"
            )
        begin, end = len(before), len(through)
        span = [t for t, (s, e) in enumerate(offsets) if e > s and e > begin and s < end]
        if not span:
            continue
        closing = [t for t in span if ids[t] in end_ids]
        last = closing[-1] if closing else span[-1]
        for t in span:
            if t <= last:
                labels[t] = ids[t]
        starts.append((index, span[0]))
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token
    reply_turn, prompt_length = -1, 0
    for index, first in starts:
        if 0 < first < max_length:
            reply_turn, prompt_length = index, first
    return EncodedConversation(ids, labels, truncated, reply_turn, prompt_length)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token, (batch, length - 1), zero where not supervised."""
    targets = labels[:, 1:]
    flat = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return flat.view(targets.shape)


# ---------------------------------------------------------------------------------------------


class SFTSection(Section):
    """Supervised fine-tuning on dialogues (task: causal_lm_sft). Metrics: evaluation.metrics [perplexity]."""

    system_prompt: str | None = Field(
        None, description="A system message put first in every conversation that has none (otherwise the chat "
        "template's own default system prompt, if it has one, applies)."
    )
    generate_max_new_tokens: int = Field(
        0, ge=0, description="Greedily generate up to this many tokens for the last assistant turn of every test "
        "conversation and write them to predictions/test.jsonl next to the reference reply; 0: no generation."
    )
    packing: bool = Field(
        False, description="Padding-free training: each micro-batch's conversations are concatenated into one "
        "row, position ids restarting at 0 per conversation, attention kept inside each conversation. Same "
        "examples per step, same loss (to float rounding), less padding. Model families: gpt2, llama, mistral, "
        "qwen2, qwen3; not with finetune.method prompt_tuning / prefix_tuning. Evaluation is not packed."
    )


class CausalLMSFTTask(Task):
    settings_key = "sft"
    settings_schema = SFTSection
    settings_description = (
        "Dialogue fine-tuning settings (task: causal_lm_sft): system prompt, test-set generations."
    )
    name = "causal_lm_sft"
    lower_is_better = frozenset({"loss", "perplexity"})
    registered = True
    auto_model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    # With tied input/output embeddings (GPT-2, SmolLM2, ...) the shared matrix is named after the
    # input embedding, so "lm_head" matches nothing and BitFit/adapter/prefix tuning leave the
    # embedding frozen; only an untied lm_head is trained with them. LoRA/IA3 train peft's weights only.
    head_modules = ("lm_head",)
    metric_keys = {"perplexity": ["perplexity"]}
    default_metrics = ("perplexity",)  # evaluation.metrics when the recipe names none
    pipeline_task = "text-generation"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.sft: SFTSection = self.section()
        self.report: dict[str, dict] = {}  # split -> conversation counts (kept, truncated, dropped)
        self.tokenizer = None
        evaluation = recipe.evaluation
        hub = [name for name in evaluation.metrics or () if name.startswith("evaluate:")]
        if hub:
            raise RecipeError(
                f"evaluation.metrics: {hub[0]} is not available for causal_lm_sft (it scores classifications); "
                f"use evaluation.metrics: [perplexity]"
            )
        if evaluation.best_metric == "perplexity" and evaluation.greater_is_better:
            raise RecipeError(
                "evaluation.best_metric=perplexity with greater_is_better=true would keep the worst model; "
                "drop greater_is_better (lower perplexity wins by default)"
            )
        if self.sft.packing and recipe.finetune.method in PACKING_REFUSED_METHODS:
            raise RecipeError(
                f"sft.packing: finetune.method={recipe.finetune.method} adds virtual tokens once per row, which "
                f"every packed conversation would share; set sft.packing=false or use another method (lora, full)"
            )
        if recipe.model.gguf_file and recipe.model.tokenizer is None:
            raise ModelError(
                f"model.tokenizer: a GGUF model (model.gguf_file={recipe.model.gguf_file}) needs its tokenizer as a "
                f"directory; write it with `python scripts/prepare_dialogue_assets.py --gguf-tokenizer DIR "
                f"--model {recipe.model.name_or_path} --gguf-file {recipe.model.gguf_file}` and set model.tokenizer=DIR"
            )

    # ---- data ---------------------------------------------------------------------------
    def required_columns(self, split: str) -> dict[str, str]:
        return {"data.text_column": self.recipe.data.text_column}

    def cache_inputs(self) -> dict:
        # The chat template decides the features but is not part of the tokenizer fingerprint (the
        # backend tokenizer): a changed template must not reuse features rendered with the old one.
        template = self._own_tokenizer().chat_template
        return {"sft_system_prompt": self.sft.system_prompt, "label_version": LABEL_VERSION,
                "chat_template": hashlib.sha256(str(template).encode()).hexdigest()[:20]}

    def fitted_state(self) -> dict:
        return {"report": self.report}

    def restore_fitted(self, state: dict) -> None:
        report = dict(state.get("report", {}))
        if report != self.report:  # features from an earlier run's cache: say what that preparation found
            for split, counts in report.items():
                self._log_report(split, counts)
        self.report = report

    def _own_tokenizer(self):
        """The run's tokenizer, for validating splits before the engine hands one over."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.recipe)
        check_chat_template(self.tokenizer, self.recipe)
        return self.tokenizer

    def clean_split(self, split: str, dataset, source: str):
        data = self.recipe.data
        tokenizer = self._own_tokenizer()
        end_ids = end_of_turn_ids(tokenizer)
        rows = dataset["_row"] if "_row" in dataset.column_names else range(len(dataset))
        keep: list[int] = []
        truncated = no_assistant = cut_off = 0
        for position, (value, row) in enumerate(zip(dataset[data.text_column], rows)):
            where = f"{source} row {row + 1}"
            messages = normalize_conversation(value, where, data.text_column, self.sft.system_prompt)
            if not messages:
                no_assistant += 1
                continue
            encoded = encode_conversation(tokenizer, messages, data.max_length, where, end_ids)
            if encoded.supervised == 0:
                cut_off += 1
                continue
            truncated += encoded.truncated
            keep.append(position)
        if len(keep) != len(dataset):
            dataset = dataset.select(keep)
        # Generations are for the test predictions; the flag is the same for a whole split, so every
        # rank makes the same decision for every evaluation batch (generation is a collective under ZeRO-3).
        dataset = dataset.add_column("_sft_generate", [split == "test"] * len(dataset))
        counts = {"conversations": len(keep), "truncated": truncated, "dropped_no_assistant_turn": no_assistant,
                  "dropped_truncated_away": cut_off}
        self.report[split] = counts
        self._log_report(split, counts, source)
        return dataset, no_assistant + cut_off

    def _log_report(self, split: str, counts: dict, source: str | None = None) -> None:
        max_length = self.recipe.data.max_length
        self.say(
            f"{source or 'data.' + split}: {counts['conversations']} conversations; {counts['truncated']} longer than "
            f"data.max_length={max_length} were truncated; dropped {counts['dropped_truncated_away']} with no "
            f"assistant turn within max_length and {counts['dropped_no_assistant_turn']} with no assistant turn"
        )

    def encoder(self, tokenizer):
        check_chat_template(tokenizer, self.recipe)
        data, system_prompt = self.recipe.data, self.sft.system_prompt
        end_ids = end_of_turn_ids(tokenizer)

        def encode(rows, indices):
            features = {key: [] for key in ("input_ids", "attention_mask", "labels", "example_id", "truncated",
                                            "prompt_length", "reply_turn", "generate")}
            generate = rows.get("_sft_generate") or [False] * len(indices)
            row_numbers = rows.get("_row") or list(indices)
            for value, index, row, flag in zip(rows[data.text_column], indices, row_numbers, generate):
                where = f"data row {row + 1}"
                messages = normalize_conversation(value, where, data.text_column, system_prompt)
                encoded = encode_conversation(tokenizer, messages, data.max_length, where, end_ids)
                features["input_ids"].append(encoded.input_ids)
                features["attention_mask"].append([1] * len(encoded.input_ids))
                features["labels"].append(encoded.labels)
                features["example_id"].append(index)
                features["truncated"].append(int(encoded.truncated))
                features["prompt_length"].append(encoded.prompt_length)
                features["reply_turn"].append(encoded.reply_turn)
                features["generate"].append(int(bool(flag)))
            return features

        return encode

    def check_limits(self) -> None:
        super().check_limits()
        if not self.sft.packing:
            return
        model_type = getattr(self.model_config(), "model_type", None)
        if model_type not in PACKING_MODEL_TYPES:
            raise ModelError(
                f"sft.packing: {model_type} models are not verified to keep packed conversations apart (position "
                f"ids restarting per conversation); set sft.packing=false (packing works for "
                f"{', '.join(PACKING_MODEL_TYPES)})"
            )

    # ---- model --------------------------------------------------------------------------
    def model_config(self):
        if not self.recipe.model.gguf_file:
            return super().model_config()
        return gguf_config(self.recipe)[2]

    def build_model(self, tokenizer):
        from transformers import AutoModelForCausalLM

        recipe = self.recipe
        check_chat_template(tokenizer, recipe)
        if recipe.model.gguf_file:
            location, name, config = gguf_config(recipe)
            try:
                model = AutoModelForCausalLM.from_pretrained(location, gguf_file=name, config=config)
            except (OSError, ValueError) as exc:
                raise load_model_error(exc, f"{location}/{name}") from None
            drop_gguf_quantization(model)
        else:
            location, config = load_pretrained_config(recipe)
            model = load_pretrained_model("AutoModelForCausalLM", location, recipe, config=config)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ModelError(
                f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}; "
                f"use the model's own tokenizer"
            )
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model

    # ---- batches ------------------------------------------------------------------------
    def collate(self, rows: dict[str, list], tokenizer) -> Batch:
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        batch: Batch = pad_columns(rows, pads, self.pad_to_multiple_of)
        for key in ("example_id", "truncated", "prompt_length", "reply_turn", "generate"):
            batch[key] = torch.tensor(rows[key], dtype=torch.long)
        return batch

    def collate_train(self, rows: dict[str, list], tokenizer) -> Batch:
        if not self.sft.packing:
            return self.collate(rows, tokenizer)
        return pack_rows(rows)

    def model_inputs(self, batch: Batch) -> dict:
        if "position_ids" in batch:
            # No attention mask and no cache: that is what makes transformers derive the block-diagonal
            # mask from the position-id restarts (masking_utils._preprocess_mask_arguments).
            return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def count_targets(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"][:, 1:] != IGNORE).sum().to(torch.float64).cpu()

    def loss_sum(self, outputs, batch: Batch) -> torch.Tensor:
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE
        logits = outputs.logits[:, :-1][supervised]
        return F.cross_entropy(logits.float(), targets[supervised], reduction="sum")

    def describe_batch(self, batch: Batch, tokenizer) -> list[str]:
        """Each conversation decoded, the supervised tokens inside [[ ]]."""
        lines = []
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist()):
            length = sum(mask)
            pieces, run, run_supervised = [], [], None
            for token, label in zip(ids[:length], labels[:length]):
                supervised = label != IGNORE
                if run and supervised != run_supervised:
                    pieces.append(_show(tokenizer, run, run_supervised))
                    run = []
                run.append(token)
                run_supervised = supervised
            if run:
                pieces.append(_show(tokenizer, run, run_supervised))
            targets = sum(1 for label in labels[1:length] if label != IGNORE)
            lines.append(f"[{length} tokens, {targets} supervised] {''.join(pieces)!r}")
        return lines

    # ---- evaluation ---------------------------------------------------------------------
    def predict_batch(self, model, batch: Batch, tokenizer) -> list[Record]:
        records = self.records(model(**self.model_inputs(batch)), batch)
        # The generate flag is the same for every row of a split (see clean_split): every rank takes
        # the same branch for every batch.
        if self.sft.generate_max_new_tokens and bool(batch["generate"].any()):
            for record, text in zip(records, self._generate(model, batch, tokenizer)):
                record["generated"] = text
        return records

    def records(self, outputs, batch: Batch) -> list[Record]:
        losses = token_losses(outputs.logits, batch["labels"])
        counts = (batch["labels"][:, 1:] != IGNORE).sum(-1)
        return [
            {"id": int(i), "nll": float(nll), "tokens": int(n), "truncated": bool(t), "reply_turn": int(turn)}
            for i, nll, n, t, turn in zip(batch["example_id"].tolist(), losses.sum(-1).tolist(), counts.tolist(),
                                          batch["truncated"].tolist(), batch["reply_turn"].tolist())
        ]

    def _generate(self, model, batch: Batch, tokenizer) -> list[str]:
        lengths = batch["prompt_length"].tolist()
        width = max(lengths)
        ids = batch["input_ids"].new_full((len(lengths), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, length in enumerate(lengths):  # left padding: every prompt ends where generation starts
            ids[row, width - length:] = batch["input_ids"][row, :length]
            mask[row, width - length:] = 1
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos += [configured] if isinstance(configured, int) else list(configured or [])
        options = {}
        if self.recipe.finetune.method == "prefix_tuning":
            # The prefix hook hands the model a fresh cache holding only the prefix on every call, so
            # generation must not rely on its own cache.
            options["use_cache"] = False
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=self.sft.generate_max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(set(eos)) or None,
            synced_gpus=self.synced_generation, **options,
        )
        return [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]

    def compute_metrics(self, records: list[Record]) -> dict:
        nll = math.fsum(r["nll"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        results: dict = {"loss": nll / tokens if tokens else float("nan")}
        if "perplexity" in (self.recipe.evaluation.metrics or self.default_metrics):
            results["perplexity"] = perplexity(nll, tokens)
        results.update({"num_examples": len(records), "num_tokens": tokens,
                        "truncated": sum(1 for r in records if r["truncated"]), "data": self.report})
        generated = sum(1 for r in records if r.get("generated") is not None)
        if generated:
            results["generated"] = generated
        return results

    def prediction_rows(self, records: list[Record], raw_split) -> list[dict]:
        data = self.recipe.data
        conversations = raw_split[data.text_column]
        rows = []
        for r in records:
            messages = normalize_conversation(conversations[r["id"]], f"row {r['id']}", data.text_column,
                                              self.sft.system_prompt)
            turn = r["reply_turn"]
            rows.append({
                "id": r["id"],
                "prompt": messages[:turn] if turn >= 0 else messages,
                "reference": messages[turn]["content"] if turn >= 0 else None,
                "generated": r.get("generated"),
                "loss": r["nll"] / r["tokens"] if r["tokens"] else None,
                "tokens": r["tokens"],
                "truncated": r["truncated"],
            })
        return rows


def pack_rows(rows: dict[str, list]) -> Batch:
    """A micro-batch as one padding-free row: conversations end to end, ``position_ids`` restarting at
    0 per conversation (what marks the boundaries), ``attention_mask`` all ones (real tokens, for the
    throughput counts; not passed to the model). Not padded to a multiple: there is no padding."""
    batch: Batch = {
        "input_ids": torch.tensor([[t for ids in rows["input_ids"] for t in ids]], dtype=torch.long),
        "labels": torch.tensor([[t for labels in rows["labels"] for t in labels]], dtype=torch.long),
        "position_ids": torch.tensor([[p for ids in rows["input_ids"] for p in range(len(ids))]], dtype=torch.long),
    }
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    for key in ("example_id", "truncated", "prompt_length", "reply_turn", "generate"):
        batch[key] = torch.tensor(rows[key], dtype=torch.long)
    return batch


def _show(tokenizer, ids: list[int], supervised: bool) -> str:
    text = tokenizer.decode(ids)
    return f"[[{text}]]" if supervised else text
