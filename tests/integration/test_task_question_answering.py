"""Extractive question answering end to end, as a user runs it (tests/data/qa, tiny BERT from tests/assets.py).

The toy data: the answer is always the word after "director" in a 30-60 word context; at
data.max_length=32 every context takes 2-3 windows, so training, answer selection across windows
and cross-rank evaluation are all exercised. 29 test examples -> 71 feature rows (both odd).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, check_ok, read_events, run_launcher, with_sections, write_recipe

DATA = REPO / "tests" / "data" / "qa"
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TEST_EXAMPLES, TEST_FEATURES = 29, 71


def qa_recipe(assets, out_dir: Path, data_dir: Path = DATA, **sections) -> dict:
    recipe = {
        "name": "qa-toy",
        "task": "question_answering",
        "model": {"name_or_path": assets["model"], "config_overrides": NO_DROPOUT},
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl"), "text_column": "question", "text_pair_column": "context",
                 "label_column": "answers", "max_length": 32},
        "question_answering": {"doc_stride": 8, "max_answer_length": 5},
        "training": {"max_steps": 1500, "micro_batch_size": 16, "learning_rate": 1e-3, "warmup_ratio": 0.1,
                     "log_every": 100},
        "evaluation": {"metrics": ["exact_match", "f1"], "every_epoch": False, "micro_batch_size": 16},
        "output": {"dir": str(out_dir)},
    }
    return with_sections(recipe, sections)


def predictions(run_dir: Path, name: str = "predictions/test.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def split_features(recipe_path: Path, split: str):
    """The split's feature rows exactly as the run built them (read back from the preparation cache)."""
    from launcher.data import prepare_data
    from launcher.model_io import load_tokenizer
    from launcher.recipe import load_recipe
    from launcher.tasks import TASKS

    recipe = load_recipe(recipe_path)
    task = TASKS[recipe.task](recipe)
    tokenizer = load_tokenizer(recipe)
    data = prepare_data(recipe, task, tokenizer)
    return task, tokenizer, data.features[split], data.raw[split]


def predict_with(model, task, tokenizer, features) -> dict[int, str]:
    """Example index -> predicted answer, through the task's own post-processing."""
    from launcher.tasks.question_answering import choose_answers

    records = []
    with torch.no_grad():
        for start in range(0, len(features), 16):
            batch = task.collate(features[start:start + 16], tokenizer)
            records.extend(task.records(model(**task.model_inputs(batch)), batch))
    return {i: a["text"] for i, a in choose_answers(records, task.version_2).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets, isolated_env):
    root = tmp_path_factory.mktemp("qa")
    path = write_recipe(root / "recipe.yaml", qa_recipe(assets, root / "run"))
    check_ok(run_launcher(["train", str(path)], isolated_env))
    return root / "run"


def test_training_learns_to_answer(trained):
    from launcher.squad import normalize_answer

    losses = [e["loss"] for e in read_events(trained, "train")]
    assert losses[-1] < 0.25 * losses[0]
    metrics = json.loads((trained / "metrics.json").read_text())
    test = metrics["test"]
    assert (test["num_examples"], test["num_features"]) == (TEST_EXAMPLES, TEST_FEATURES)
    # Guessing a sentiment word of the context gets ~0.2; reading "the word after director" gets 1.
    assert test["exact_match"] >= 0.6 and test["f1"] >= test["exact_match"]
    assert metrics["validation"]["exact_match"] >= 0.6
    rows = predictions(trained)
    assert [r["id"] for r in rows] == list(range(TEST_EXAMPLES))  # each example once, not each window
    raw = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    for row, example in zip(rows, raw):
        assert row["question"] == example["question"] and row["answers"] == example["answers"]["text"]
        assert example["context"][row["start"]:row["start"] + len(row["prediction"])] == row["prediction"]
    exact = [any(normalize_answer(r["prediction"]) == normalize_answer(a) for a in r["answers"]) for r in rows]
    assert sum(exact) == round(test["exact_match"] * TEST_EXAMPLES)


def test_exported_model_reloads_with_transformers_and_reproduces_the_predictions(trained):
    """AutoModelForQuestionAnswering.from_pretrained(<run>/model) gives the run's test answers. (The
    installed transformers 5 has no "question-answering" pipeline any more.)"""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(trained / "model").eval()
    task, _, features, _ = split_features(trained / "recipe.yaml", "test")
    tokenizer = AutoTokenizer.from_pretrained(trained / "model")
    reproduced = predict_with(model, task, tokenizer, features)
    assert [reproduced[i] for i in range(TEST_EXAMPLES)] == [r["prediction"] for r in predictions(trained)]


@pytest.mark.slow
def test_two_ranks_evaluate_exactly_like_one(trained, tmp_path, isolated_env):
    """The exported weights evaluated on 2 gloo ranks: the same EM/F1 and answers as the 1-process run,
    though the windows of some examples are scored on different ranks."""
    from launcher.sampling import eval_shard

    _, _, features, _ = split_features(trained / "recipe.yaml", "test")
    assert len(features) == TEST_FEATURES
    per_rank = -(-len(features) // 2)
    ranks = [{features[i]["example_index"] for i in eval_shard(len(features), 2, r)[: len(features) - r * per_rank]}
             for r in range(2)]  # (without the wrap-around padding of the last rank)
    assert ranks[0] & ranks[1], "no example has windows on both ranks: the test would prove nothing"
    out = tmp_path / "eval"
    result = run_launcher(["eval", str(trained / "recipe.yaml"), "--checkpoint", str(trained / "model"),
                           "--split", "test", "--output", str(out)], isolated_env, nproc=2, accelerate_args=("--multi_gpu",))
    check_ok(result)
    double = json.loads((out / "test.json").read_text())["metrics"]
    single = json.loads((trained / "metrics.json").read_text())["test"]
    for key in ("exact_match", "f1", "num_examples", "num_features"):
        assert double[key] == single[key], key
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)
    rows = predictions(out, "test-predictions.jsonl")
    assert [r["id"] for r in rows] == list(range(TEST_EXAMPLES))
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in predictions(trained)]


@pytest.mark.slow
def test_two_rank_training_matches_one_process(tmp_path, assets, isolated_env):
    """Loss normalization over feature rows: 1 process (16 = 8 x 2 accumulation) and 2 ranks
    (16 = 8 x 2 ranks) take the same steps and end with the same EM/F1."""
    runs = {}
    for name, nproc in (("single", None), ("double", 2)):
        recipe = qa_recipe(assets, tmp_path / name, training={"max_steps": 12, "log_every": 1, "micro_batch_size": 8,
                                                              "global_batch_size": 16, "learning_rate": 3e-3})
        path = write_recipe(tmp_path / f"{name}.yaml", recipe)
        check_ok(run_launcher(["train", str(path)], isolated_env, nproc=nproc,
                              accelerate_args=("--multi_gpu",) if nproc else ()))
        runs[name] = tmp_path / name
    single, double = ([e["loss"] for e in read_events(runs[n], "train")] for n in ("single", "double"))
    assert len(single) == 12 and double == pytest.approx(single, rel=1e-5)
    assert read_events(runs["double"], "start")[0]["world_size"] == 2
    for split in ("validation", "test"):
        one, two = (json.loads((runs[n] / "metrics.json").read_text())[split] for n in ("single", "double"))
        for key in ("exact_match", "f1", "num_examples", "num_features"):
            assert one[key] == two[key], (split, key)
    assert [r["prediction"] for r in predictions(runs["double"])] == [r["prediction"] for r in predictions(runs["single"])]


def test_lora_trains_the_adapter_and_the_span_head(tmp_path, assets, isolated_env):
    from launcher.finetune import load_exported

    recipe = qa_recipe(assets, tmp_path / "run", finetune={"method": "lora", "lora_r": 4},
                       training={"max_steps": 300, "learning_rate": 1e-2})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    check_ok(run_launcher(["train", str(path)], isolated_env))
    run_dir = tmp_path / "run"
    start = read_events(run_dir, "start")[0]
    assert start["finetune_method"] == "lora" and start["trainable_parameters"] < start["parameters"]
    losses = [e["loss"] for e in read_events(run_dir, "train")]
    assert losses[-1] < losses[0]
    assert (run_dir / "model" / "adapter_model.safetensors").exists()
    model, tokenizer = load_exported(run_dir / "model")
    assert type(model).__name__ == "PeftModelForQuestionAnswering"
    task, _, features, _ = split_features(run_dir / "recipe.yaml", "test")
    reproduced = predict_with(model, task, tokenizer, features)
    assert [reproduced[i] for i in range(TEST_EXAMPLES)] == [r["prediction"] for r in predictions(run_dir)]


def _misplaced_answer(tmp_path: Path) -> tuple[Path, list[str]]:
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    lines = (data / "validation.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    row["answers"]["answer_start"][0] += 2
    lines[4] = json.dumps(row)
    (data / "validation.jsonl").write_text("\n".join(lines) + "\n")
    return data, []


def _overlong_without_stride(tmp_path: Path) -> tuple[Path, list[str]]:
    return DATA, ["question_answering.doc_stride=null"]


@pytest.mark.parametrize("make, expected", [
    (_misplaced_answer, "data.validation ({data}/validation.jsonl) row 5: answer "),
    (_overlong_without_stride, "data.train ({data}/train.jsonl) row 1: question + context do not fit in "
                               "data.max_length=32 tokens; set question_answering.doc_stride"),
])
def test_bad_examples_are_refused_before_anything_is_written(tmp_path, assets, isolated_env, make, expected):
    data_dir, overrides = make(tmp_path)
    path = write_recipe(tmp_path / "recipe.yaml", qa_recipe(assets, tmp_path / "run", data_dir=data_dir))
    result = run_launcher(["train", str(path), *overrides], isolated_env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected.format(data=data_dir) in errors[0]
    if make is _misplaced_answer:
        assert "question_answering.drop_bad_answers=true" in errors[0]
    assert not (tmp_path / "run").exists()


def test_example_recipe_is_valid(isolated_env):
    result = run_launcher(["check", "recipes/qa_example.yaml"], isolated_env)
    check_ok(result)
    assert "task: question_answering" in result.stdout and "doc_stride: 16" in result.stdout
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "qa" / f"{split}.jsonl").read_text().splitlines()]
        for row in rows:
            for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
                assert row["context"][start:start + len(text)] == text, row["id"]
