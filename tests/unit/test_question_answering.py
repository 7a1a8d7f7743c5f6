"""Extractive QA (launcher/tasks/question_answering.py) without training: data validation, windows and
labels, span search, cross-window answer selection and SQuAD metrics."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import datasets
import pytest
import torch

from launcher.errors import DataError, RecipeError
from launcher.recipe import load_recipe, validate_recipe
from launcher.schema import Recipe
from launcher.tasks import TASKS
from launcher.tasks.question_answering import (
    WINDOW_LIMIT,
    QuestionAnsweringTask,
    answer_problem,
    best_spans,
    choose_answers,
    parse_answers,
)


def make_recipe(model: str = "unused", metrics=("exact_match", "f1"), max_length: int = 32, **qa) -> Recipe:
    return validate_recipe({
        "name": "qa", "task": "question_answering", "model": {"name_or_path": model},
        "data": {"train": "train.jsonl", "text_column": "question", "text_pair_column": "context",
                 "label_column": "answers", "max_length": max_length},
        "question_answering": {"doc_stride": 8, "max_answer_length": 5, **qa},
        "evaluation": {"metrics": list(metrics)},
    })


def example(question: str, context: str, *answers: str, row: int = 0) -> dict:
    """A raw row whose answers are located by search (answer_start = first occurrence)."""
    return {"question": question, "context": context, "_row": row,
            "answers": {"text": list(answers), "answer_start": [context.index(a) for a in answers]}}


def raw(*rows: dict) -> datasets.Dataset:
    rows = [dict(r, _row=i) for i, r in enumerate(rows)]
    return datasets.Dataset.from_list(rows)


def test_task_is_registered_with_its_model_class():
    task = TASKS["question_answering"]
    assert task is QuestionAnsweringTask
    assert (task.auto_model_class, task.peft_task_type, task.head_modules) == (
        "AutoModelForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",))


# ---- recipe --------------------------------------------------------------------------------


def test_recipe_section_defaults():
    recipe = make_recipe()
    assert recipe.question_answering.n_best == 20 and recipe.question_answering.allow_unanswerable is False
    default = validate_recipe({**recipe.model_dump(), "question_answering": {}}).question_answering
    assert (default.doc_stride, default.max_answer_length, default.n_best) == (128, 30, 20)


def test_qa_metrics_default_to_em_and_f1_and_classification_metrics_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "qa", "task": "question_answering", "model": {"name_or_path": "m"},
                                "data": {"train": "t.jsonl"}}))
    assert load_recipe(path).evaluation.metrics == ["exact_match", "f1"]
    with pytest.raises(RecipeError, match=r"unknown metric 'accuracy'.*available: exact_match, f1"):
        load_recipe(path, ["evaluation.metrics=[accuracy]"])


@pytest.mark.parametrize("change, message", [
    ({"max_length": 64, "doc_stride": 64}, "question_answering.doc_stride=64 must be smaller than data.max_length=64"),
    ({"metrics": ("exact_match", "evaluate:squad")}, "evaluate:squad is not available for question_answering"),
])
def test_recipe_settings_that_cannot_work_are_refused(change, message):
    with pytest.raises(RecipeError, match=message):
        QuestionAnsweringTask(make_recipe(**change))


def test_context_column_is_required():
    recipe = make_recipe()
    recipe.data.text_pair_column = None
    with pytest.raises(RecipeError, match="data.text_pair_column: question_answering needs the context column"):
        QuestionAnsweringTask(recipe)


# ---- answers and rows ------------------------------------------------------------------------


def test_parse_answers_accepts_squad_mappings_and_json_text():
    assert parse_answers({"text": ["a"], "answer_start": [3]}) == (["a"], [3])
    assert parse_answers('{"text": ["a", "b c"], "answer_start": [3, 5.0]}') == (["a", "b c"], [3, 5])
    assert parse_answers({"text": [], "answer_start": []}) == ([], [])
    for bad, why in [("nope", "not JSON"), ({"text": "a", "answer_start": [0]}, "must hold lists"),
                     ({"text": ["a"], "answer_start": []}, "1 answer text"), ({"text": ["a"]}, "must be"),
                     ({"text": ["a"], "answer_start": ["x"]}, "not an integer")]:
        with pytest.raises(ValueError, match=why):
            parse_answers(bad)


def test_answer_problem_says_where_the_text_is():
    assert answer_problem("the film was good", "good", 13) is None
    assert "it occurs at 13" in answer_problem("the film was good", "good", 12)
    assert "does not occur" in answer_problem("the film was good", "bad", 0)
    assert "is empty" in answer_problem("the film", " ", 0)


def test_clean_split_refuses_a_misplaced_answer_naming_the_row():
    task = QuestionAnsweringTask(make_recipe())
    good = example("the director was", "the director was good", "good")
    bad = dict(example("the director was", "the director was bad", "bad"))
    bad["answers"] = {"text": ["bad"], "answer_start": [3]}
    with pytest.raises(DataError) as info:
        task.clean_split("train", raw(good, bad), "data.train (x.jsonl)")
    message = str(info.value)
    assert message.startswith("data.train (x.jsonl) row 2: answer 'bad' is not at answer_start 3")
    assert "it occurs at 17" in message and "question_answering.drop_bad_answers=true" in message
    assert "\n" not in message


def test_clean_split_drops_and_counts_misplaced_answers_when_asked():
    task = QuestionAnsweringTask(make_recipe(drop_bad_answers=True))
    good = example("the director was", "the director was good", "good")
    bad = dict(good, answers={"text": ["good"], "answer_start": [0]})
    cleaned, dropped = task.clean_split("validation", raw(good, bad, good), "data.validation")
    assert (len(cleaned), dropped) == (2, 1)
    assert cleaned["_qa_split"] == ["validation", "validation"]


def test_unanswerable_rows_need_allow_unanswerable():
    unanswerable = {"question": "the director was", "context": "the film was good", "answers": {"text": [], "answer_start": []}}
    with pytest.raises(DataError, match=r"row 1: the question has no answer .*allow_unanswerable=true"):
        QuestionAnsweringTask(make_recipe()).clean_split("train", raw(unanswerable), "data.train")
    cleaned, dropped = QuestionAnsweringTask(make_recipe(allow_unanswerable=True)).clean_split(
        "train", raw(unanswerable), "data.train")
    assert (len(cleaned), dropped) == (1, 0)


@pytest.mark.parametrize("row, message", [
    ({"question": None, "context": "c", "answers": {"text": [], "answer_start": []}}, "data.text_column 'question' is empty"),
    ({"question": "q", "context": "  ", "answers": {"text": [], "answer_start": []}}, "data.text_pair_column 'context' is empty"),
    ({"question": "q", "context": "c", "answers": None}, "the answers (answers) are empty"),
    ({"question": "q", "context": "c", "answers": "[1, 2]"}, 'the answers (answers) must be {"text"'),
])
def test_clean_split_refuses_malformed_rows(row, message):
    with pytest.raises(DataError) as info:
        QuestionAnsweringTask(make_recipe(allow_unanswerable=True)).clean_split("test", raw(row), "data.test")
    assert str(info.value).startswith("data.test row 1: ") and message in str(info.value)


# ---- features ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["model"])


def encode(task, tokenizer, split: str, *rows: dict) -> datasets.Dataset:
    dataset, _ = task.clean_split(split, raw(*rows), f"data.{split}")
    return dataset.map(task.encoder(tokenizer), batched=True, with_indices=True, remove_columns=dataset.column_names)


LONG = " ".join(["film"] * 20 + ["director", "good"] + ["plot"] * 28)  # 50 tokens: 3 windows at max_length 32


def test_long_context_becomes_overlapping_windows_with_ids_offsets_and_labels(tokenizer):
    task = QuestionAnsweringTask(make_recipe())  # max_length 32, doc_stride 8
    short = example("the actor was", "the actor was bad", "bad")
    features = encode(task, tokenizer, "train", short, example("the director was", LONG, "good", "director good"))
    assert features["example_index"] == [0, 1, 1, 1]
    assert features["window"] == [0, 0, 1, 2]
    assert features["example_id"] == [0, WINDOW_LIMIT, WINDOW_LIMIT + 1, WINDOW_LIMIT + 2]
    assert all(len(ids) <= 32 for ids in features["input_ids"])
    for row in features:
        ids, offsets = row["input_ids"], row["offset_mapping"]
        assert len(offsets) == len(ids) and offsets[0] is None and ids[row["cls_index"]] == tokenizer.cls_token_id
        context = [k for k, span in enumerate(offsets) if span is not None]
        assert context == list(range(context[0], len(ids) - 1))  # the context, then [SEP]
        assert all(tokenizer.convert_ids_to_tokens(ids[k]) != "[SEP]" for k in context)
        text = row["window_text"]
        assert text == (LONG if row["example_index"] else "the actor was bad")[row["window_start"]:row["window_start"] + len(text)]
        answer = row["answers"][0]
        if row["start_positions"] == row["cls_index"]:
            assert row["end_positions"] == row["cls_index"]
            assert answer not in text.split()
        else:
            span = (offsets[row["start_positions"]][0], offsets[row["end_positions"]][1])
            context_text = LONG if row["example_index"] else "the actor was bad"
            assert context_text[span[0]:span[1]] == answer
    # windows overlap by doc_stride tokens: 26 context tokens per window, the next starts 18 tokens later
    words = LONG.split()
    starts = [row["window_start"] for row in features if row["example_index"] == 1]
    assert starts == [0, len(" ".join(words[:18])) + 1, len(" ".join(words[:36])) + 1]
    long_windows = [row for row in features if row["example_index"] == 1]
    labelled = [row["window"] for row in long_windows if row["start_positions"] != row["cls_index"]]
    assert labelled == [0, 1]  # "good" is token 21: in windows 0 (tokens 0-25) and 1 (18-43), not 2 (36-49)
    assert features["answers"][1] == ["good", "director good"]


def test_unanswerable_features_point_at_cls(tokenizer):
    task = QuestionAnsweringTask(make_recipe(allow_unanswerable=True))
    row = {"question": "the director was", "context": LONG, "answers": {"text": [], "answer_start": []}}
    features = encode(task, tokenizer, "validation", row)
    assert len(features) == 3
    assert features["start_positions"] == features["end_positions"] == features["cls_index"] == [0, 0, 0]
    assert features["answers"] == [[], [], []]


def test_overlong_example_without_stride_is_refused_naming_split_and_row(tokenizer):
    task = QuestionAnsweringTask(make_recipe(doc_stride=None))
    short = example("the actor was", "the actor was bad", "bad")
    with pytest.raises(DataError) as info:
        encode(task, tokenizer, "validation", short, example("the director was", LONG, "good"))
    message = str(info.value)
    assert message.startswith("data.validation row 2: question + context do not fit in data.max_length=32 tokens")
    assert "set question_answering.doc_stride" in message


def test_question_too_long_for_the_stride_is_refused(tokenizer):
    task = QuestionAnsweringTask(make_recipe(doc_stride=20))  # 32 - 3 special - 10 question = 19 <= 20
    question = " ".join(["film"] * 10)
    with pytest.raises(DataError, match=r"data.train row 1: the question is 10 tokens, which leaves 19 context tokens per window at "
                       r"data.max_length=32; a window needs more than question_answering.doc_stride=20"):
        encode(task, tokenizer, "train", example(question, LONG, "good"))


def test_encoder_needs_a_fast_tokenizer():
    from launcher.errors import ModelError

    with pytest.raises(ModelError, match="needs a fast tokenizer"):
        QuestionAnsweringTask(make_recipe()).encoder(SimpleNamespace(is_fast=False))


# ---- span search and answer selection ---------------------------------------------------------


def brute_force(start, end, mask, max_len):
    spans = [(float(start[i] + end[j]), i, j) for i, j in itertools.product(range(len(start)), repeat=2)
             if mask[i] and mask[j] and i <= j < i + max_len]
    return sorted(spans, key=lambda s: -s[0])


def test_best_spans_is_exact_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    for max_len, n_best in ((1, 3), (4, 5), (30, 50)):
        start = torch.randn(3, 12, generator=generator)
        end = torch.randn(3, 12, generator=generator)
        mask = torch.rand(3, 12, generator=generator) > 0.3
        mask[2] = False  # a window without context tokens: no span at all
        scores, starts, ends = best_spans(start, end, mask, max_len, n_best)
        for row in range(3):
            expected = brute_force(start[row], end[row], mask[row], max_len)[:n_best]
            got = [(s, i, j) for s, i, j in zip(scores[row].tolist(), starts[row].tolist(), ends[row].tolist())
                   if s != float("-inf")]
            assert [(i, j) for _, i, j in got] == [(i, j) for _, i, j in expected]
            assert [s for s, _, _ in got] == pytest.approx([s for s, _, _ in expected])


def feature(fid, example, candidates, null=0.0, answers=("good",), loss=1.0):
    return {"id": fid, "example": example, "candidates": [list(c) for c in candidates], "null_score": null,
            "answers": list(answers), "loss": loss}


def test_choose_answers_takes_the_best_span_over_all_windows_in_any_order():
    records = [
        feature(0, 0, [(5.0, 0, 4, "film"), (1.0, 5, 9, "plot")]),
        feature(1, 0, [(7.5, 30, 34, "good")]),
        feature(2, 0, []),  # a window with no valid span
        feature(WINDOW_LIMIT, 1, [(2.0, 3, 6, "bad")], answers=("bad",)),
    ]
    for order in (records, records[::-1], [records[1], records[3], records[0], records[2]]):
        chosen = choose_answers(order, version_2=False)
        assert chosen[0]["text"] == "good" and chosen[0]["start"] == 30 and chosen[0]["score"] == 7.5
        assert chosen[1]["text"] == "bad"
    # equal scores: the lower feature id (the earlier window) wins, whatever order the ranks sent them in
    tie = [feature(1, 0, [(3.0, 30, 34, "late")]), feature(0, 0, [(3.0, 0, 4, "early")])]
    assert choose_answers(tie, version_2=False)[0]["text"] == "early"


def test_choose_answers_no_answer_rule():
    records = [feature(0, 0, [(4.0, 0, 4, "film")], null=3.0), feature(1, 0, [(2.0, 5, 9, "plot")], null=9.0)]
    # the smallest null score over the windows (3.0) against the best span (4.0)
    assert choose_answers(records, version_2=True)[0]["text"] == "film"
    assert choose_answers(records, version_2=True, null_threshold=-1.5)[0]["text"] == ""
    assert choose_answers(records, version_2=False, null_threshold=-1.5)[0]["text"] == "film"
    assert choose_answers([feature(0, 0, [], null=-50.0)], version_2=False)[0]["text"] == ""


def test_compute_metrics_v1_uses_squad_normalization_and_all_gold_answers():
    task = QuestionAnsweringTask(make_recipe())
    records = [
        feature(0, 0, [(5.0, 0, 9, "The Good.")], answers=("good", "director good"), loss=1.0),
        feature(1, 0, [(1.0, 0, 4, "plot")], answers=("good", "director good"), loss=3.0),
        feature(WINDOW_LIMIT, 1, [(2.0, 0, 9, "director bad")], answers=("bad", "director bad"), loss=2.0),
        feature(2 * WINDOW_LIMIT, 2, [(2.0, 0, 9, "very bad")], answers=("bad",), loss=2.0),
    ]
    metrics = task.compute_metrics(records)
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert (metrics["num_examples"], metrics["num_features"], metrics["loss"]) == (3, 4, 2.0)
    assert "HasAns_f1" not in metrics
    only_f1 = QuestionAnsweringTask(make_recipe(metrics=("f1",))).compute_metrics(records)
    assert "exact_match" not in only_f1 and only_f1["f1"] == metrics["f1"]


def test_compute_metrics_v2_has_and_no_answer_breakdown():
    task = QuestionAnsweringTask(make_recipe(allow_unanswerable=True))
    records = [
        feature(0, 0, [(5.0, 0, 4, "good")], null=1.0),  # answered, right
        feature(WINDOW_LIMIT, 1, [(1.0, 0, 4, "bad")], null=4.0, answers=()),  # no answer: null wins, right
        feature(2 * WINDOW_LIMIT, 2, [(6.0, 0, 4, "bad")], null=4.0, answers=()),  # no answer, but answered
    ]
    metrics = task.compute_metrics(records)
    assert metrics["exact_match"] == pytest.approx(2 / 3) and metrics["f1"] == pytest.approx(2 / 3)
    assert (metrics["HasAns_exact_match"], metrics["HasAns_total"]) == (1.0, 1)
    assert (metrics["NoAns_exact_match"], metrics["NoAns_f1"], metrics["NoAns_total"]) == (0.5, 0.5, 2)
    rows = task.prediction_rows(records, {"question": ["q0", "q1", "q2"]})
    assert [r["prediction"] for r in rows] == ["good", "", "bad"]
    assert rows[1]["null_score"] == 4.0 and rows[1]["start"] is None


def test_records_map_token_spans_to_context_characters(tokenizer):
    """From logits to character spans: valid spans only, text from the window, null score from CLS."""
    task = QuestionAnsweringTask(make_recipe(n_best=3))
    features = encode(task, tokenizer, "test", example("the director was", LONG, "good"))
    batch = task.collate(features[:], tokenizer)
    start = torch.full(batch["input_ids"].shape, -5.0)
    end = torch.full(batch["input_ids"].shape, -5.0)
    start[:, 0], end[:, 0] = 1.0, 2.0  # CLS: null score 3
    offsets = features[0]["offset_mapping"]
    good = offsets.index([LONG.index("good"), LONG.index("good") + 4])
    director = good - 1
    start[0, director], start[0, good], end[0, good], end[0, director] = 3.0, 2.0, 4.0, 0.0
    sep = batch["attention_mask"][0].sum() - 1
    start[0, sep], end[0, 2] = 100.0, 100.0  # outside the context (the last [SEP], a question token): invalid
    records = task.records(SimpleNamespace(start_logits=start, end_logits=end), batch)
    assert [r["id"] for r in records] == features["example_id"]
    assert [r["example"] for r in records] == [0, 0, 0]
    assert all(r["null_score"] == 3.0 and r["answers"] == ["good"] for r in records)
    d = LONG.index("director")
    assert records[0]["candidates"] == [[7.0, d, d + 13, "director good"], [6.0, d + 9, d + 13, "good"],
                                        [3.0, d, d + 8, "director"]]
    for r in records:
        assert len(r["candidates"]) == 3
        for score, start_char, end_char, text in r["candidates"]:
            assert LONG[start_char:end_char] == text
