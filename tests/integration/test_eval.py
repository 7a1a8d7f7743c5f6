"""`launcher eval`: exported checkpoints on any split, and prompt-based zero-/k-shot scoring of
causal and masked LMs, gathered across ranks like any evaluation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import check_ok, run_launcher, toy_recipe_dict, write_recipe

pytestmark = pytest.mark.slow


def prompt_recipe(assets, out_dir, model_key="causal_lm", template="Review: {text} Sentiment:", shots=0, **extra):
    recipe = toy_recipe_dict(assets, out_dir, evaluation={"micro_batch_size": 8})
    recipe["model"] = {"name_or_path": assets[model_key]}
    recipe["prompt"] = {"template": template, "verbalizer": {"positive": " positive", "negative": " negative"},
                        "shots": shots, "separator": " "}
    recipe.update(extra)
    return recipe


def read(path):
    return json.loads(path.read_text())


def reference_scores(model_dir, prompts, words: dict[str, str]) -> tuple[list[str], list[dict]]:
    """The scoring rule, computed directly with transformers: for each prompt string, the label whose
    word has the highest logit at the scored position (a masked LM's mask token, else the last token),
    and the softmax over the label words."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    masked = tokenizer.mask_token is not None
    model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(model_dir).eval()
    labels = sorted(words)
    word_ids = []
    for label in labels:
        (token,) = tokenizer(words[label], add_special_tokens=False)["input_ids"]
        word_ids.append(token)
    predictions, probabilities = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            assert ids.shape[1] <= 128, "the launcher would truncate this prompt (data.max_length)"
            position = int((ids[0] == tokenizer.mask_token_id).nonzero()) if masked else -1
            scores = model(ids).logits[0, position, word_ids]
            predictions.append(labels[int(scores.argmax())])
            probabilities.append(dict(zip(labels, scores.softmax(-1).tolist())))
    return predictions, probabilities


def expected_causal_predictions(model_dir, texts, context=""):
    return reference_scores(model_dir, [context + f"Review: {text} Sentiment:" for text in texts], WORDS)[0]


WORDS = {"positive": " positive", "negative": " negative"}


def assert_rows_match(rows, predictions, probabilities):
    """Every example's prediction equal, its probabilities to the 6 digits the rows keep."""
    assert [r["prediction"] for r in rows] == predictions
    for row, expected in zip(rows, probabilities):
        assert row["probabilities"] == pytest.approx(expected, abs=2e-6), row["id"]


def prediction_rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("nproc", [None, 2])
def test_zero_shot_causal_lm_scores_the_next_token(assets, isolated_env, tmp_path, nproc):
    path = write_recipe(tmp_path / "recipe.yaml", prompt_recipe(assets, tmp_path / "run"))
    args = ("--multi_gpu",) if nproc else ()
    check_ok(run_launcher(["eval", str(path), "--split", "test"], isolated_env, nproc=nproc, accelerate_args=args))
    result = read(tmp_path / "run" / "eval" / "test.json")
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval" / "test-predictions.jsonl").read_text().splitlines()]
    assert result["metrics"]["num_examples"] == 53 and sorted(r["id"] for r in rows) == list(range(53))
    assert [r["prediction"] for r in rows] == expected_causal_predictions(assets["causal_lm"], [r["text"] for r in rows])


def test_k_shot_prompt_is_the_demonstrations_then_the_example(assets, isolated_env, tmp_path):
    """3-shot on 1 and 2 ranks: each example is scored on ``demo1 demo2 demo3 example`` (each demonstration
    the template filled with a training row and followed by its label word, joined by the separator),
    built here from the training CSV; every prediction and probability equals that reference."""
    import csv

    import numpy as np

    def read_csv(path):
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    train = read_csv(assets["train"])
    # The draw is part of the contract (the same shot_seed gives the same demonstrations, in this order,
    # in every run and launcher version): numpy's default_rng(shot_seed), 3 rows without replacement.
    chosen = np.random.default_rng(7).choice(len(train), size=3, replace=False)
    demonstrations = [f"Review: {train[i]['text']} Sentiment:{WORDS[train[i]['label']]}" for i in chosen]
    context = " ".join(demonstrations) + " "
    texts = [row["text"] for row in read_csv(assets["validation"])]
    expected = reference_scores(assets["causal_lm"], [context + f"Review: {t} Sentiment:" for t in texts], WORDS)
    zero_shot = reference_scores(assets["causal_lm"], [f"Review: {t} Sentiment:" for t in texts], WORDS)[1]
    # the demonstrations matter to this model: a prompt without them (or with others) scores differently
    assert sum(a["positive"] != pytest.approx(b["positive"], abs=1e-3) for a, b in zip(expected[1], zero_shot)) > 30
    for name, nproc in (("one", None), ("two", 2)):
        recipe = prompt_recipe(assets, tmp_path / name, shots=3)
        recipe["prompt"]["shot_seed"] = 7  # not the default: the recipe's seed is the one used
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        args = ("--multi_gpu",) if nproc else ()
        check_ok(run_launcher(["eval", str(path), "--split", "validation"], isolated_env, nproc=nproc, accelerate_args=args))
        metrics = read(tmp_path / name / "eval" / "validation.json")["metrics"]
        rows = prediction_rows(tmp_path / name / "eval" / "validation-predictions.jsonl")
        assert [r["id"] for r in rows] == list(range(37)) and metrics["num_examples"] == 37
        assert_rows_match(rows, *expected)
        labels = [r["label"] for r in rows]
        assert metrics["accuracy"] == sum(p == y for p, y in zip(expected[0], labels)) / 37
        nll = [-math.log(probs[y]) for probs, y in zip(expected[1], labels)]
        assert metrics["loss"] == pytest.approx(sum(nll) / 37, rel=1e-5)


@pytest.fixture(scope="module")
def masked_lm(assets, tmp_path_factory) -> str:
    """The tiny BERT with its masked-LM head saved too, so that the launcher and the reference below
    load the same weights (a head initialised at load time would be whatever the seed made it)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    directory = tmp_path_factory.mktemp("tiny-bert-mlm")
    torch.manual_seed(1)
    BertForMaskedLM.from_pretrained(assets["model"]).save_pretrained(directory)
    AutoTokenizer.from_pretrained(assets["model"]).save_pretrained(directory)
    return str(directory)


def test_masked_lm_scores_the_mask_position(assets, masked_lm, isolated_env, tmp_path):
    words = {"positive": "good", "negative": "bad"}
    recipe = prompt_recipe(assets, tmp_path / "run", template="{text} it was {mask}")
    recipe["model"] = {"name_or_path": masked_lm}
    recipe["prompt"]["verbalizer"] = words
    check_ok(run_launcher(["eval", str(write_recipe(tmp_path / "r.yaml", recipe)), "--split", "test"], isolated_env))
    metrics = read(tmp_path / "run" / "eval" / "test.json")["metrics"]
    rows = prediction_rows(tmp_path / "run" / "eval" / "test-predictions.jsonl")
    assert metrics["num_examples"] == 53 and [r["id"] for r in rows] == list(range(53))
    predictions, probabilities = reference_scores(masked_lm, [f"{r['text']} it was [MASK]" for r in rows], words)
    assert set(predictions) == {"positive", "negative"}  # the reference tells the examples apart
    assert_rows_match(rows, predictions, probabilities)
    assert metrics["accuracy"] == sum(p == r["label"] for p, r in zip(predictions, rows)) / 53


def test_multi_token_verbalizer_word_is_refused(assets, isolated_env, tmp_path):
    recipe = prompt_recipe(assets, tmp_path / "run")
    recipe["prompt"]["verbalizer"]["positive"] = " very good"
    result = run_launcher(["eval", str(write_recipe(tmp_path / "r.yaml", recipe))], isolated_env)
    assert result.returncode == 2
    assert "prompt.verbalizer.positive: ' very good' is 2 tokens" in result.stderr


def test_exported_checkpoint_evaluates_on_any_split(assets, isolated_env, tmp_path):
    train = write_recipe(tmp_path / "train.yaml", toy_recipe_dict(assets, tmp_path / "run", training={"epochs": 2}))
    check_ok(run_launcher(["train", str(train)], isolated_env))
    trained = read(tmp_path / "run" / "metrics.json")
    for split in ("test", "validation"):
        check_ok(run_launcher(["eval", str(train), "--checkpoint", str(tmp_path / "run" / "model"), "--split", split,
                               "--output", str(tmp_path / "eval")], isolated_env, nproc=2, accelerate_args=("--multi_gpu",)))
        metrics = read(tmp_path / "eval" / f"{split}.json")["metrics"]
        for key in ("accuracy", "f1_macro", "per_class", "confusion_matrix", "num_examples"):
            assert metrics[key] == trained[split][key], (split, key)
        assert metrics["loss"] == pytest.approx(trained[split]["loss"], rel=1e-5)
    # example by example: the 2-rank evaluation of the export is the 1-process run's own evaluation
    one = prediction_rows(tmp_path / "run" / "predictions" / "test.jsonl")
    two = prediction_rows(tmp_path / "eval" / "test-predictions.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in one] == list(range(53))
    for a, b in zip(one, two):
        assert (a["text"], a["label"], a["prediction"]) == (b["text"], b["label"], b["prediction"]), a["id"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=2e-6), a["id"]
    assert trained["test"]["accuracy"] > 0.8  # a trained model: its predictions tell the examples apart
