"""recipes/imdb_bert.yaml, the classic tutorial run (bert-base-cased on IMDb, both from the Hub), on a
machine without the Hub: training stops in one line naming the Hub and what to do; a dry run plans it
from the Hugging Face cache, or says in one line why it cannot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from launcher.recipe import load_recipe

RECIPE = REPO / "recipes" / "imdb_bert.yaml"
# bert-base-cased's published config.json (https://huggingface.co/bert-base-cased/blob/main/config.json)
BERT_BASE_CASED = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0", "type_vocab_size": 2, "use_cache": True, "vocab_size": 28996,
}


def launcher(args, env, tmp_path):
    return subprocess.run([sys.executable, "-m", "launcher", *args, "output.dir=" + str(tmp_path / "run")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture
def empty_hub_cache(isolated_env, tmp_path):
    return dict(isolated_env, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")


def test_the_recipe_is_the_tutorial_run():
    recipe = load_recipe(RECIPE)
    assert (recipe.model.name_or_path, recipe.data.dataset, recipe.data.train, recipe.data.test) == (
        "bert-base-cased", "imdb", "train", "test")
    assert recipe.data.validation is None and 0 < recipe.data.validation_size < 1  # carved from train
    assert recipe.training.learning_rate == 2e-5 and 2 <= recipe.training.epochs <= 3
    assert 256 <= recipe.data.max_length <= 512
    assert recipe.evaluation.every_epoch and recipe.evaluation.best_metric == "accuracy"


HUB_LINE = ("model.name_or_path: bert-base-cased is a Hugging Face Hub id and its config is not in the local Hugging "
            "Face cache, and the Hub is switched off (HF_HUB_OFFLINE=1); download it once with network (hf download "
            "bert-base-cased) or point model.name_or_path at a local directory")


def test_check_offline_accepts_the_recipe_and_says_what_it_could_not_check(empty_hub_cache, tmp_path):
    """`check` validates the recipe; the model's limits need its config, which only the Hub has."""
    result = launcher(["check", str(RECIPE)], empty_hub_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"note: lengths not checked against the model's position limit: {HUB_LINE}"]
    assert "name: imdb_bert" in result.stdout


@pytest.mark.parametrize("command", [["train", str(RECIPE)], ["run", str(RECIPE), "--dry-run"]])
def test_offline_without_the_model_in_the_cache_is_one_line_naming_the_hub(empty_hub_cache, tmp_path, command):
    result = launcher(command, empty_hub_cache, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {HUB_LINE}"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train", str(RECIPE)], ["run", str(RECIPE), "--dry-run"]])
def test_an_unreachable_hub_is_one_line_at_once(isolated_env, tmp_path, command):
    """HF_HUB_OFFLINE unset and no network (this machine reaches no Hub): one lookup without retries, not the Hub
    client's five retries (~23 s) before the same line."""
    env = {key: value for key, value in isolated_env.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = launcher(command, dict(env, HF_HOME=str(tmp_path / "hf")), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: model.name_or_path: could not load config for bert-base-cased from the Hugging Face Hub (")
    assert errors[0].endswith("check the id and the network, or point model.name_or_path at a local directory")
    assert "Retrying in" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def write_cache_entry(hf_home):
    """A Hugging Face Hub cache entry for bert-base-cased as `hf download` leaves it (refs/main ->
    snapshots/<commit>/), holding the model's published config.json and a stand-in WordPiece tokenizer
    (the real vocab.txt cannot be fetched here; planning reads the tokenizer only to tokenize data, and
    there is no data)."""
    from transformers import BertTokenizerFast

    repo = hf_home / "hub" / "models--bert-base-cased"
    commit = "cd5ef92a9fb2f889e972770a36d4ed042daf221e"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text(json.dumps(BERT_BASE_CASED))
    vocab = snapshot / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nfilm\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=False, model_max_length=512).save_pretrained(snapshot)


def test_dry_run_plans_from_the_cache_and_says_why_steps_are_unknown(empty_hub_cache, tmp_path):
    write_cache_entry(tmp_path / "hf")
    result = launcher(["run", str(RECIPE), "--dry-run"], empty_hub_cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join(result.stdout.split())
    assert "recipe: " in out and "(sequence_classification, model bert-base-cased)" in out
    assert "micro_batch_size 16 x grad_accum_steps 2 x world_size 1 = global_batch_size 32" in out
    assert "parameters: 108,310,272" in out  # bert-base-cased's body: 12 layers x 768, 28,996 wordpieces
    assert "steps: unknown (no training data here; see the note below)" in out
    assert ("note: steps unknown, and parameters and memory without the task head (the data sizes it), until the data "
            "is here: data.dataset: imdb is a Hugging Face Hub dataset that is not in the local datasets cache, and "
            "the Hub is switched off (HF_HUB_OFFLINE=1)") in out
    assert "-m launcher train" in out and "dry run: nothing started" in out
    config = yaml.safe_load((tmp_path / "run" / "launch" / "accelerate_config.yaml").read_text())
    assert config["mixed_precision"] == "bf16"
    assert not (tmp_path / "run" / "recipe.yaml").exists()
    # What would train cannot go on without the data: one line, the same reason.
    result = launcher(["train", str(RECIPE)], empty_hub_cache, tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.dataset: imdb is a Hugging Face Hub dataset that is not in the local" in errors[0]
    assert "Traceback" not in result.stderr
