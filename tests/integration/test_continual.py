"""A continual run end to end (`launcher run` on a recipe with `continual:`): two stages with replay, the
second stopped mid-stage and resumed (finished stage skipped, buffer unchanged, training continued from the
checkpoint); the forgetting matrix is made of the real per-stage evaluations; and 2 ranks give the same
buffer, the same training and the same matrix as 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from assets import write_toy_topic_csv
import torch
from conftest import wait_for_step, BIN, REPO, assert_same_losses, check_ok, free_port, losses, read_events, toy_recipe_dict, write_recipe

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
REPLAY_FILES = ("buffer.jsonl", "train.jsonl", "validation.jsonl", "test.jsonl")


def run_command(recipe, *args):
    return [sys.executable, "-m", "launcher", "run", str(recipe), *args]


def _wait_for_step(run_dir, step, process, timeout=900):
    wait_for_step(run_dir, step, process, timeout)


def replay_files(stage_dir) -> dict:
    return {name: (stage_dir / "replay" / name).read_bytes() for name in REPLAY_FILES}


@pytest.mark.slow
def test_replay_run_resumes_mid_stage_and_two_ranks_equal_one(assets, isolated_env, tmp_path):
    topic = tmp_path / "topic"
    write_toy_topic_csv(topic / "train.csv", 120, seed=1)
    write_toy_topic_csv(topic / "test.csv", 29, seed=2)
    recipe = toy_recipe_dict(
        assets, tmp_path / "one",
        model={"name_or_path": assets["model"], "config_overrides": NO_DROPOUT},
        training={"max_steps": 6, "log_every": 1, "micro_batch_size": 4, "global_batch_size": 8},
    )
    recipe["data"] = {"max_length": 32}
    recipe["continual"] = {
        "strategy": "replay", "replay": {"buffer_size": 24, "ratio": 0.2, "seed": 7},
        "stages": [
            {"name": "sentiment", "data": {"train": assets["train"], "validation": assets["validation"],
                                           "test": assets["test"]}},
            {"name": "topic", "data": {"train": str(topic / "train.csv"), "test": str(topic / "test.csv"),
                                       "validation_size": 0.1, "text_column": "sentence", "label_column": "topic"},
             "training": {"max_steps": 8}},
        ],
    }
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    one, two = tmp_path / "one", tmp_path / "two"
    first, second = one / "stages" / "0-sentiment", one / "stages" / "1-topic"

    # 1. Stage 0 runs to the end; stage 1 is asked to stop mid-run (SIGUSR1, as Slurm would).
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="0.5")
    process = subprocess.Popen(run_command(path), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _wait_for_step(second, 2, process)
        process.send_signal(signal.SIGUSR1)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 75, err[-3000:]
    assert "continual run stopped at stage 1 (topic); run the same command again to resume" in err
    stopped = json.loads((second / "status.json").read_text())
    assert stopped["state"] == "stopped" and 2 <= stopped["step"] < 8
    buffer_before = replay_files(second)
    first_metrics = (first / "metrics.json").stat().st_mtime_ns

    # 2. The same command: stage 0 skipped (not trained again), stage 1 resumes from its checkpoint. (With
    # output.report on, which a resume may change: the run ends by writing its report.)
    resumed = subprocess.run(run_command(path, "output.report=true"), env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(resumed)
    assert "0  sentiment  finished: skipped" in resumed.stdout
    assert (first / "metrics.json").stat().st_mtime_ns == first_metrics
    assert [e["step"] for e in read_events(second, "resume")] == [stopped["step"]]
    assert replay_files(second) == buffer_before  # the same buffer and mixed file after the resume
    buffer = [json.loads(line) for line in buffer_before["buffer.jsonl"].decode().splitlines()]
    assert len(buffer) == 24 and {row["stage"] for row in buffer} == {0}
    train_rows = buffer_before["train.jsonl"].decode().splitlines()
    assert len(train_rows) == 108 + 24  # 120 - 12 carved for validation, and min(24, 0.2 x 108 / 0.8 = 27) replayed

    # The matrix is the per-stage evaluations: each cell is what `launcher eval` wrote, and the diagonal equals
    # the stage run's own test accuracy (the same weights on the same split, evaluated twice).
    result = json.loads((one / "metrics.json").read_text())["continual"]
    assert result["stages"] == ["sentiment", "topic"] and result["labels"] == ["negative", "positive", "music", "other"]
    matrix = result["matrix"]
    for row, cells in zip(matrix, result["cells"]):
        assert row == [json.loads(open(cell).read())["metrics"]["accuracy"] for cell in cells]
    assert matrix[0][0] == json.loads((first / "metrics.json").read_text())["test"]["accuracy"]
    assert matrix[1][1] == json.loads((second / "metrics.json").read_text())["test"]["accuracy"]
    assert result["average_accuracy"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
    assert result["average_forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
    assert result["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert "| topic | " in resumed.stdout  # the table is printed

    # The run's report shows the matrix (rows: after stage i; columns: stage j) with metrics.json's values, the
    # summary numbers, a heatmap, and the report of the stage that wrote one (stage 1; stage 0 was skipped).
    assert f"report: {one / 'report' / 'index.html'}" in resumed.stdout
    page = (one / "report" / "index.html").read_text()
    assert f"<tr><td>after sentiment</td><td>{matrix[0][0]:.4f}</td><td></td></tr>" in page
    assert f"<tr><td>after topic</td><td>{matrix[1][0]:.4f}</td><td>{matrix[1][1]:.4f}</td></tr>" in page
    for key, label in (("average_accuracy", "average accuracy"), ("average_forgetting", "average forgetting"),
                       ("backward_transfer", "backward transfer")):
        assert f'<div class="k">{label}</div><div class="v">{result[key]:.4f}</div>' in page
    assert page.count('<img src="data:image/png;base64,') == 1
    assert 'href="../stages/1-topic/report/index.html"' in page and (second / "report" / "index.html").is_file()

    # 3. Two ranks, uninterrupted: the same buffer, the same training, the same matrix.
    ranks = subprocess.run(run_command(path, "--nproc", "2", f"output.dir={two}"), env=isolated_env, cwd=REPO,
                           capture_output=True, text=True, timeout=900)
    check_ok(ranks)
    assert replay_files(two / "stages" / "1-topic") == buffer_before
    for stage in ("0-sentiment", "1-topic"):
        assert_same_losses(losses(two / "stages" / stage), losses(one / "stages" / stage))
    two_result = json.loads((two / "metrics.json").read_text())["continual"]
    assert two_result["matrix"] == matrix


def fisher_distance(fisher_file, model_dir) -> float:
    """sum F (theta - theta*)^2 of an exported model against a `launcher fisher` file."""
    from safetensors.torch import load_file

    tensors, weights = load_file(str(fisher_file)), load_file(str(model_dir / "model.safetensors"))
    return sum(float((tensors[f"fisher.{n}"] * (weights[n] - tensors[f"anchor.{n}"]) ** 2).sum())
               for n in weights if f"fisher.{n}" in tensors)


@pytest.fixture(scope="module")
def ewc_run(assets, isolated_env, tmp_path_factory) -> dict:
    """A two-stage EWC continual run (1 process), and its second stage's recipe trained again without the penalty."""
    tmp_path = tmp_path_factory.mktemp("ewc")
    topic = tmp_path / "topic"
    write_toy_topic_csv(topic / "train.csv", 80, seed=1)
    write_toy_topic_csv(topic / "test.csv", 21, seed=2)
    recipe = toy_recipe_dict(
        assets, tmp_path / "ewc",
        model={"name_or_path": assets["model"], "config_overrides": NO_DROPOUT},
        training={"max_steps": 6, "log_every": 1},
        evaluation={"micro_batch_size": 32},
    )
    recipe["data"] = {"max_length": 32}
    recipe["continual"] = {
        "strategy": "ewc", "ewc": {"weight": 1.0e4, "fisher_samples": 40},
        "stages": [
            {"name": "sentiment", "data": {"train": assets["train"], "validation": assets["validation"],
                                           "test": assets["test"]}},
            {"name": "topic", "data": {"train": str(topic / "train.csv"), "test": str(topic / "test.csv"),
                                       "validation_size": 0.1, "text_column": "sentence", "label_column": "topic"}},
        ],
    }
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    first, second = tmp_path / "ewc" / "stages" / "0-sentiment", tmp_path / "ewc" / "stages" / "1-topic"
    result = subprocess.run(run_command(path), env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(result)
    # The same stage trained without the penalty (its recipe, ewc removed).
    naive = tmp_path / "naive-topic"
    plain = subprocess.run([sys.executable, "-m", "launcher", "train", str(second / "recipe.yaml"), "ewc=null",
                            f"output.dir={naive}"], env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(plain)
    return {"recipe": path, "run": tmp_path / "ewc", "first": first, "second": second, "naive": naive,
            "stdout": result.stdout, "tmp": tmp_path}


@pytest.mark.slow
def test_ewc_run_holds_the_fisher_weighted_distance_and_two_rank_fisher_equals_one(ewc_run, isolated_env):
    path, first, second, naive = ewc_run["recipe"], ewc_run["first"], ewc_run["second"], ewc_run["naive"]
    fisher_file = second / "ewc" / "fisher.safetensors"
    assert "ewc: the Fisher of sentiment's model on its training data" in ewc_run["stdout"]
    assert json.loads((ewc_run["run"] / "metrics.json").read_text())["continual"]["strategy"] == "ewc"

    # The stage trained without the penalty moves further in the directions the Fisher says matter for the
    # first stage.
    held, free = fisher_distance(fisher_file, second / "model"), fisher_distance(fisher_file, naive / "model")
    assert held < 0.5 * free, (held, free)

    # The Fisher on 2 ranks (each its share of the examples, all-reduced) equals the one-process Fisher.
    from safetensors.torch import load_file

    from launcher.launch.continual import make_continual

    run = make_continual(path, [])
    two = ewc_run["tmp"] / "fisher-2"
    command = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "launcher", "fisher",
               str(path), *run.overrides(run.stages[0], training=False), "--checkpoint", str(first / "model"),
               "--output", str(two), "--samples", "40"]
    check_ok(subprocess.run(command, env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900))
    one_rank, two_ranks = load_file(str(fisher_file)), load_file(str(two / "fisher.safetensors"))
    assert sorted(one_rank) == sorted(two_ranks)
    for name, tensor in one_rank.items():
        assert torch.allclose(two_ranks[name], tensor, rtol=1e-5, atol=1e-12), name
    assert any(float(t.abs().sum()) > 0 for n, t in one_rank.items() if n.startswith("fisher."))


@pytest.mark.slow
def test_ewc_stage_under_zero2_equals_one_process_and_the_penalty_holds(ewc_run, isolated_env):
    """The EWC stage's recipe on 2 ranks under ZeRO-2 (DeepSpeed: its own engine, backward and step), at the
    1-process run's global batch: the same per-step losses as the 1-process EWC stage (the penalty steers
    every step after the first, once per step, whatever the world size), and the penalty is there under
    DeepSpeed (the losses leave the penalty-free run's; the export is as close to the anchor as the 1-process
    one). Without a penalty, 1 process, DDP and ZeRO-2 on 2 ranks already agree (test_distributed); this is
    the penalty's part."""
    second, naive, out = ewc_run["second"], ewc_run["naive"], ewc_run["tmp"] / "topic-zero2"
    result = subprocess.run([sys.executable, "-m", "launcher", "run", str(second / "recipe.yaml"), "--nproc", "2",
                             "--strategy", "zero2", "training.micro_batch_size=4", "training.global_batch_size=8",
                             "evaluation.every_epoch=false", f"output.dir={out}"],
                            env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(result)
    start = read_events(out, "start")[0]
    assert (start["world_size"], start["strategy"]) == (2, "zero2")
    zero2, one, free = losses(out), losses(second), losses(naive)
    assert len(zero2) == 6
    assert_same_losses(zero2, one)
    # Without the penalty the same steps give other losses (step 1 starts at the anchor, where the penalty and its
    # gradient are 0, so steps 1 and 2 are the same; from step 3 on they differ).
    assert free[:2] == pytest.approx(zero2[:2], rel=1e-5)
    assert max(abs(a - b) / abs(b) for a, b in zip(zero2[2:], free[2:])) > 1e-3, (zero2, free)
    fisher_file = second / "ewc" / "fisher.safetensors"
    held = fisher_distance(fisher_file, out / "model")
    assert held == pytest.approx(fisher_distance(fisher_file, second / "model"), rel=1e-3)
    assert held < 0.5 * fisher_distance(fisher_file, naive / "model")


@pytest.mark.slow
def test_per_stage_evaluation_predicts_among_the_stage_labels(ewc_run, isolated_env):
    """The forgetting matrix's evaluation with label_space per_stage (data.label_groups, as the continual run
    passes it): the last stage's model on the first stage's test split answers among that stage's labels,
    with the shared evaluation's probabilities renormalized over them (the same model, the same rows)."""
    from launcher.launch.continual import make_continual

    run = make_continual(ewc_run["recipe"], [])
    groups = json.dumps([run.labels[:2], run.labels[2:]])
    out = ewc_run["tmp"] / "per-stage-eval"
    command = [sys.executable, "-m", "launcher", "eval", str(ewc_run["recipe"]), *run.overrides(run.stages[0], training=False),
               f"data.label_groups={groups}", "--checkpoint", str(ewc_run["second"] / "model"), "--split", "test",
               "--output", str(out)]
    check_ok(subprocess.run(command, env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900))
    own = ["negative", "positive"]
    shared = [json.loads(line) for line in (ewc_run["second"] / "continual-eval" / "0-sentiment" / "test-predictions.jsonl").open()]
    masked = [json.loads(line) for line in (out / "test-predictions.jsonl").open()]
    assert len(masked) == len(shared) > 0 and [r["id"] for r in masked] == [r["id"] for r in shared]
    assert all(plain["probabilities"]["music"] > 0 for plain in shared)  # shared: the topic labels have a share
    for plain, row in zip(shared, masked):
        assert row["probabilities"]["music"] == row["probabilities"]["other"] == 0.0
        kept = {name: plain["probabilities"][name] for name in own}
        assert row["prediction"] == max(kept, key=kept.get)
        for name in own:
            assert row["probabilities"][name] == pytest.approx(kept[name] / sum(kept.values()), abs=2e-5)
    accuracy = sum(r["prediction"] == r["label"] for r in masked) / len(masked)
    assert json.loads((out / "test.json").read_text())["metrics"]["accuracy"] == pytest.approx(accuracy)


def test_report_of_a_continual_and_a_plain_run_together_is_one_line(tmp_path):
    continual, plain = tmp_path / "continual", tmp_path / "plain"
    continual.mkdir()
    plain.mkdir()
    (continual / "metrics.json").write_text(json.dumps({"continual": {"stages": ["a"], "matrix": [[0.5]]}}))
    (plain / "metrics.jsonl").write_text("")
    result = subprocess.run([sys.executable, "-m", "launcher", "report", str(continual), str(plain)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {continual} is a continual run and {plain} is not; report continual runs "
                                     f"together, or a continual run's stages (its stages/*)")
    assert not (tmp_path / "report").exists()
