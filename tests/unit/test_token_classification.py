"""Token classification task, in process: label set, row validation, first-sub-token labels,
truncation accounting, loss/targets, metrics; and the shipped example recipe."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from launcher.errors import DataError, ModelError, RecipeError
from launcher.recipe import load_recipe
from launcher.tasks import TASKS
from launcher.tasks.token_classification import TokenClassificationTask

REPO = Path(__file__).resolve().parents[2]
SOURCE = "data.validation (dev.jsonl)"


def make_task(tmp_path, **data) -> TokenClassificationTask:
    recipe = {"name": "n", "task": "token_classification", "model": {"name_or_path": "m"},
              "data": {"train": "train.jsonl", **data}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return TASKS["token_classification"](load_recipe(path))


def dataset(rows: list[dict]):
    import datasets

    split = datasets.Dataset.from_list(rows)
    return split.add_column("_row", list(range(len(rows))))


def wordpiece_tokenizer():
    """Words split into sub-tokens: alice -> ali ##ce, bobby -> bob ##by."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "ali", "##ce", "met", "bob", "##by",
                                         "in", "paris"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


TRAIN = [{"tokens": ["alice", "met", "bob"], "tags": ["B-PER", "O", "B-PER"]},
         {"tokens": ["paris"], "tags": ["B-LOC"]}]


def test_registered_with_its_model_class_and_peft_type():
    task = TASKS["token_classification"]
    assert task.auto_model_class == "AutoModelForTokenClassification"
    assert task.peft_task_type == "TOKEN_CLS" and task.head_modules == ("classifier",)


def test_label_set_is_sorted_training_tags_with_O_first(tmp_path):
    task = make_task(tmp_path)
    task.fit(dataset(TRAIN))
    assert task.label_names == ["O", "B-LOC", "B-PER"]
    assert task.model_config_kwargs()["id2label"] == {0: "O", 1: "B-LOC", 2: "B-PER"}


def test_columns_default_to_tokens_and_tags(tmp_path):
    assert make_task(tmp_path).required_columns("train") == {"data.text_column": "tokens", "data.label_column": "tags"}
    assert make_task(tmp_path, text_column="words", label_column="ner")._column("label_column") == "ner"
    with pytest.raises(RecipeError, match="data.text_pair_column: token_classification tags one sequence"):
        make_task(tmp_path, text_pair_column="other").required_columns("train")


def test_integer_tags_index_data_labels(tmp_path):
    task = make_task(tmp_path, labels=["O", "B-PER", "I-PER"])
    rows = dataset([{"tokens": ["alice", "smith", "met"], "tags": [1, 2, 0]}])
    task.fit(rows)
    assert task.clean_split("train", rows, SOURCE) == (rows, 0)
    with pytest.raises(DataError, match=r"row 1: tag 3 of word 1 'x' is not an index into data.labels \(0..2\)"):
        task.clean_split("validation", dataset([{"tokens": ["x"], "tags": [3]}]), SOURCE)
    with pytest.raises(DataError, match="the training tags are integers; give their names in data.labels"):
        make_task(tmp_path).fit(rows)


@pytest.mark.parametrize("row, message", [
    ({"tokens": ["a", "b", "c"], "tags": ["O", "O"]},
     r"data.validation \(dev.jsonl\) row 2: 3 words \(tokens\) but 2 tags \(tags\); every word needs exactly one tag"),
    ({"tokens": ["a", "rome"], "tags": ["O", "B-MISC"]},
     r"data.validation \(dev.jsonl\) row 2: tag 'B-MISC' of word 2 'rome' is not among the training tags "
     r"\['O', 'B-LOC', 'B-PER'\]; fix the row, list it in data.labels, or set data.drop_other_labels=true"),
    ({"tokens": [], "tags": []}, r"row 2: data.text_column 'tokens' is an empty list of words; remove the row"),
    ({"tokens": "alice met bob", "tags": ["O"]},
     r"row 2: data.text_column 'tokens' must be a list of words \(strings\), got the string 'alice met bob'"),
    ({"tokens": ["a"], "tags": [None]}, r"row 2: the tag of word 1 'a' is empty"),
])
def test_bad_rows_name_split_row_and_problem(tmp_path, row, message):
    task = make_task(tmp_path)
    task.fit(dataset(TRAIN))
    good = {"tokens": ["a"], "tags": ["O"]}
    if isinstance(row["tokens"], str):  # a column is one type: the whole split holds strings then
        good = {"tokens": "a", "tags": ["O"]}
        rows = dataset([row, row])
        message = message.replace("row 2", "row 1")
    else:
        rows = dataset([good, row])
    with pytest.raises(DataError, match=message):
        task.clean_split("validation", rows, SOURCE)


def test_drop_other_labels_drops_and_counts(tmp_path):
    task = make_task(tmp_path, drop_other_labels=True)
    task.fit(dataset(TRAIN))
    rows = dataset([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["B-MISC"]}, {"tokens": ["c"], "tags": ["O"]}])
    kept, dropped = task.clean_split("validation", rows, SOURCE)
    assert dropped == 1 and kept["tokens"] == [["a"], ["c"]]


def encoded(task, tokenizer, rows: list[dict]) -> dict:
    columns = {key: [row[key] for row in rows] for key in ("tokens", "tags")}
    return dict(task.encoder(tokenizer)(columns, list(range(len(rows)))))


def test_only_the_first_sub_token_of_a_word_is_supervised(tmp_path):
    task = make_task(tmp_path)
    task.fit(dataset(TRAIN))
    tokenizer = wordpiece_tokenizer()
    features = encoded(task, tokenizer, [{"tokens": ["alice", "met", "bobby", "in", "paris"],
                                          "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]}])
    assert tokenizer.convert_ids_to_tokens(features["input_ids"][0]) == \
        ["[CLS]", "ali", "##ce", "met", "bob", "##by", "in", "paris", "[SEP]"]
    O, LOC, PER = 0, 1, 2
    assert features["labels"][0] == [-100, PER, -100, O, PER, -100, O, LOC, -100]
    assert features["word_index"][0] == [-1, 0, -1, 1, 2, -1, 3, 4, -1]
    assert features["cut_words"] == [0] and features["empty_words"] == [0]


def test_truncated_words_are_counted_and_predicted_O(tmp_path):
    task = make_task(tmp_path, max_length=6)  # [CLS] ali ##ce met bob [SEP]: "in paris" cut, "bobby" keeps its first piece
    task.fit(dataset(TRAIN))
    tokenizer = wordpiece_tokenizer()
    rows = [{"tokens": ["alice", "met", "bobby", "in", "paris"], "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]},
            {"tokens": ["paris"], "tags": ["B-LOC"]}]
    features = encoded(task, tokenizer, rows)
    assert features["cut_words"] == [2, 0]
    batch = task.collate(features, tokenizer)
    assert task.count_targets(batch).item() == 3 + 1
    # A model that predicts every supervised token right: the only errors are the cut-off words.
    logits = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), 3).float() * 10
    outputs = SimpleNamespace(logits=logits)
    assert task.loss_sum(outputs, batch).item() == pytest.approx(0, abs=1e-3)
    records = task.records(outputs, batch)
    assert records[0]["prediction"] == [2, 0, 2, -1, -1] and records[0]["gold"] == [2, 0, 2, 0, 1]
    scores = task.compute_metrics(records)
    assert scores["truncated_examples"] == 1 and scores["truncated_words"] == 2
    assert scores["num_examples"] == 2 and scores["num_words"] == 6
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(3 / 4)  # paris (B-LOC) of row 1 missed
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["per_type"]["LOC"]["recall"] == 0.5
    rows_out = task.prediction_rows(records, dataset(rows))
    assert rows_out[0]["predicted_tags"] == ["B-PER", "O", "B-PER", "O", "O"] and rows_out[0]["truncated_words"] == 2


def test_metrics_follow_evaluation_metrics_and_loss_is_per_token(tmp_path):
    task = make_task(tmp_path)
    task.recipe.evaluation.metrics = ["f1"]
    task.fit(dataset(TRAIN))
    records = [{"id": 0, "gold": [2, 0], "prediction": [2, 0], "loss": 1.0, "targets": 2, "cut_words": 0, "empty_words": 0},
               {"id": 1, "gold": [1], "prediction": [0], "loss": 2.0, "targets": 1, "cut_words": 0, "empty_words": 0}]
    scores = task.compute_metrics(records)
    assert {"f1", "f1_macro", "f1_weighted"} <= set(scores) and "accuracy" not in scores and "precision" not in scores
    assert scores["loss"] == pytest.approx(3.0 / 3)


def test_slow_tokenizer_is_refused(tmp_path):
    task = make_task(tmp_path)
    task.fit(dataset(TRAIN))
    with pytest.raises(ModelError, match="needs a fast"):
        task.encoder(SimpleNamespace(is_fast=False))


def test_example_recipe_is_accepted_and_its_data_is_valid(capsys):
    from launcher.cli import main
    from launcher.data import load_validated_splits

    path = REPO / "recipes" / "ner_example.yaml"
    assert main(["check", str(path)]) == 0
    assert "task: token_classification" in capsys.readouterr().out
    recipe = load_recipe(path)
    prepared = load_validated_splits(recipe, TASKS[recipe.task](recipe))
    assert {name: len(split) for name, split in prepared.raw.items()} == {"train": 37, "validation": 9, "test": 9}
