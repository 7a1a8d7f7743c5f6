"""The pure parts of seeing a run: which scalars trackers get, when progress is drawn, the report's
smoothing, and which load snippet a model card shows for each fine-tuning method."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from launcher.model_card import CardFacts, load_snippet
from launcher.progress import Progress
from launcher.recipe import validate_recipe
from launcher.report import smoothed
from launcher.tracking import scalars

MINIMAL = {"name": "r", "model": {"name_or_path": "base/model"}, "data": {"train": "train.csv"}}


def test_trackers_get_the_scalars_of_metrics_jsonl_grouped_by_kind():
    train = {"time": 1.0, "event": "train", "step": 5, "epoch": 0.1, "loss": 0.7, "lr": 1e-3, "grad_norm": 0.2,
             "samples_per_second": 120.0, "elapsed_s": 3.0, "window_s": 0.3, "samples": 40, "tokens": 402,
             "padded_tokens": 568}
    step, values = scalars(train)
    assert step == 5
    assert values == {"train/epoch": 0.1, "train/loss": 0.7, "train/lr": 1e-3, "train/grad_norm": 0.2,
                      "train/samples_per_second": 120.0, "train/elapsed_s": 3.0, "train/window_s": 0.3,
                      "train/samples": 40, "train/tokens": 402, "train/padded_tokens": 568}
    evaluation = {"time": 2.0, "event": "eval", "split": "validation", "step": 20, "accuracy": 0.9, "loss": 0.3,
                  "num_examples": 37}
    assert scalars(evaluation) == (20, {"validation/accuracy": 0.9, "validation/loss": 0.3,
                                        "validation/num_examples": 37})
    first = {"event": "first_step", "step": 1, "seconds_in_loop": 0.1, "rank_parameter_bytes": 87304}
    assert scalars(first) == (1, {"memory/rank_parameter_bytes": 87304})
    assert scalars({"event": "end", "step": 50, "peak_rss_bytes": 6e8}) == (50, {"memory/peak_rss_bytes": 6e8})
    assert scalars({"event": "checkpoint", "step": 20, "path": "x"}) == (20, {})


def test_progress_is_drawn_on_a_terminal_only():
    pipe = io.StringIO()
    quiet = Progress(Console(file=pipe), enabled=True)  # a file, not a terminal
    assert not quiet.enabled
    with quiet.task("training", total=3) as bar:
        bar.advance()
    assert pipe.getvalue() == "" and not bar.shown

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    assert not Progress(terminal, enabled=False).enabled  # another rank: never
    progress = Progress(terminal, enabled=True)
    with progress.task("training", total=4) as bar:
        bar.advance(2)
        bar.update("loss 0.5000")
        with progress.task("evaluating validation", total=2) as inner:
            inner.advance()
    progress.close()
    assert "training" in screen.getvalue() and "━" in screen.getvalue() and "evaluating validation" in screen.getvalue()


def test_smoothing_is_tensorboards_debiased_moving_average():
    assert smoothed([2.0], 0.6) == [2.0]  # debiased: the first value is itself
    values = smoothed([1.0, 0.0, 0.0], 0.5)
    assert values == pytest.approx([1.0, (0.25) / 0.75, (0.125) / 0.875])


def facts(method: str, auto="AutoModelForSequenceClassification", merged=False, **recipe) -> CardFacts:
    data = {**MINIMAL, "finetune": {"method": method}, **recipe}
    return CardFacts(recipe=validate_recipe(data), auto_model_class=auto,
                     model_config={"num_labels": 2, "id2label": {0: "neg", 1: "pos"}}, data={}, plan={}, step=1,
                     example="a fine film", merged=merged)


@pytest.mark.parametrize("method, expected", [
    ("full", "classifier = pipeline('text-classification', model='/runs/x/model')"),
    ("bitfit", "pipeline('text-classification'"),
    ("lora", "model = PeftModel.from_pretrained(base, '/runs/x/model')"),
    ("ia3", "PeftModel.from_pretrained"),
    ("prompt_tuning", "PeftModel.from_pretrained"),
    ("adapter", "model, tokenizer = load_exported('/runs/x/model')"),
])
def test_the_load_snippet_fits_the_method(method, expected):
    snippet = load_snippet(facts(method), "/runs/x/model")
    assert expected in snippet
    compile(snippet, "<card>", "exec")
    if method == "lora":  # the base model is built with the task's labels before the adapter goes on
        assert "AutoModelForSequenceClassification.from_pretrained('base/model', num_labels=2, " \
               "id2label={0: 'neg', 1: 'pos'})" in snippet


def test_a_merged_export_loads_as_a_plain_model():
    assert "pipeline('text-classification'" in load_snippet(facts("lora", merged=True), "/m")


def test_models_without_a_transformers_pipeline_load_with_their_auto_class():
    snippet = load_snippet(facts("full", auto="AutoModelForSeq2SeqLM"), "/m")
    assert "AutoModelForSeq2SeqLM.from_pretrained('/m')" in snippet and "model.generate" in snippet
    chat = CardFacts(**{**facts("full", auto="AutoModelForCausalLM").__dict__, "example": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert "pipeline('text-generation'" in load_snippet(chat, "/m")
    assert "[{'role': 'user', 'content': 'hi'}]" in load_snippet(chat, "/m")  # up to the reply it should write


def test_runs_of_one_recipe_are_told_apart_by_their_paths():
    from pathlib import Path

    from launcher.report import distinct_names

    runs = distinct_names([_run(Path("/s/lr=1/run"), "toy"), _run(Path("/s/lr=2/run"), "toy")])
    assert [r.name for r in runs] == ["lr=1/run", "lr=2/run"]
    runs = distinct_names([_run(Path("/s/a"), "toy"), _run(Path("/s/b"), "toy")])
    assert [r.name for r in runs] == ["a", "b"]
    assert [r.name for r in distinct_names([_run(Path("/x"), "one"), _run(Path("/x"), "two")])] == ["one", "two"]


def _run(path, name):
    from dataclasses import fields

    from launcher.report import RunData

    values = {f.name: None for f in fields(RunData)}
    return RunData(**{**values, "path": path, "name": name, "events": []})
