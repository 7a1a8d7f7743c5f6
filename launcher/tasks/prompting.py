"""Prompt-based classification: what a language model does with a template and label words alone.

Each example becomes ``[k demonstrations] + template(example)``; a causal LM is scored on the token
that would come next, a masked LM on its ``{mask}`` position, and the prediction is the label whose
verbalizer word scores highest (softmax restricted to the label words). Demonstrations are k training
examples drawn with ``prompt.shot_seed``: the same for every example and every rank. Metrics, eval
loss and the cross-rank gathering are the classification task's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pydantic import Field

from ..errors import DataError, ModelError
from ..model_io import load_pretrained_model, model_location
from ..schema import Section
from .base import Batch, Record
from .classification import SequenceClassificationTask, _label_key


class PromptSection(Section):
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


class PromptClassificationTask(SequenceClassificationTask):
    name = "prompt_classification"
    settings_key = "prompt"
    settings_schema = PromptSection
    settings_description = "Prompt-based evaluation (`launcher eval`): score a causal or masked LM zero-/k-shot."

    def __init__(self, recipe):
        super().__init__(recipe)
        self.demonstrations: list[dict] = []
        self.kind = "masked" if "{mask}" in recipe.prompt.template else "causal"
        self.auto_model_class = "AutoModelForMaskedLM" if self.kind == "masked" else "AutoModelForCausalLM"

    # ---- data ---------------------------------------------------------------------------
    def fit(self, train) -> None:
        super().fit(train)
        verbalizer = {_label_key(k): v for k, v in self.recipe.prompt.verbalizer.items()}
        missing = [name for name in self.label_names if name not in verbalizer]
        extra = [name for name in verbalizer if name not in self.label_names]
        if missing or extra:
            raise DataError(
                f"prompt.verbalizer: labels without a word: {missing}; words for labels not in the data: {extra} "
                f"(labels: {self.label_names})"
            )
        shots = self.recipe.prompt.shots
        if shots > len(train):
            raise DataError(f"prompt.shots={shots} but the training split has {len(train)} rows")
        chosen = np.random.default_rng(self.recipe.prompt.shot_seed).choice(len(train), size=shots, replace=False)
        data = self.recipe.data
        self.demonstrations = [
            {"text": train[int(i)][data.text_column],
             "text_pair": train[int(i)][data.text_pair_column] if data.text_pair_column else None,
             "label": _label_key(train[int(i)][data.label_column])}
            for i in chosen
        ]

    def cache_inputs(self) -> dict:
        return {"prompt": self.recipe.prompt.model_dump(mode="json")}

    def fitted_state(self) -> dict:
        return {**super().fitted_state(), "demonstrations": self.demonstrations}

    def restore_fitted(self, state: dict) -> None:
        super().restore_fitted(state)
        self.demonstrations = state["demonstrations"]

    def verbalizer_ids(self, tokenizer) -> list[int]:
        words = {_label_key(k): v for k, v in self.recipe.prompt.verbalizer.items()}
        ids = []
        for name in self.label_names:
            pieces = tokenizer(words[name], add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                shown = tokenizer.convert_ids_to_tokens(pieces)
                raise ModelError(
                    f"prompt.verbalizer.{name}: {words[name]!r} is {len(pieces)} tokens {shown} for this tokenizer; "
                    f"choose a word that is one token (a leading space often makes the difference)"
                )
            ids.append(pieces[0])
        return ids

    def _fill(self, text, pair, label_word, tokenizer) -> str:
        values = {"text": text, "text_pair": pair or ""}
        if self.kind == "masked":
            values["mask"] = label_word if label_word is not None else tokenizer.mask_token
            return self.recipe.prompt.template.format(**values)
        prompt = self.recipe.prompt.template.format(**values)
        return prompt + label_word if label_word is not None else prompt

    def encoder(self, tokenizer):
        if self.kind == "masked" and tokenizer.mask_token is None:
            raise ModelError("prompt.template uses {mask} but this tokenizer has no mask token; use a masked LM or drop {mask}")
        self.verbalizer_ids(tokenizer)  # fail early on multi-token words
        data, prompt = self.recipe.data, self.recipe.prompt
        words = {_label_key(k): v for k, v in prompt.verbalizer.items()}
        context = prompt.separator.join(self._fill(d["text"], d["text_pair"], words[d["label"]], tokenizer)
                                        for d in self.demonstrations)
        label_to_id = self.label_to_id
        # Keep the end of an over-long prompt: that is where the label word is scored.
        tokenizer.truncation_side = "left"

        def encode(rows, indices):
            pairs = rows[data.text_pair_column] if data.text_pair_column else [None] * len(indices)
            prompts = [(context + prompt.separator if context else "") + self._fill(t, p, None, tokenizer)
                       for t, p in zip(rows[data.text_column], pairs)]
            features = tokenizer(prompts, truncation=True, max_length=data.max_length)
            features["labels"] = [label_to_id[_label_key(v)] for v in rows[data.label_column]]
            features["example_id"] = list(indices)
            return features

        return encode

    # ---- model --------------------------------------------------------------------------
    def model_config_kwargs(self) -> dict:
        return {}

    def build_model(self, tokenizer):
        model = load_pretrained_model(self.auto_model_class, model_location(self.recipe), self.recipe)
        self.verbalizer = torch.tensor(self.verbalizer_ids(tokenizer))
        self.mask_token_id = tokenizer.mask_token_id
        return model

    # ---- evaluation ---------------------------------------------------------------------
    def model_inputs(self, batch: Batch) -> dict:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def predict_batch(self, model, batch: Batch, tokenizer) -> list[Record]:
        logits = model(**self.model_inputs(batch)).logits.float()
        rows = torch.arange(logits.shape[0], device=logits.device)
        if self.kind == "masked":
            positions = (batch["input_ids"] == self.mask_token_id).int().argmax(-1)
        else:  # right padding: the next-token distribution sits at the last real token
            positions = batch["attention_mask"].sum(-1) - 1
        scores = logits[rows, positions][:, self.verbalizer.to(logits.device)]
        losses = F.cross_entropy(scores, batch["labels"], reduction="none")
        probabilities = scores.softmax(-1)
        return [
            {"id": int(i), "label": int(y), "prediction": int(p), "loss": float(loss), "probabilities": probs}
            for i, y, p, loss, probs in zip(batch["example_id"].tolist(), batch["labels"].tolist(),
                                            scores.argmax(-1).tolist(), losses.tolist(), probabilities.tolist())
        ]
