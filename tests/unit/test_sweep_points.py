"""Sweeps without running anything: grid expansion and its order, point names, the sweep file's checks,
every point's recipe checked before any starts, and the summary's ranking."""

from __future__ import annotations

import json

import pytest
import yaml

from launcher.cli import main
from launcher.errors import RecipeError
from launcher.launch.slurm import array_spec
from launcher.launch.sweep import (
    expand,
    load_point_recipes,
    make_sweep,
    parse_grid_args,
    point_names,
    read_sweep_file,
    split_values,
    value_text,
)
from launcher.launch.sweep_summary import markdown_table, summarize
from launcher.recipe import parse_override

MINIMAL = {"name": "r", "model": {"name_or_path": "some/model"}, "data": {"train": "train.csv"}}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    return path


def test_values_split_on_top_level_commas_only():
    assert split_values("1e-5,3e-5") == ["1e-5", "3e-5"]
    assert split_values("[accuracy,f1],[loss]") == ["[accuracy,f1]", "[loss]"]
    assert split_values("{a: 1, b: 2},'x,y'") == ["{a: 1, b: 2}", "'x,y'"]


def test_grid_is_the_cartesian_product_first_key_slowest():
    grid = parse_grid_args(["training.learning_rate=1e-5,3e-5", "training.seed=1,2,3"])
    points = expand(grid)
    assert points == [{"training.learning_rate": lr, "training.seed": seed}
                      for lr in ("1e-5", "3e-5") for seed in ("1", "2", "3")]
    # listed points x grid: every listed point meets every grid combination
    listed = [{"model.name_or_path": "a"}, {"model.name_or_path": "b"}]
    combined = expand({"training.seed": ["1", "2"]}, listed)
    assert [(p["model.name_or_path"], p["training.seed"]) for p in combined] == [("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]


@pytest.mark.parametrize("args, expected", [
    (["training.seed"], "expected KEY=V1,V2"),
    (["training.seed=1,,2"], "an empty value"),
    (["training.seed=1", "training.seed=2"], "given twice"),
    (["=1,2"], "expected KEY=V1,V2"),
])
def test_bad_grid_options(args, expected):
    with pytest.raises(RecipeError, match=expected):
        parse_grid_args(args)


def test_point_names_are_stable_safe_and_distinct():
    points = expand(parse_grid_args(["training.learning_rate=1e-5,3.0e-5", "training.seed=1,2"]))
    assert point_names(points) == ["learning_rate=1e-05_seed=1", "learning_rate=1e-05_seed=2",
                                   "learning_rate=3e-05_seed=1", "learning_rate=3e-05_seed=2"]
    # A grown grid keeps the names (and so the finished run directories) of the points it had.
    grown = expand(parse_grid_args(["training.learning_rate=1e-5,3.0e-5,1e-4", "training.seed=1,2"]))
    assert set(point_names(points)) <= set(point_names(grown))
    # Two swept keys ending alike are named in full; unsafe characters become '-'.
    names = point_names([{"training.seed": "1", "data.seed": "2", "evaluation.metrics": "[accuracy, f1]"}])
    assert names == ["training.seed=1_data.seed=2_metrics=-accuracy-f1"]
    assert all("/" not in n and " " not in n for n in point_names([{"model.name_or_path": "org/model name"}]))
    # Values that differ only in unsafe characters still get distinct directories.
    clash = point_names([{"model.name_or_path": "a/b"}, {"model.name_or_path": "a:b"}])
    assert len(set(clash)) == 2 and all(n.startswith("name_or_path=a-b-") for n in clash)
    long = point_names([{"model.name_or_path": "x" * 300}])[0]
    assert len(long) <= 110


def test_sweep_file_values_reach_the_recipe_unchanged(tmp_path, recipe):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "grid:\n  training.learning_rate: [1.0e-5, 3.0e-5]\n"
        "points:\n  - {model.revision: 'yes', evaluation.metrics: [accuracy, f1]}\n  - {model.revision: '1e-5'}\n")
    grid, points = read_sweep_file(sweep_file)
    sweep = make_sweep(recipe, [], grid, points, tmp_path / "sweep")
    loaded = load_point_recipes(sweep)
    assert [r.training.learning_rate for r in loaded] == [1e-5, 3e-5, 1e-5, 3e-5]
    # 'yes' and '1e-5' are strings in the sweep file and stay strings (not True, not a float)
    assert [r.model.revision for r in loaded] == ["yes", "yes", "1e-5", "1e-5"]
    assert loaded[0].evaluation.metrics == ["accuracy", "f1"]
    assert [r.output.dir for r in loaded] == [str(p.run_dir) for p in sweep.points]
    for value in ("yes", "1e-5", 3e-5, [1, "a b"], {"k": "v: w"}, "a: b", True, None):
        assert parse_override(f"x={value_text(value)}")[1] == value


@pytest.mark.parametrize("text, expected", [
    ("gird:\n  training.seed: [1, 2]\n", "gird: unknown key; did you mean grid?"),
    ("grid:\n  training.seed: 1\n", "grid.training.seed: give a non-empty list of values"),
    ("grid:\n  training: {seed: [1, 2]}\n", "grid.training: a section; name each key in full instead, e.g. training.seed"),
    ("points: [training.seed]\n", "points[1]: must be a mapping"),
    ("- a\n", "a sweep file is a mapping with grid: and/or points:"),
    ("grid: [1\n", "not a readable YAML file"),
])
def test_bad_sweep_files(tmp_path, text, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        read_sweep_file(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_duplicate_points_and_output_dir_are_refused(tmp_path, recipe):
    sweep = make_sweep(recipe, [], {}, [{"training.seed": "1"}, {"training.seed": "2"}, {"training.seed": "1.0"}], tmp_path)
    with pytest.raises(RecipeError, match=r"sweep point 2 \(training.seed=1.0\) gives the same recipe as point 0"):
        load_point_recipes(sweep)
    with pytest.raises(RecipeError, match="sets output.dir for each point; use --dir"):
        make_sweep(recipe, ["output.dir=x"], {"training.seed": ["1"]}, None, tmp_path)
    with pytest.raises(RecipeError, match="use --dir instead"):
        make_sweep(recipe, [], {"output.dir": ["a", "b"]}, None, tmp_path)


def test_default_directory_is_named_after_the_recipe(tmp_path, recipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = make_sweep(recipe, ["name=other"], {"training.seed": ["1"]}, None, None)
    assert sweep.directory == tmp_path / "runs" / "other-sweep"
    assert sweep.points[0].run_dir == tmp_path / "runs" / "other-sweep" / "seed=1"


def test_a_bad_point_stops_the_sweep_before_anything_is_written(tmp_path, recipe, capsys):
    """Point 5 of 6 has a bad value: one line naming the point and the key, exit 2, nothing written."""
    code = main(["sweep", str(recipe), "--grid", "training.learning_rate=1e-5,3e-5,-1", "--grid", "training.seed=1,2",
                 "--dir", str(tmp_path / "sweep")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.strip().splitlines() == [
        f"error: sweep point 4 (learning_rate=-1_seed=1): {recipe} (with overrides): "
        "training.learning_rate: Input should be greater than 0 (got -1)"]
    assert not (tmp_path / "sweep").exists()
    code = main(["sweep", str(recipe), "--grid", "training.learnin_rate=1e-5", "--dir", str(tmp_path / "sweep")])
    assert code == 2 and "training.learnin_rate: unknown key; did you mean training.learning_rate?" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--grid", "training.seed=1", "--array", "2"], "--array does not apply to a local sweep (add --slurm for a job array)"),
    (["--grid", "training.seed=1", "--slurm", "--nproc", "2"], "--nproc does not apply to a Slurm sweep"),
    (["--grid", "training.seed=1", "--slurm"], "give --nodes and --gpus-per-node"),
    ([], "no points; give --grid"),
])
def test_options_of_the_other_mode_are_refused(recipe, capsys, args, expected):
    assert main(["sweep", str(recipe), *args]) == 2
    assert expected in capsys.readouterr().err


def test_array_spec_compresses_indices_and_caps():
    assert array_spec([0, 1, 2, 5]) == "0-2,5"
    assert array_spec([1, 3, 4], 2) == "1,3-4%2"
    assert array_spec([7]) == "7"


# ---- summary -------------------------------------------------------------------------------------

def _fake_run(run_dir, recipe_data, metrics=None, status=None):
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_data))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))


@pytest.mark.parametrize("best_metric, expected_order", [("accuracy", ["b", "a", "c", "d"]), ("loss", ["a", "b", "c", "d"])])
def test_summary_ranks_in_the_metrics_direction(tmp_path, recipe, best_metric, expected_order):
    """Accuracy: higher first; loss (lower is better for every task): lower first. A run without
    metrics (stopped) and one not started come last, in sweep order."""
    sweep = tmp_path / "sweep"
    values = {"a": (0.70, 0.30), "b": (0.80, 0.40)}  # (accuracy, loss)
    entries = []
    for index, name in enumerate("abcd"):
        run_dir = sweep / name
        entries.append({"index": index, "name": name, "overrides": [f"training.seed={index}"], "run_dir": str(run_dir)})
        data = {**MINIMAL, "evaluation": {"best_metric": best_metric}}
        if name in values:
            accuracy, loss = values[name]
            scores = {"accuracy": accuracy, "loss": loss, "num_examples": 10, "per_class": {"x": {"f1": 1.0}}}
            _fake_run(run_dir, data, {"validation": scores, "test": {"accuracy": accuracy - 0.1, "loss": loss + 0.1},
                                      "best": {"metric": best_metric, "value": scores[best_metric], "step": 7},
                                      "train": {"steps": 10}}, {"state": "finished", "step": 10})
        elif name == "c":
            _fake_run(run_dir, data, status={"state": "stopped", "step": 4})
    (sweep / "sweep.json").write_text(json.dumps({"recipe": str(recipe), "points": entries}))
    summary = summarize(sweep)
    assert [p.name for p in summary.points] == expected_order
    first = summary.points[0]
    assert first.metric == best_metric and first.best_step == 7 and first.steps == 10
    assert first.validation == {"accuracy": values[first.name][0], "loss": values[first.name][1]}  # scalars only
    assert (summary.points[2].status, summary.points[2].steps, summary.points[3].status) == ("stopped", 4, "new")
    table = markdown_table(summary)
    direction = "lower is better" if best_metric == "loss" else "higher is better"
    assert f"best first by validation {best_metric} ({direction})" in table
    assert f"| 1 | {expected_order[0]} | finished | 10 |" in table


def test_summary_without_best_metric_uses_the_tasks_headline(tmp_path, recipe):
    sweep = tmp_path / "sweep"
    run_dir = sweep / "p"
    _fake_run(run_dir, MINIMAL, {"validation": {"accuracy": 0.5, "loss": 0.7}, "test": {"accuracy": 0.4}, "best": None,
                                 "train": {"steps": 3}})
    (sweep / "sweep.json").write_text(json.dumps({"recipe": str(recipe), "points": [
        {"index": 0, "name": "p", "overrides": [], "run_dir": str(run_dir)}]}))
    point = summarize(sweep).points[0]
    assert (point.metric, point.greater_is_better, point.best_validation, point.test) == ("accuracy", True, 0.5, {"accuracy": 0.4})


def test_summary_of_a_directory_without_a_sweep(tmp_path, capsys):
    assert main(["sweep", "--summary", str(tmp_path)]) == 2
    assert "no sweep.json here" in capsys.readouterr().err
