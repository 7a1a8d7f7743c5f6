"""One plain process, as a user runs it: what lands in the run directory, and bad input."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import check_ok, read_events, run_launcher, toy_recipe_dict, write_recipe


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, assets, isolated_env):
    root = tmp_path_factory.mktemp("single")
    recipe = toy_recipe_dict(
        assets, root / "run",
        training={"epochs": 3, "learning_rate": 3e-3, "log_every": 10},
        evaluation={"every_steps": 25, "best_metric": "f1_macro"},
    )
    path = write_recipe(root / "recipe.yaml", recipe)
    result = run_launcher(["train", str(path), "training.seed=3"], isolated_env)
    check_ok(result)
    return root / "run", result


def test_run_directory_holds_every_output(finished_run):
    run_dir, result = finished_run
    for name in ("recipe.yaml", "metrics.jsonl", "metrics.json", "predictions/test.jsonl", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (run_dir / name).exists(), name
    assert not list(run_dir.rglob(".*")), "no temporary files left behind"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / "checkpoints" / f"best-step-{metrics['best']['step']:08d}"
    assert (best / "model.safetensors").exists()  # the best weights stay loadable on their own
    assert "model:" in result.stdout and "metrics:" in result.stdout


def test_resolved_recipe_includes_overrides_and_defaults(finished_run):
    run_dir, _ = finished_run
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["training"]["seed"] == 3
    assert resolved["training"]["precision"] == "fp32"  # defaults written out, nothing implicit
    assert "base" not in resolved


def test_training_learns_and_metrics_are_recorded(finished_run):
    run_dir, _ = finished_run
    train = read_events(run_dir, "train")
    assert [e["step"] for e in train][:3] == [10, 20, 30]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9
    assert metrics["test"]["num_examples"] == 53
    assert set(metrics["test"]["per_class"]) == {"negative", "positive"}
    assert metrics["best"]["metric"] == "f1_macro"
    evals = read_events(run_dir, "eval")
    best_value = max(e["f1_macro"] for e in evals if e["split"] == "validation")
    assert metrics["best"]["value"] == pytest.approx(best_value)


def test_predictions_have_one_row_per_test_example(finished_run):
    run_dir, _ = finished_run
    rows = [json.loads(line) for line in (run_dir / "predictions/test.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(53))
    assert {r["prediction"] for r in rows} <= {"negative", "positive"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_exported_model_loads_in_a_transformers_pipeline(finished_run):
    from transformers import pipeline

    run_dir, _ = finished_run
    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    rows = [json.loads(line) for line in (run_dir / "predictions/test.jsonl").read_text().splitlines()]
    outputs = classify([r["text"] for r in rows[:10]])
    assert [o["label"] for o in outputs] == [r["prediction"] for r in rows[:10]]
    config = json.loads((run_dir / "model/config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_refuses_to_overwrite_a_finished_run(finished_run, isolated_env, tmp_path):
    run_dir, _ = finished_run
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    path = write_recipe(tmp_path / "again.yaml", recipe)
    before = (run_dir / "metrics.json").read_text()
    result = run_launcher(["train", str(path)], isolated_env)
    assert result.returncode == 2
    assert "already holds a finished run of this recipe; set output.overwrite=true" in result.stderr
    assert (run_dir / "metrics.json").read_text() == before
    other = dict(recipe, training={**recipe["training"], "learning_rate": 0.5})
    result = run_launcher(["train", str(write_recipe(tmp_path / "other.yaml", other))], isolated_env)
    assert result.returncode == 2
    assert "holds a run of a different recipe (training.learning_rate: 0.003 -> 0.5)" in result.stderr


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"training": {"learning_rat": 1e-3}}, "training.learning_rat: unknown key; did you mean training.learning_rate?"),
        ({"data": {"text_column": "review"}}, "data.text_column='review' is not a column"),
        ({"data": {"label_column": "sentiment"}}, "data.label_column='sentiment' is not a column"),
        ({"data": {"labels": ["negative", "neutral"]}}, "label 'positive' is not in data.labels"),
        ({"model": {"name_or_path": "/nonexistent/model"}}, "model.name_or_path: /nonexistent/model does not exist"),
        ({"model": {"config_overrides": {"hidden_dropout": 0.0}}}, "model.config_overrides.hidden_dropout: not an attribute"),
        ({"training": {"micro_batch_size": 500}}, "fewer than one global batch"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, isolated_env, tmp_path, change, expected):
    recipe = toy_recipe_dict(assets, tmp_path / "run", **change)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = run_launcher(["train", str(path)], isolated_env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_verbose_shows_the_traceback(assets, isolated_env, tmp_path):
    recipe = toy_recipe_dict(assets, tmp_path / "run", data={"text_column": "review"})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    result = run_launcher(["--verbose", "train", str(path)], isolated_env)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_check_prints_the_resolved_recipe(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(assets, tmp_path / "run"))
    result = run_launcher(["check", str(path), "training.learning_rate=0.01"], isolated_env)
    check_ok(result)
    assert yaml.safe_load(result.stdout)["training"]["learning_rate"] == 0.01


def test_truncation_is_reported_not_silent(assets, isolated_env, tmp_path):
    """Examples cut at data.max_length are counted per split, in the log and in the start event."""
    import csv

    from transformers import AutoTokenizer

    limit = 10
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    expected, totals = {}, {}
    for split in ("train", "validation", "test"):
        with open(assets[split], newline="", encoding="utf-8") as handle:
            lengths = [len(tokenizer(row["text"])["input_ids"]) for row in csv.DictReader(handle)]
        expected[split], totals[split] = sum(n > limit for n in lengths), len(lengths)
    assert 0 < expected["train"] < totals["train"]  # the toy data has both kinds at this limit

    recipe = toy_recipe_dict(assets, tmp_path / "run", data={"max_length": limit}, training={"max_steps": 2})
    result = run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env)
    check_ok(result)
    start = read_events(tmp_path / "run", "start")[0]
    assert start["truncated"] == expected
    assert f"truncated at data.max_length={limit}: train {expected['train']} of {start['examples']['train']}" in result.stdout
