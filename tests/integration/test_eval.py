"""`launcher eval`: exported checkpoints on any split, and prompt-based zero-/k-shot scoring of
causal and masked LMs, gathered across ranks like any evaluation."""

from __future__ import annotations

import json

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


def expected_causal_predictions(model_dir, texts, context=""):
    """The scoring rule, computed directly with transformers for comparison."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    word_ids = [tokenizer(" negative", add_special_tokens=False)["input_ids"][0],
                tokenizer(" positive", add_special_tokens=False)["input_ids"][0]]
    predictions = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(context + f"Review: {text} Sentiment:", return_tensors="pt")["input_ids"]
            scores = model(ids).logits[0, -1, word_ids]
            predictions.append(["negative", "positive"][int(scores.argmax())])
    return predictions


@pytest.mark.parametrize("nproc", [None, 2])
def test_zero_shot_causal_lm_scores_the_next_token(assets, isolated_env, tmp_path, nproc):
    path = write_recipe(tmp_path / "recipe.yaml", prompt_recipe(assets, tmp_path / "run"))
    args = ("--multi_gpu",) if nproc else ()
    check_ok(run_launcher(["eval", str(path), "--split", "test"], isolated_env, nproc=nproc, accelerate_args=args))
    result = read(tmp_path / "run" / "eval" / "test.json")
    rows = [json.loads(x) for x in (tmp_path / "run" / "eval" / "test-predictions.jsonl").read_text().splitlines()]
    assert result["metrics"]["num_examples"] == 53 and sorted(r["id"] for r in rows) == list(range(53))
    assert [r["prediction"] for r in rows] == expected_causal_predictions(assets["causal_lm"], [r["text"] for r in rows])


def test_k_shot_demonstrations_are_reproducible_and_rank_independent(assets, isolated_env, tmp_path):
    outputs = []
    for name, nproc in (("one", None), ("two", 2)):
        path = write_recipe(tmp_path / f"{name}.yaml", prompt_recipe(assets, tmp_path / name, shots=3))
        args = ("--multi_gpu",) if nproc else ()
        check_ok(run_launcher(["eval", str(path), "--split", "validation"], isolated_env, nproc=nproc, accelerate_args=args))
        outputs.append(read(tmp_path / name / "eval" / "validation.json")["metrics"])
    assert outputs[0]["accuracy"] == outputs[1]["accuracy"] and outputs[0]["num_examples"] == 37
    assert outputs[0]["loss"] == pytest.approx(outputs[1]["loss"], rel=1e-5)
    zero = write_recipe(tmp_path / "zero.yaml", prompt_recipe(assets, tmp_path / "zero", shots=0))
    check_ok(run_launcher(["eval", str(zero), "--split", "validation"], isolated_env))
    assert read(tmp_path / "zero" / "eval" / "validation.json")["metrics"]["loss"] != pytest.approx(outputs[0]["loss"])


def test_masked_lm_scores_the_mask_position(assets, isolated_env, tmp_path):
    recipe = prompt_recipe(assets, tmp_path / "run", model_key="model", template="{text} it was {mask}")
    recipe["prompt"]["verbalizer"] = {"positive": "good", "negative": "bad"}
    check_ok(run_launcher(["eval", str(write_recipe(tmp_path / "r.yaml", recipe)), "--split", "test"], isolated_env))
    metrics = read(tmp_path / "run" / "eval" / "test.json")["metrics"]
    assert metrics["num_examples"] == 53 and 0 <= metrics["accuracy"] <= 1


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
        assert metrics["accuracy"] == trained[split]["accuracy"]
        assert metrics["loss"] == pytest.approx(trained[split]["loss"], rel=1e-5)
