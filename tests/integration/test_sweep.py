"""`launcher sweep` here: points run one after another through `launcher run`'s path, a stop request
stops the sweep (exit 75), the same command resumes it (finished points skipped, the stopped point
continues from its checkpoint), and the summary says what each point's metrics.json says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from conftest import wait_for_step, REPO, check_ok, losses, read_events, toy_recipe_dict, write_recipe

from launcher.recipe import load_recipe
from launcher.tasks import TASKS

STEPS = 8
GRID = ["--grid", "evaluation.micro_batch_size=8,16"]  # two points that train identically: one is the other's reference


def sweep_command(recipe, directory, *args):
    return [sys.executable, "-m", "launcher", "sweep", str(recipe), *GRID, "--dir", str(directory), *args]


def _wait_for_training(run_dir, step, process, timeout=1500):  # generous: the first point runs before it
    wait_for_step(run_dir, step, process, timeout)


@pytest.mark.slow
def test_local_sweep_stops_resumes_skips_finished_points_and_summarizes(assets, isolated_env, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", toy_recipe_dict(
        assets, tmp_path / "unused",
        training={"max_steps": STEPS, "log_every": 1},
        evaluation={"every_steps": 4, "best_metric": "accuracy"},
        model={"name_or_path": assets["model"], "config_overrides": {"hidden_dropout_prob": 0.0,
                                                                       "attention_probs_dropout_prob": 0.0}},
    ))
    directory = tmp_path / "sweep"
    first, second = directory / "micro_batch_size=8", directory / "micro_batch_size=16"

    dry = subprocess.run(sweep_command(recipe, directory, "--dry-run"), env=isolated_env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    check_ok(dry)
    assert f"0  micro_batch_size=8   {STEPS} steps on 1x1 cpu, new" in dry.stdout
    assert not directory.exists()  # a dry run writes nothing

    # 1. Point 0 runs to the end; point 1 is asked to stop mid-run (SIGUSR1 to the sweep, as Slurm would).
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="0.5")
    process = subprocess.Popen(sweep_command(recipe, directory), env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_training(second, 2, process)
        process.send_signal(signal.SIGUSR1)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:  # a failed wait: leave no sweep (and its ranks) running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 75, err[-3000:]
    assert "sweep stopped at point 1 (micro_batch_size=16); run the same command again to resume" in err
    assert json.loads((first / "status.json").read_text())["state"] == "finished"
    stopped = json.loads((second / "status.json").read_text())
    assert stopped["state"] == "stopped" and 2 <= stopped["step"] < STEPS
    plan = json.loads((directory / "sweep.json").read_text())
    assert [(p["name"], p["overrides"], p["run_dir"]) for p in plan["points"]] == [
        ("micro_batch_size=8", ["evaluation.micro_batch_size=8"], str(first)),
        ("micro_batch_size=16", ["evaluation.micro_batch_size=16"], str(second))]
    # Each point's run directory holds its own resolved recipe: the sweep's recipe with its overrides.
    for run_dir, value in ((first, 8), (second, 16)):
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        expected = load_recipe(recipe, [f"evaluation.micro_batch_size={value}", f"output.dir={run_dir}",
                                        "distributed.strategy=ddp"])
        TASKS[expected.task](expected).check_limits()  # as every run does: the default max_length meets the model's 64
        assert saved == expected.model_dump(mode="json")

    # 2. The same command again: point 0 is skipped, point 1 resumes from its checkpoint and finishes.
    finished_at = (first / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(sweep_command(recipe, directory), env=isolated_env, cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    check_ok(again)
    assert "0  micro_batch_size=8   finished: skipped" in again.stdout
    assert f"1  micro_batch_size=16  {STEPS} steps on 1x1 cpu, resuming from step-{stopped['step']:08d}" in again.stdout
    assert "=== sweep point 0" not in again.stdout and (first / "metrics.json").stat().st_mtime_ns == finished_at
    resumes = read_events(second, "resume")
    assert [e["step"] for e in resumes] == [stopped["step"]]
    assert [e["step"] for e in read_events(second, "train")] == list(range(1, STEPS + 1))  # each step once
    # Evaluation batching does not change training: the stopped-and-resumed point trained like the other.
    assert losses(second) == pytest.approx(losses(first), rel=1e-6)

    # 3. The summary: one row per point, exactly what its metrics.json says, best first.
    summary = json.loads((directory / "summary.json").read_text())
    assert {p["name"] for p in summary["points"]} == {"micro_batch_size=8", "micro_batch_size=16"}
    for row in summary["points"]:
        metrics = json.loads((directory / row["name"] / "metrics.json").read_text())
        assert row["status"] == "finished" and row["steps"] == metrics["train"]["steps"] == STEPS
        assert (row["metric"], row["best_validation"], row["best_step"]) == (
            "accuracy", metrics["best"]["value"], metrics["best"]["step"])
        assert row["test"] == {k: v for k, v in metrics["test"].items() if isinstance(v, float)}
    values = [row["best_validation"] for row in summary["points"]]
    assert values == sorted(values, reverse=True)
    assert (directory / "summary.md").read_text().count("| finished |") == 2
    # ... and the report overlays the points' curves, each point named by its directory (one recipe name)
    report = (directory / "report" / "index.html").read_text()
    assert "<img" in report and all(f"<td>{row['name']}</td>" in report for row in summary["points"])

    # 4. Once more: nothing left to run; `--summary` prints the same table it wrote.
    third = subprocess.run(sweep_command(recipe, directory), env=isolated_env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    check_ok(third)
    assert third.stdout.count("finished: skipped") == 2 and "=== sweep point" not in third.stdout
    shown = subprocess.run([sys.executable, "-m", "launcher", "sweep", "--summary", str(directory)], env=isolated_env,
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    check_ok(shown)
    assert shown.stdout.startswith((directory / "summary.md").read_text())
