"""Token classification (NER) end to end, on the toy data in tests/data/ner/ with a tiny word-level BERT.

Three runs of one recipe (data.max_length=16, so the long toy sentences are cut):
- 1 process, global batch 8 (micro 8): learns; reports truncation; exports a plain transformers model;
- 2 gloo ranks (DDP, micro 4): the same per-step losses (token-level loss normalized over the whole
  step across ranks) and exactly the same evaluation (odd-sized sets, every example once);
- 2 ranks under DeepSpeed ZeRO-2 with LoRA: trains, and its export reloads (launcher.finetune.load_exported)
  and reproduces its own test predictions.
"""

from __future__ import annotations

import json

import pytest
import torch
from assets import words_of_jsonl, write_word_level_bert
from conftest import REPO, check_ok, read_events, run_launcher, with_sections, write_recipe

from launcher.finetune import load_exported

pytestmark = pytest.mark.slow

DATA = REPO / "tests" / "data" / "ner"
MAX_LENGTH = 16  # 14 words + [CLS] [SEP]: one word is one token for the word-level tokenizer
SIZES = {"validation": 37, "test": 41}


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory) -> str:
    words = words_of_jsonl(*sorted(DATA.glob("*.jsonl")), field="tokens")
    return str(write_word_level_bert(tmp_path_factory.mktemp("ner-bert"), words))


def ner_recipe(model: str, out_dir, **sections) -> dict:
    recipe = {
        "name": "ner",
        "task": "token_classification",  # data.text_column/label_column left unset: columns tokens/tags
        "model": {"name_or_path": model},
        "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                 "test": str(DATA / "test.jsonl"), "max_length": MAX_LENGTH},
        "training": {"epochs": 2, "micro_batch_size": 8, "global_batch_size": 8, "learning_rate": 3e-3,
                     "log_every": 1},
        "evaluation": {"every_epoch": False, "micro_batch_size": 6},
        "output": {"dir": str(out_dir)},
    }
    return with_sections(recipe, sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ner_model, isolated_env) -> dict:
    root = tmp_path_factory.mktemp("ner-runs")
    plans = {
        "single": (None, (), {}),
        "ddp": (2, ("--multi_gpu",), {"training": {"micro_batch_size": 4}}),
        "lora_zero2": (2, ("--use_deepspeed", "--zero_stage", "2"), {
            "training": {"micro_batch_size": 4, "learning_rate": 1e-2, "log_every": 10},
            "finetune": {"method": "lora", "lora_r": 4},
            # best weights: saved and restored through the LoRA export path
            "evaluation": {"every_epoch": True, "best_metric": "f1"},
        }),
    }
    out = {}
    for name, (nproc, accelerate_args, sections) in plans.items():
        path = write_recipe(root / f"{name}.yaml", ner_recipe(ner_model, root / name, **sections))
        check_ok(run_launcher(["train", str(path)], isolated_env, nproc=nproc, accelerate_args=accelerate_args))
        out[name] = root / name
    return out


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def predicted_tags(model, tokenizer, sentences: list[list[str]]) -> list[list[str]]:
    """Plain transformers: each word's tag is the prediction at its first sub-token; words cut off by
    max_length are O."""
    encoded = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH, padding=True,
                        return_tensors="pt")
    with torch.no_grad():
        predicted = model(**encoded).logits.argmax(-1).tolist()
    out = []
    for i, words in enumerate(sentences):
        tags, previous = ["O"] * len(words), None
        for position, word in enumerate(encoded.word_ids(i)):
            if word is not None and word != previous:
                tags[word] = model.config.id2label[predicted[i][position]]
            previous = word
        out.append(tags)
    return out


def test_learns_entities_and_counts_truncated_examples(runs):
    result = metrics(runs["single"])
    losses = [e["loss"] for e in read_events(runs["single"], "train")]
    assert losses[-1] < 0.2 * losses[0]
    for split, size in SIZES.items():
        scores = result[split]
        assert scores["num_examples"] == size
        assert scores["f1"] > 0.85 and scores["accuracy"] > 0.9, (split, scores)
        assert set(scores["per_type"]) == {"PER", "LOC", "ORG"}
        rows = jsonl(DATA / f"{split}.jsonl")
        cut = [max(0, len(r["tokens"]) - (MAX_LENGTH - 2)) for r in rows]
        assert scores["truncated_examples"] == sum(1 for n in cut if n) > 0
        assert scores["truncated_words"] == sum(cut)
        assert scores["num_words"] == sum(len(r["tokens"]) for r in rows)
    predictions = jsonl(runs["single"] / "predictions" / "test.jsonl")
    gold = jsonl(DATA / "test.jsonl")
    assert [p["id"] for p in predictions] == list(range(SIZES["test"]))
    for row, truth in zip(predictions, gold):
        assert row["words"] == truth["tokens"] and row["tags"] == truth["tags"]
        assert len(row["predicted_tags"]) == len(row["words"])
        if row["truncated_words"]:  # cut-off words are predicted O
            assert row["predicted_tags"][MAX_LENGTH - 2:] == ["O"] * row["truncated_words"]


def test_two_ranks_give_the_same_per_step_losses(runs):
    single, ddp = (read_events(runs[name], "train") for name in ("single", "ddp"))
    assert read_events(runs["ddp"], "start")[0]["world_size"] == 2
    assert read_events(runs["ddp"], "start")[0]["micro_batch_size"] == 4
    assert len(single) == len(ddp) == 80
    assert [e["loss"] for e in ddp] == pytest.approx([e["loss"] for e in single], rel=1e-5)


def test_two_rank_evaluation_equals_one_process(runs):
    single, ddp = metrics(runs["single"]), metrics(runs["ddp"])
    for split, size in SIZES.items():  # odd sizes: the last eval block wraps around on 2 ranks
        assert single[split]["num_examples"] == ddp[split]["num_examples"] == size
        for key, value in single[split].items():
            if key == "loss":
                assert ddp[split][key] == pytest.approx(value, rel=1e-5)
            else:
                assert ddp[split][key] == value, (split, key)
    rows = jsonl(runs["ddp"] / "predictions" / "test.jsonl")
    assert [r["id"] for r in rows] == list(range(SIZES["test"]))
    assert rows == jsonl(runs["single"] / "predictions" / "test.jsonl")


def test_export_reloads_with_plain_transformers_and_reproduces_the_predictions(runs):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model_dir = runs["single"] / "model"
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.id2label[0] == "O" and model.config.num_labels == 7
    rows = jsonl(runs["single"] / "predictions" / "test.jsonl")
    assert predicted_tags(model, tokenizer, [r["words"] for r in rows]) == [r["predicted_tags"] for r in rows]


def test_lora_under_zero2_trains_and_its_export_reproduces_the_predictions(runs):
    run_dir = runs["lora_zero2"]
    start = read_events(run_dir, "start")[0]
    assert (start["strategy"], start["world_size"], start["finetune_method"]) == ("zero2", 2, "lora")
    assert 0 < start["trainable_share"] < 0.5
    losses = [e["loss"] for e in read_events(run_dir, "train")]
    assert losses[-1] < losses[0]
    model, tokenizer = load_exported(run_dir / "model")
    rows = jsonl(run_dir / "predictions" / "test.jsonl")
    assert predicted_tags(model, tokenizer, [r["words"] for r in rows]) == [r["predicted_tags"] for r in rows]
    assert metrics(run_dir)["test"]["num_examples"] == SIZES["test"]
