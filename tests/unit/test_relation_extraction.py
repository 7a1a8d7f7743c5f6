"""Relation extraction task, in process: entity marking, span validation, the relation recipe section,
markers as special tokens (encoder and cached-data paths agree), truncation flags, metrics; and the
shipped example recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.errors import DataError, RecipeError
from launcher.recipe import load_recipe
from launcher.tasks import TASKS
from launcher.tasks.relation_extraction import RelationExtractionTask, mark_entities

REPO = Path(__file__).resolve().parents[2]
SOURCE = "data.test (test.jsonl)"
MARKERS = ["[E1]", "[/E1]", "[E2]", "[/E2]"]


def make_task(tmp_path, model="m", **sections) -> RelationExtractionTask:
    recipe = {"name": "r", "task": "relation_extraction", "model": {"name_or_path": model},
              "data": {"train": "train.jsonl"}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return TASKS["relation_extraction"](load_recipe(path))


def row(text, head, tail, label="works_for") -> dict:
    return {"text": text, "head_start": head[0], "head_end": head[1], "tail_start": tail[0], "tail_end": tail[1],
            "label": label}


def dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows).add_column("_row", list(range(len(rows))))


TRAIN = [row("alice works for acme", (0, 5), (16, 20)), row("bob met carol", (0, 3), (8, 13), "no_relation")]


def fitted(tmp_path, **sections) -> RelationExtractionTask:
    task = make_task(tmp_path, **sections)
    task.fit(dataset(TRAIN))
    return task


def test_markers_go_around_the_spans_in_either_order():
    text = "acme hired bob smith today"
    assert mark_entities(text, (11, 20), (0, 4), ("[E1]", "[/E1]"), ("[E2]", "[/E2]")) == \
        "[E2] acme [/E2] hired [E1] bob smith [/E1] today"
    assert mark_entities(text, (0, 4), (11, 20), ("<h>", "</h>"), ("<t>", "</t>")) == \
        "<h> acme </h> hired <t> bob smith </t> today"


def test_section_defaults_and_marker_validation(tmp_path):
    task = make_task(tmp_path)
    assert task.markers == MARKERS and task.settings.no_relation_label == "no_relation"
    assert task.required_columns("train") == {
        "data.text_column": "text", "data.label_column": "label", "relation.head_start_column": "head_start",
        "relation.head_end_column": "head_end", "relation.tail_start_column": "tail_start",
        "relation.tail_end_column": "tail_end"}
    with pytest.raises(RecipeError, match=r"relation: the four entity markers must all differ"):
        make_task(tmp_path, relation={"tail_markers": ["[E1]", "[/E2]"]})
    with pytest.raises(RecipeError, match=r"relation.head_markers: Tuple should have at most 2 items"):
        make_task(tmp_path, relation={"head_markers": ["a", "b", "c"]})
    with pytest.raises(RecipeError, match=r"data.text_pair_column: relation_extraction reads one sentence"):
        make_task(tmp_path, data={"text_pair_column": "other"}).required_columns("train")


def test_no_relation_label_must_be_a_label(tmp_path):
    with pytest.raises(DataError, match=r"relation.no_relation_label: 'Other' is not one of the labels"):
        fitted(tmp_path, relation={"no_relation_label": "Other"})
    assert fitted(tmp_path, relation={"no_relation_label": None}).label_names == ["no_relation", "works_for"]


@pytest.mark.parametrize("bad, message", [
    (row("alice works for acme", (0, 5), (16, 21)), r"row 2: the tail span \[16, 21\) is outside the text \(20 characters\)"),
    (row("alice works for acme", (-1, 5), (16, 20)), r"row 2: the head span \[-1, 5\) is outside the text"),
    (row("alice works for acme", (5, 5), (16, 20)), r"row 2: the head span \[5, 5\) is empty"),
    (row("alice works for acme", (6, 2), (16, 20)), r"row 2: the head span \[6, 2\) is reversed; the end offset is exclusive"),
    (row("alice works for acme", (0, 11), (6, 20)),
     r"row 2: the head span \[0, 11\) 'alice works' and the tail span \[6, 20\) 'works for acme' overlap"),
    ({**row("alice works for acme", (0, 5), (16, 20)), "tail_end": None},
     r"row 2: relation.tail_end_column 'tail_end' is empty; expected a character offset"),
])
def test_bad_spans_name_the_row(tmp_path, bad, message):
    task = fitted(tmp_path)
    with pytest.raises(DataError, match=r"data.test \(test.jsonl\) " + message):
        task.clean_split("test", dataset([TRAIN[0], bad]), SOURCE)


def test_label_checks_are_classifications(tmp_path):
    task = fitted(tmp_path)
    with pytest.raises(DataError, match=r"row 1: label 'lives_in' is not among the training labels"):
        task.clean_split("test", dataset([row("bob lives in rome", (0, 3), (13, 17), "lives_in")]), SOURCE)


def test_markers_are_special_tokens_on_both_the_encoder_and_the_cached_path(tmp_path, assets):
    from transformers import AutoTokenizer

    task = fitted(tmp_path, model=assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    size = len(tokenizer)
    rows = {key: [r[key] for r in TRAIN] for key in TRAIN[0]}
    features = task.encoder(tokenizer)(rows, [0, 1])
    ids = tokenizer.convert_tokens_to_ids(MARKERS)
    assert ids == list(range(size, size + 4)) and set(MARKERS) <= set(tokenizer.all_special_tokens)
    assert tokenizer.convert_ids_to_tokens(features["input_ids"][0]) == \
        ["[CLS]", "[E1]", "[UNK]", "[/E1]", "[UNK]", "[UNK]", "[E2]", "[UNK]", "[/E2]", "[SEP]"]
    assert features["truncated"] == [False, False]
    # Features from the cache skip the encoder: build_model alone gives a fresh tokenizer the same ids.
    fresh = AutoTokenizer.from_pretrained(assets["model"])
    model = task.build_model(fresh)
    assert fresh.convert_tokens_to_ids(MARKERS) == ids
    assert model.get_input_embeddings().num_embeddings == size + 4 == model.config.vocab_size
    assert task.count_parameters() == sum(p.numel() for p in model.parameters())
    task.add_markers(fresh)  # idempotent
    assert len(fresh) == size + 4


def test_truncation_that_cuts_a_marker_is_flagged_and_counted(tmp_path, assets):
    from transformers import AutoTokenizer

    task = make_task(tmp_path, model=assets["model"], data={"max_length": 6})
    task.fit(dataset(TRAIN))
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    rows = {key: [r[key] for r in TRAIN] for key in TRAIN[0]}
    assert task.encoder(tokenizer)(rows, [0, 1])["truncated"] == [True, True]
    records = [{"id": 0, "label": 1, "prediction": 1, "loss": 0.5, "probabilities": [0.1, 0.9], "truncated": True},
               {"id": 1, "label": 0, "prediction": 0, "loss": 1.5, "probabilities": [0.8, 0.2], "truncated": False}]
    assert task.compute_metrics(records)["truncated_examples"] == 1


def test_marker_embeddings_cannot_be_exported_by_adapter_methods(tmp_path, assets):
    from transformers import AutoTokenizer

    task = fitted(tmp_path, model=assets["model"], finetune={"method": "adapter"})
    with pytest.raises(RecipeError, match=r"finetune.method=adapter: relation_extraction adds the entity markers"):
        task.build_model(AutoTokenizer.from_pretrained(assets["model"]))


def test_metrics_leave_out_no_relation(tmp_path):
    task = fitted(tmp_path, data={"labels": ["no_relation", "works_for", "lives_in"]})

    def rec(i, label, prediction):
        return {"id": i, "label": label, "prediction": prediction, "loss": 1.0, "probabilities": [], "truncated": False}

    # works_for right, lives_in predicted no_relation, no_relation right, no_relation predicted works_for
    scores = task.compute_metrics([rec(0, 1, 1), rec(1, 2, 0), rec(2, 0, 0), rec(3, 0, 1)])
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5 and scores["support"] == 2
    assert scores["accuracy"] == 0.5 and scores["num_examples"] == 4 and scores["loss"] == 1.0
    assert set(scores["per_relation"]) == {"works_for", "lives_in"}
    assert scores["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_example_recipe_is_accepted_and_its_data_is_valid(capsys):
    from launcher.cli import main
    from launcher.data import load_validated_splits

    path = REPO / "recipes" / "relation_example.yaml"
    assert main(["check", str(path)]) == 0
    assert "task: relation_extraction" in capsys.readouterr().out
    recipe = load_recipe(path)
    prepared = load_validated_splits(recipe, TASKS[recipe.task](recipe))
    assert {name: len(split) for name, split in prepared.raw.items()} == {"train": 30, "validation": 7, "test": 7}
