"""Recipe loading: what a user sees when a recipe is wrong, and how bases and overrides combine."""

from __future__ import annotations

import pytest
import yaml

from launcher.errors import RecipeError
from launcher.recipe import all_dotted_keys, load_recipe, recipe_to_yaml

MINIMAL = {"name": "r", "model": {"name_or_path": "some/model"}, "data": {"train": "train.csv"}}


def write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.training.micro_batch_size == 8
    assert recipe.training.precision == "fp32"
    assert recipe.distributed.strategy == "auto"
    assert recipe.model.trust_remote_code is False
    assert str(recipe.output_dir()) == "runs/r"


def test_misspelled_key_names_dotted_path_and_suggestion(tmp_path):
    data = {**MINIMAL, "training": {"learning_rat": 1e-4}}
    message = error_of(write(tmp_path, data))
    assert "training.learning_rat: unknown key; did you mean training.learning_rate?" in message
    assert str(tmp_path / "recipe.yaml") in message


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    data = {**MINIMAL, "model": {"name_or_path": "m", "learning_rate": 1e-4}}
    assert "model.learning_rate: unknown key here; did you mean training.learning_rate?" in error_of(write(tmp_path, data))


def test_unknown_top_level_section(tmp_path):
    data = {**MINIMAL, "trainig": {"epochs": 1}}
    assert "trainig: unknown key; did you mean training?" in error_of(write(tmp_path, data))


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("training", {"micro_batch_size": "eight"}, "training.micro_batch_size: Input should be a valid integer"),
        ("training", {"learning_rate": -1e-4}, "training.learning_rate: Input should be greater than 0"),
        ("training", {"micro_batch_size": 0}, "training.micro_batch_size: Input should be greater than 0"),
        ("training", {"precision": "fp8"}, "training.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ("distributed", {"strategy": "zero4"}, "distributed.strategy: Input should be 'auto', 'ddp'"),
        ("evaluation", {"metrics": ["acuracy"]}, "unknown metric 'acuracy'; did you mean accuracy?"),
        ("evaluation", {"best_metric": "f1"}, "evaluation.best_metric: 'f1' is not produced by evaluation.metrics; did you mean f1_macro?"),
        ("evaluation", {"early_stopping_patience": 2}, "early_stopping_patience needs evaluation.best_metric"),
    ],
)
def test_wrong_values_name_the_field(tmp_path, section, values, expected):
    data = {**MINIMAL, section: values}
    assert expected in error_of(write(tmp_path, data))


def test_unknown_task_suggests_the_closest(tmp_path):
    message = error_of(write(tmp_path, {**MINIMAL, "task": "sequence_clasification"}))
    assert "task: unknown task 'sequence_clasification'; did you mean sequence_classification?" in message


def test_missing_required_field(tmp_path):
    message = error_of(write(tmp_path, {"name": "r", "data": {"train": "x.csv"}}))
    assert "model: required key is missing" in message


def test_base_inheritance_merges_sections_key_by_key(tmp_path):
    write(tmp_path, {**MINIMAL, "training": {"learning_rate": 1e-4, "epochs": 5}}, "base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "name": "child", "training": {"epochs": 2}}, "child.yaml")
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.training.epochs == 2  # child wins
    assert recipe.training.learning_rate == 1e-4  # inherited
    assert recipe.model.name_or_path == "some/model"


def test_base_chain_and_cycle(tmp_path):
    write(tmp_path, {"base": "c.yaml", **MINIMAL}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    write(tmp_path, {"base": "b.yaml"}, "c.yaml")
    assert "base: recipes form a cycle" in error_of(tmp_path / "a.yaml")


def test_missing_base_file(tmp_path):
    path = write(tmp_path, {"base": "nope.yaml", **MINIMAL})
    assert "base: nope.yaml not found" in error_of(path)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["training.learning_rate=3e-5", "training.micro_batch_size=4", "evaluation.every_epoch=false"])
    assert recipe.training.learning_rate == pytest.approx(3e-5)
    assert recipe.training.micro_batch_size == 4
    assert recipe.evaluation.every_epoch is False
    assert "training.micro_batch_size: Input should be a valid integer" in error_of(path, ["training.micro_batch_size=big"])
    assert "training.learning_rat: unknown key; did you mean training.learning_rate?" in error_of(path, ["training.learning_rat=1"])
    assert "expected KEY=VALUE" in error_of(path, ["training.learning_rate"])


def test_override_can_set_nested_mapping(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["model.config_overrides={hidden_dropout_prob: 0.0}", "data.labels=[neg, pos]"])
    assert recipe.model.config_overrides == {"hidden_dropout_prob": 0.0}
    assert recipe.data.labels == ["neg", "pos"]


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["training.epochs=2"])
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again.model_dump() == recipe.model_dump()


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "name: r\nmodel: [unclosed\n")
    assert "invalid YAML" in error_of(path) and "line" in error_of(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in error_of(path)


def test_recipe_reference_doc_is_current():
    """docs/recipe.md is generated from the schema; regenerate with `launcher schema > docs/recipe.md`."""
    from pathlib import Path

    from launcher.schema_doc import recipe_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    assert doc.read_text() == recipe_reference()
    for key in all_dotted_keys():
        if "." in key:
            assert f"`{key}`" in doc.read_text()
