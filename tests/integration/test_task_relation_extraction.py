"""Relation extraction end to end, on the toy data in tests/data/relation/ with a tiny word-level BERT.

Runs of one recipe:
- 1 process, global batch 8 (micro 8), 300 steps: learns (including two-clause sentences where only
  the entity markers say which pair is asked about); exports a plain transformers model whose
  tokenizer carries the markers;
- 60 steps on 1 process (micro 8) and on 2 gloo ranks (DDP, micro 4): the same per-step losses and
  exactly the same evaluation (odd-sized sets, every example once). (Over the long run the two drift
  apart from step ~40 on: at this learning rate float rounding differences grow chaotically, which
  says nothing about the loss normalization, so the comparison uses a short run.) These runs read
  their features from the data cache, so the markers reach the tokenizer and the embeddings through
  build_model alone;
- 2 ranks under DeepSpeed ZeRO-2 with LoRA: the grown embedding matrix is saved with the adapter and
  the export reloads (launcher.finetune.load_exported) and reproduces its own test predictions.
"""

from __future__ import annotations

import json

import pytest
import torch
from assets import words_of_jsonl, write_word_level_bert
from conftest import REPO, check_ok, read_events, run_launcher, with_sections, write_recipe

from launcher.finetune import load_exported

pytestmark = pytest.mark.slow

DATA = REPO / "tests" / "data" / "relation"
SIZES = {"validation": 37, "test": 41}
MARKERS = ["[E1]", "[/E1]", "[E2]", "[/E2]"]
RELATIONS = {"based_in", "lives_in", "works_for"}
SHORT = 60  # optimizer steps of the 1-vs-2-rank comparison: enough to predict every relation


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def re_model(tmp_path_factory) -> str:
    words = words_of_jsonl(*sorted(DATA.glob("*.jsonl")), field="text")
    return str(write_word_level_bert(tmp_path_factory.mktemp("re-bert"), words))


def re_recipe(model: str, out_dir, **sections) -> dict:
    recipe = {
        "name": "relations",
        "task": "relation_extraction",  # no relation: section: default span columns and markers
        "model": {"name_or_path": model},
        "data": {"train": str(DATA / "train.jsonl"), "validation": str(DATA / "validation.jsonl"),
                 "test": str(DATA / "test.jsonl"), "max_length": 32},
        "training": {"epochs": 6, "micro_batch_size": 8, "global_batch_size": 8, "learning_rate": 5e-3,
                     "log_every": 10},
        "evaluation": {"every_epoch": False, "micro_batch_size": 6},
        "output": {"dir": str(out_dir)},
    }
    return with_sections(recipe, sections)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, re_model, isolated_env) -> dict:
    root = tmp_path_factory.mktemp("re-runs")
    plans = {
        "single": (None, (), {}),
        "short": (None, (), {"training": {"max_steps": SHORT, "log_every": 1}}),
        "short_ddp": (2, ("--multi_gpu",), {"training": {"max_steps": SHORT, "log_every": 1, "micro_batch_size": 4}}),
        "lora_zero2": (2, ("--use_deepspeed", "--zero_stage", "2"), {
            "training": {"micro_batch_size": 4, "epochs": 2, "learning_rate": 1e-2},
            "finetune": {"method": "lora", "lora_r": 4},
            "evaluation": {"every_epoch": True, "best_metric": "f1"},  # best weights saved + restored
        }),
    }
    out = {}
    for name, (nproc, accelerate_args, sections) in plans.items():
        path = write_recipe(root / f"{name}.yaml", re_recipe(re_model, root / name, **sections))
        check_ok(run_launcher(["train", str(path)], isolated_env, nproc=nproc, accelerate_args=accelerate_args))
        out[name] = root / name
    return out


def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def probabilities(model, tokenizer, texts: list[str]) -> list[list[float]]:
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        return model(**encoded).logits.softmax(-1).tolist()


def assert_reproduces(model, tokenizer, run_dir) -> None:
    rows = jsonl(run_dir / "predictions" / "test.jsonl")
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for row, probs in zip(rows, probabilities(model, tokenizer, [r["marked_text"] for r in rows])):
        assert [row["probabilities"][name] for name in labels] == pytest.approx(probs, abs=1e-5)


def test_learns_relations_from_marked_entities(runs):
    result = metrics(runs["single"])
    for split, size in SIZES.items():
        scores = result[split]
        assert scores["num_examples"] == size and scores["truncated_examples"] == 0
        assert scores["f1"] > 0.75 and scores["accuracy"] > 0.75, (split, scores)
        assert set(scores["per_relation"]) == RELATIONS  # no_relation is the negative class, not a relation
        gold = jsonl(DATA / f"{split}.jsonl")
        assert scores["support"] == sum(r["label"] != "no_relation" for r in gold)
    rows = jsonl(runs["single"] / "predictions" / "test.jsonl")
    gold = jsonl(DATA / "test.jsonl")
    assert [r["id"] for r in rows] == list(range(SIZES["test"]))
    for row, truth in zip(rows, gold):
        text = truth["text"]
        assert row["text"] == text and row["label"] == truth["label"]
        assert row["head"] == text[truth["head_start"]:truth["head_end"]]
        assert row["tail"] == text[truth["tail_start"]:truth["tail_end"]]
        assert f"[E1] {row['head']} [/E1]" in row["marked_text"] and f"[E2] {row['tail']} [/E2]" in row["marked_text"]
    # two-clause sentences asked about a crossed pair: only the markers tell them apart
    crossed = [r for r in rows if " and " in r["text"] and r["label"] == "no_relation"]
    assert crossed and sum(r["prediction"] == "no_relation" for r in crossed) >= len(crossed) / 2


def test_two_ranks_give_the_same_per_step_losses(runs):
    single, ddp = (read_events(runs[name], "train") for name in ("short", "short_ddp"))
    assert read_events(runs["short_ddp"], "start")[0]["world_size"] == 2
    assert len(single) == len(ddp) == SHORT
    first, last = [e["loss"] for e in single[:10]], [e["loss"] for e in single[-10:]]
    assert sum(last) < 0.9 * sum(first)
    assert [e["loss"] for e in ddp] == pytest.approx([e["loss"] for e in single], rel=1e-5)


def test_two_rank_evaluation_equals_one_process(runs):
    single, ddp = metrics(runs["short"]), metrics(runs["short_ddp"])
    for split, size in SIZES.items():
        assert single[split]["num_examples"] == ddp[split]["num_examples"] == size
        for key, value in single[split].items():
            if key == "loss":
                assert ddp[split][key] == pytest.approx(value, rel=1e-5)
            else:
                assert ddp[split][key] == value, (split, key)
    rows = jsonl(runs["short_ddp"] / "predictions" / "test.jsonl")
    assert [r["id"] for r in rows] == list(range(SIZES["test"]))
    assert len({r["prediction"] for r in rows}) == 4  # a model that already tells the classes apart
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in jsonl(runs["short"] / "predictions" / "test.jsonl")]


def test_export_carries_the_markers_and_reproduces_the_predictions(runs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = runs["single"] / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert set(MARKERS) <= set(tokenizer.all_special_tokens)
    ids = tokenizer.convert_tokens_to_ids(MARKERS)
    assert len(set(ids)) == 4 and tokenizer.unk_token_id not in ids
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == model.config.vocab_size
    encoded = tokenizer("[E1] alice [/E1] works for [E2] acme [/E2]")["input_ids"]
    assert all(i in encoded for i in ids)
    assert_reproduces(model, tokenizer, runs["single"])


def test_lora_under_zero2_saves_the_grown_embeddings_and_its_export_reproduces_the_predictions(runs):
    from safetensors.torch import load_file

    run_dir = runs["lora_zero2"]
    start = read_events(run_dir, "start")[0]
    assert (start["strategy"], start["world_size"], start["finetune_method"]) == ("zero2", 2, "lora")
    assert 0 < start["trainable_share"] < 0.5
    saved = load_file(str(run_dir / "model" / "adapter_model.safetensors"))
    embeddings = [v for k, v in saved.items() if k.endswith("word_embeddings.weight")]
    model, tokenizer = load_exported(run_dir / "model")
    assert len(embeddings) == 1 and embeddings[0].shape[0] == len(tokenizer)
    assert set(MARKERS) <= set(tokenizer.all_special_tokens)
    assert_reproduces(model, tokenizer, run_dir)
    assert metrics(run_dir)["test"]["num_examples"] == SIZES["test"]
