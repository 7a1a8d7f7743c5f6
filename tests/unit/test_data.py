"""Data loading, splitting, label handling and caching: errors name the split, file and row."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import re
from pathlib import Path

import pytest
import yaml

from launcher.data import load_raw_splits, prepare_data
from launcher.errors import DataError
from launcher.model_io import load_tokenizer
from launcher.recipe import load_recipe
from launcher.tasks import TASKS


def make_recipe(tmp_path, assets, **data):
    recipe = {"name": "d", "model": {"name_or_path": assets["model"]}, "data": data, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def prepare(recipe):
    task = TASKS[recipe.task](recipe)
    return task, prepare_data(recipe, task, load_tokenizer(recipe))


def write_csv(path: Path, rows, header=("text", "label")):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [(f"good film {i}" if i % 2 else f"bad film {i}", "positive" if i % 2 else "negative") for i in range(40)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "csv.gz", "csv.bz2", "jsonl.gz"])
def test_file_formats_load_the_same_rows(tmp_path, assets, fmt):
    path = tmp_path / f"train.{fmt}"
    records = [{"text": t, "label": y} for t, y in ROWS]
    if fmt.startswith("parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        base = fmt.split(".")[0]
        if base in ("csv", "tsv"):
            sep = "\t" if base == "tsv" else ","
            text = "text" + sep + "label\n" + "".join(f"{t}{sep}{y}\n" for t, y in ROWS)
        elif base == "jsonl":
            text = "".join(json.dumps(r) + "\n" for r in records)
        else:
            text = json.dumps(records)
        opener = {"gz": gzip.open, "bz2": bz2.open}.get(fmt.rsplit(".", 1)[-1], open)
        with opener(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    recipe = make_recipe(tmp_path, assets, train=str(path), validation_size=0)
    splits, _ = load_raw_splits(recipe)
    assert splits["train"]["text"] == [t for t, _ in ROWS]
    assert splits["train"]["label"] == [y for _, y in ROWS]


def test_carved_splits_are_seeded_disjoint_and_sized(tmp_path, assets):
    recipe = make_recipe(tmp_path, assets, train=assets["train"], validation_size=0.1, test_size=50)
    splits, sources = load_raw_splits(recipe)
    again, _ = load_raw_splits(recipe)
    assert len(splits["test"]) == 50 and len(splits["validation"]) == 35 and len(splits["train"]) == 315
    rows = {name: set(ds["_row"]) for name, ds in splits.items()}
    assert not (rows["train"] & rows["test"]) and not (rows["train"] & rows["validation"]) and not (rows["test"] & rows["validation"])
    assert splits["validation"]["_row"] == again["validation"]["_row"]
    assert "carved from" in sources["validation"]


def test_labels_mapping_from_training_split_and_explicit_order(tmp_path, assets):
    recipe = make_recipe(tmp_path, assets, train=assets["train"], validation_size=0)
    task, _ = prepare(recipe)
    assert task.label_names == ["negative", "positive"]
    recipe = make_recipe(tmp_path, assets, train=assets["train"], validation_size=0, labels=["positive", "negative"])
    task, data = prepare(recipe)
    assert task.label_names == ["positive", "negative"]
    raw, features = data.raw["train"], data.features["train"]
    assert [task.label_names[i] for i in features["labels"][:20]] == raw["label"][:20]
    assert all(isinstance(y, int) for y in features["labels"])  # one label per example, not padded


def test_integer_labels_and_text_pairs(tmp_path, assets):
    path = write_csv(tmp_path / "pairs.csv", [(f"good {i}", f"film {i}", i % 3) for i in range(30)], header=("a", "b", "y"))
    recipe = make_recipe(tmp_path, assets, train=str(path), validation_size=0, text_column="a", text_pair_column="b", label_column="y")
    task, data = prepare(recipe)
    assert task.label_names == ["0", "1", "2"]
    assert data.features["train"]["labels"][:6] == [0, 1, 2, 0, 1, 2]
    # the pair is encoded as a second segment: segment 0 up to the first [SEP], segment 1 after it
    ids, segments = data.features["train"]["input_ids"][0], data.features["train"]["token_type_ids"][0]
    first_sep = ids.index(load_tokenizer(recipe).sep_token_id)
    assert set(segments[: first_sep + 1]) == {0} and set(segments[first_sep + 1:]) == {1}


def test_missing_column_names_the_file_and_suggests(tmp_path, assets):
    path = write_csv(tmp_path / "t.csv", ROWS, header=("txt", "label"))
    recipe = make_recipe(tmp_path, assets, train=str(path), validation_size=0, text_column="text")
    with pytest.raises(DataError) as info:
        prepare(recipe)
    message = str(info.value)
    assert str(path) in message and "data.text_column='text' is not a column; did you mean 'txt'?" in message


def test_label_outside_the_set_names_split_and_row(tmp_path, assets):
    train = write_csv(tmp_path / "train.csv", ROWS)
    validation = write_csv(tmp_path / "val.csv", [("ok film", "positive"), ("meh", "neutral")])
    recipe = make_recipe(tmp_path, assets, train=str(train), validation=str(validation))
    with pytest.raises(DataError) as info:
        prepare(recipe)
    message = str(info.value)
    assert f"data.validation ({validation}) row 2: label 'neutral' is not among the training labels" in message
    assert "data.drop_other_labels=true" in message


def test_drop_other_labels_counts_what_it_drops(tmp_path, assets):
    train = write_csv(tmp_path / "train.csv", ROWS + [("plot summary", "plot")] * 3)
    recipe = make_recipe(tmp_path, assets, train=str(train), validation_size=0, labels=["negative", "positive"], drop_other_labels=True)
    _, data = prepare(recipe)
    assert data.dropped["train"] == 3 and len(data.features["train"]) == 40


def test_empty_label_and_empty_text_are_errors(tmp_path, assets):
    train = write_csv(tmp_path / "train.csv", ROWS[:5] + [("some text", "")])
    recipe = make_recipe(tmp_path, assets, train=str(train), validation_size=0)
    with pytest.raises(DataError, match=r"row 6: the label \(label\) is empty"):
        prepare(recipe)
    train = write_csv(tmp_path / "train2.csv", ROWS[:5] + [("", "positive")])
    recipe = make_recipe(tmp_path, assets, train=str(train), validation_size=0)
    with pytest.raises(DataError, match=r"row 6: data.text_column 'text' is empty"):
        prepare(recipe)


def test_single_label_training_split_is_an_error(tmp_path, assets):
    train = write_csv(tmp_path / "train.csv", [("good", "positive")] * 10)
    recipe = make_recipe(tmp_path, assets, train=str(train), validation_size=0)
    with pytest.raises(DataError, match="needs at least 2"):
        prepare(recipe)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty (0 bytes)"),
        (b"text,label\n", "has no data rows"),
        ("text,label\ncaf\xe9,positive\n".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_unreadable_or_empty_files(tmp_path, assets, content, expected):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    recipe = make_recipe(tmp_path, assets, train=str(path), validation_size=0)
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare(recipe)


def test_missing_file_and_unknown_type(tmp_path, assets):
    with pytest.raises(DataError, match=r"data.train: file .*nope.csv not found"):
        load_raw_splits(make_recipe(tmp_path, assets, train=str(tmp_path / "nope.csv")))
    weird = tmp_path / "train.xlsx"
    weird.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_raw_splits(make_recipe(tmp_path, assets, train=str(weird)))


def test_tokenized_features_are_cached(tmp_path, assets):
    recipe = make_recipe(tmp_path, assets, train=assets["train"], validation=assets["validation"])
    _, first = prepare(recipe)
    _, second = prepare(recipe)
    assert all(second.cached.values())
    assert second.features["train"]["input_ids"] == first.features["train"]["input_ids"]
    changed = make_recipe(tmp_path, assets, train=assets["train"], validation=assets["validation"], max_length=4)
    _, third = prepare(changed)
    assert not third.cached["train"]  # a different max_length is a different cache entry
    assert max(len(ids) for ids in third.features["train"]["input_ids"]) == 4


def test_truncated_examples_are_counted_per_split_and_survive_the_cache(tmp_path, assets):
    long = " ".join(["wonderful"] * 40)
    rows = ROWS[:20] + [(long, "positive"), (long, "negative"), (long, "positive")]
    train = write_csv(tmp_path / "train.csv", rows)
    validation = write_csv(tmp_path / "validation.csv", ROWS[20:30] + [(long, "negative")])
    recipe = make_recipe(tmp_path, assets, train=str(train), validation=str(validation), max_length=16)
    _, first = prepare(recipe)
    assert first.truncated == {"train": 3, "validation": 1}
    flags = first.features["train"]["cut_at_max_length"]
    assert [i for i, cut in enumerate(flags) if cut] == [20, 21, 22]
    assert all(len(ids) <= 16 for ids in first.features["train"]["input_ids"])
    _, second = prepare(recipe)
    assert all(second.cached.values()) and second.truncated == first.truncated
    # An example exactly at the limit lost nothing: it is not counted.
    exact = make_recipe(tmp_path, assets, train=str(train), validation=str(validation), max_length=42)
    _, third = prepare(exact)
    lengths = [len(ids) for ids in third.features["train"]["input_ids"]]
    assert max(lengths) == 42 and third.truncated == {"train": 0, "validation": 0}


def test_dynamic_padding_pads_to_the_longest_in_the_batch(tmp_path, assets):
    recipe = make_recipe(tmp_path, assets, train=assets["train"], validation_size=0)
    task, data = prepare(recipe)
    features = data.features["train"]
    rows = features[[0, 1, 2, 3]]
    batch = task.collate(rows, load_tokenizer(recipe))
    assert batch["input_ids"].shape == (4, max(len(ids) for ids in rows["input_ids"]))
    assert batch["labels"].shape == (4,)
    assert batch["attention_mask"].sum().item() == sum(len(ids) for ids in rows["input_ids"])
