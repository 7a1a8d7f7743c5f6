"""`launcher sweep --slurm`: one job array, each task a whole job running one point, rendered from the
single job's template; on the real local 2-node cluster (tests/slurm/start_cluster.sh) an array of 4
points finishes, one task stopped mid-run is requeued on its own and resumes, and the summary equals
every point's metrics.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, check_ok, losses, read_events, write_recipe
from test_slurm import HERE, SETUP_WITH_QUOTES, slurm_recipe, wait_for

SEEDS = ["--grid", "training.seed=1,2"]
EVAL_BATCH = ["--grid", "evaluation.micro_batch_size=8,16"]  # trains identically: each seed's two points match


@pytest.fixture(scope="module")
def cluster():
    """The cluster test_slurm.py starts (idempotent), without cancelling anyone's jobs: it is shared."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root to install and start slurmctld/slurmd/munge")
    result = subprocess.run(["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"start_cluster.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return True


def sweep(recipe_path, env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launcher", "sweep", str(recipe_path), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _between(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_rendered_array_runs_each_point_as_the_single_job_does(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "unused"))
    directory = tmp_path / "sweep"
    result = sweep(path, isolated_env, *SEEDS, "--grid", "training.learning_rate=1e-3,3e-3", "--dir", str(directory),
                   "--slurm", "--nodes", "2", "--gpus-per-node", "0", "--array", "2", "--time", "30",
                   "--setup", SETUP_WITH_QUOTES, "--sbatch-arg=--mail-type=END", "model.config_overrides={hidden_dropout_prob: 0.0}")
    check_ok(result)
    script = (directory / "sweep.sbatch").read_text()
    names = [json.loads((directory / "sweep.json").read_text())["points"][i]["name"] for i in range(4)]
    assert names == ["seed=1_learning_rate=0.001", "seed=1_learning_rate=0.003", "seed=2_learning_rate=0.001",
                     "seed=2_learning_rate=0.003"]
    lines = script.splitlines()
    assert "#SBATCH --array=0-3%2" in lines and "#SBATCH --nodes=2" in lines and "#SBATCH --mail-type=END" in lines
    assert f"#SBATCH --output={directory}/slurm-%A_%a.out" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=B:USR1@120" in lines
    # Everything else is the single job's template: the same per-node launch, preemption and requeue.
    single = subprocess.run([sys.executable, "-m", "launcher", "slurm", str(path), "--nodes", "2", "--gpus-per-node", "0",
                             "--time", "30", "--setup", SETUP_WITH_QUOTES], env=isolated_env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    check_ok(single)
    job = (tmp_path / "unused" / "job.sbatch").read_text()
    for part in ("trap on_preempt USR1 TERM", 'scontrol requeue "$JOB_REF"', "--kill-on-bad-exit=1",
                 '--machine_rank "$SLURM_NODEID"', "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))"):
        assert script.count(part) == job.count(part) > 0, part
    assert _between(script, "preempted=0", "srun ") == _between(job, "preempted=0", "srun ")
    assert script[script.index("srun_pid=$!"):] == job[job.index("srun_pid=$!"):]
    assert subprocess.run(["bash", "-n", str(directory / "sweep.sbatch")]).returncode == 0

    # Which job `scontrol requeue` gets: the array task (ARRAY_TASK), never the bare id that names the whole array.
    ref = _between(script, "JOB_REF=", "\necho") + "\necho $JOB_REF"
    for env, expected in (({"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "40"}, "40_3"),
                          ({"SLURM_JOB_ID": "41"}, "41")):
        shown = subprocess.run(["bash", "-uc", ref], env=env, capture_output=True, text=True)
        assert shown.stdout.strip() == expected, shown.stderr

    # Task 2 on one of its nodes: the batch shell picks point 2's run directory; the node's own shell
    # reads that point's arguments and starts accelerate with them, quotes intact.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/bash\nprintf '%s\\n' \"$@\"\n")
    fake_python.chmod(0o755)
    select = _between(script, ': "${SLURM_ARRAY_TASK_ID', "export LAUNCHER_PYTHON") + 'echo "$RUN_DIR"'
    chosen = subprocess.run(["bash", "-uc", select], env={"SLURM_ARRAY_TASK_ID": "2"}, capture_output=True, text=True)
    assert chosen.stdout.strip() == str(directory / names[2])
    payload = script[script.index("bash -c '") + len("bash -c "):script.index("' &") + 1]
    node = subprocess.run(["bash", "-c", "eval bash -c " + payload],
                          env={"RUN_DIR": chosen.stdout.strip(), "LAUNCHER_PYTHON": str(fake_python), "NNODES": "2",
                               "PROCS_PER_NODE": "1", "SLURM_NODEID": "1", "MAIN_ADDR": "n1", "MAIN_PORT": "20001",
                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    argv = node.stdout.splitlines()
    assert argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--config_file") + 1] == f"{directory / names[2]}/launch/accelerate_config.yaml"
    train = argv[argv.index("launcher"):]
    assert train == ["launcher", "train", str(path), "model.config_overrides={hidden_dropout_prob: 0.0}", "training.seed=2",
                     "training.learning_rate=1e-3", f'output.dir="{directory / names[2]}"', "distributed.strategy=ddp"]
    assert node.returncode == 0, node.stderr
    for name in names:
        assert (directory / name / "launch" / "accelerate_config.yaml").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--sbatch-arg=--array=0-3"], "--array is set by the launcher (launcher sweep --slurm makes the array"),
    (["--array", "0"], "--array 0: at least 1 point must be able to run at a time"),
])
def test_bad_array_requests_write_nothing(assets, isolated_env, tmp_path, args, expected):
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "unused"))
    result = sweep(path, isolated_env, *SEEDS, "--dir", str(tmp_path / "sweep"), "--slurm", "--nodes", "1",
                   "--gpus-per-node", "0", *args)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert not (tmp_path / "sweep").exists()


STEPS = 12


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    except (OSError, ValueError, KeyError):
        return False


def _array_gone(array: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i %T"], capture_output=True, text=True).stdout
    return not out.strip()


@pytest.mark.slow
def test_array_of_four_points_finishes_one_requeued_task_resumes_and_the_summary_matches(cluster, assets, isolated_env,
                                                                                          tmp_path):
    recipe = slurm_recipe(assets, tmp_path / "unused", max_steps=STEPS)
    recipe["model"]["config_overrides"] = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    recipe["evaluation"]["every_steps"] = recipe["checkpoint"]["every_steps"] = 6
    recipe["evaluation"]["best_metric"] = "loss"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    directory = tmp_path / "sweep"
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="1")  # slow enough to stop one point mid-run
    result = sweep(path, env, *SEEDS, *EVAL_BATCH, "--dir", str(directory), "--slurm", "--nodes", "1",
                   "--gpus-per-node", "0", "--array", "2", "--time", "20", "--submit")
    check_ok(result)
    array = re.search(r"submitted job array (\d+)", result.stdout).group(1)
    points = json.loads((directory / "sweep.json").read_text())["points"]
    assert [p["name"] for p in points] == ["seed=1_micro_batch_size=8", "seed=1_micro_batch_size=16",
                                           "seed=2_micro_batch_size=8", "seed=2_micro_batch_size=16"]
    dirs = [Path(p["run_dir"]) for p in points]

    # Stop task 3 mid-run the way Slurm warns a job: USR1 to its batch shell. Task 3 starts last, so it
    # runs under the array's own job record (its SLURM_JOB_ID is the array's id): requeueing that id
    # instead of ARRAY_3 would requeue every task.
    def training(run_dir: Path, step: int) -> bool:
        try:
            return any(e["step"] >= step for e in read_events(run_dir, "train"))
        except (OSError, ValueError, KeyError):
            return False

    wait_for(lambda: training(dirs[3], 2), 900, "array task 3 to train")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{array}_3"], check=True, capture_output=True)
    wait_for(lambda: all(_finished(d) for d in dirs) and _array_gone(array), 1200, "every array task to finish")

    logs = {i: (directory / f"slurm-{array}_{i}.out").read_text() for i in range(4)}
    stopped = logs[3]
    assert f"[job {array}_3] checkpointed; requeueing to resume" in stopped, stopped[-4000:]
    assert "(restart 1)" in stopped
    for i in (0, 1, 2):  # requeueing task 3 touched no other task
        assert "(restart 1)" not in logs[i] and "requeueing" not in logs[i], logs[i][-3000:]
    resumes = read_events(dirs[3], "resume")
    assert len(resumes) == 1 and 0 < resumes[0]["step"] < STEPS
    assert [e["step"] for e in read_events(dirs[3], "train")] == list(range(1, STEPS + 1))
    # The requeued point trained like its uninterrupted twin (same seed; only the eval batch differs);
    # the other seed trained differently (each task ran its own point).
    assert losses(dirs[1]) == pytest.approx(losses(dirs[0]), rel=1e-5)
    assert losses(dirs[3]) == pytest.approx(losses(dirs[2]), rel=1e-5)
    assert losses(dirs[2]) != pytest.approx(losses(dirs[0]), rel=1e-3)

    shown = subprocess.run([sys.executable, "-m", "launcher", "sweep", "--summary", str(directory)], env=isolated_env,
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    check_ok(shown)
    summary = json.loads((directory / "summary.json").read_text())
    assert sorted(p["index"] for p in summary["points"]) == [0, 1, 2, 3]
    for row in summary["points"]:
        metrics = json.loads((dirs[row["index"]] / "metrics.json").read_text())
        assert row["status"] == "finished" and row["steps"] == metrics["train"]["steps"] == STEPS
        assert (row["metric"], row["best_validation"], row["best_step"]) == (
            "loss", metrics["best"]["value"], metrics["best"]["step"])
        assert row["test"] == {k: v for k, v in metrics["test"].items() if isinstance(v, float)}
        assert row["validation"] == {k: v for k, v in metrics["validation"].items() if isinstance(v, float)}
    values = [row["best_validation"] for row in summary["points"]]
    assert values == sorted(values)  # loss: lowest first
    for row in summary["points"]:
        assert f"| {row['name']} | finished | {STEPS} |" in shown.stdout

    # Submitting again finds nothing to do.
    again = sweep(path, isolated_env, *SEEDS, *EVAL_BATCH, "--dir", str(directory), "--slurm", "--nodes", "1",
                  "--gpus-per-node", "0", "--submit")
    check_ok(again)
    assert "every point is finished; nothing to submit" in again.stdout and "submitted" not in again.stdout
