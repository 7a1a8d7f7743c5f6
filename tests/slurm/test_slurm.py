"""`launcher slurm` against a real 2-node Slurm 22.05 cluster running on this machine
(tests/slurm/start_cluster.sh: slurmctld + slurmd n1 + slurmd n2, munge; needs root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    assert_same_losses,
    assert_same_weights,
    check_ok,
    key_bias_tolerance,
    losses,
    read_events,
    run_launcher,
    toy_recipe_dict,
    weights,
    write_recipe,
)

HERE = Path(__file__).resolve().parent


def render(recipe_path, env, *args):
    return subprocess.run([sys.executable, "-m", "launcher", "slurm", str(recipe_path), *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root to install and start slurmctld/slurmd/munge")
    result = subprocess.run(["bash", str(HERE / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"start_cluster.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
    return True


def slurm_recipe(assets, out_dir, **training):
    return toy_recipe_dict(
        assets, out_dir,
        training={"max_steps": 60, "learning_rate": 3e-3, "log_every": 1, "global_batch_size": 8,
                  "micro_batch_size": 4, "warmup_steps": 5, **training},
        evaluation={"every_steps": 20, "micro_batch_size": 8},
        checkpoint={"every_steps": 20},
    )


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


SETUP_WITH_QUOTES = 'export GREETING="it\'s node $SLURM_NODEID"'  # a quote and a variable for the node


def test_rendered_script_evaluates_ranks_on_each_node(assets, isolated_env, tmp_path):
    """What public sbatch scripts get wrong, checked in the text (no cluster needed)."""
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    result = render(path, isolated_env, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2:00:00",
                    "--account", "proj", "--memory-per-rank", "80GiB", "--mem", "64G", "--exclusive", "--constraint", "a100", "--qos", "high",
                    "--sbatch-arg=--reservation=maint", "--sbatch-arg=--mail-type=END",
                    "--setup", "module load cuda/12.4", "--setup", SETUP_WITH_QUOTES,
                    "training.global_batch_size=128", "model.config_overrides={hidden_dropout_prob: 0.0}")
    check_ok(result)
    out = " ".join(result.stdout.split())
    # auto chose from the compute nodes' GPU memory, which only the user can tell from a login node
    assert "strategy: ddp (auto: the cheapest rung fits" in out and "memory per rank: 80.00 GiB (--memory-per-rank)" in out
    script = (tmp_path / "run" / "job.sbatch").read_text()
    assert script.count("--nodes=") == 1 and "#SBATCH --nodes=4" in script  # node count stated once
    assert "#SBATCH --gpus-per-node=8" in script and "${SLURM_GPUS_PER_NODE" in script
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=proj" in script
    for line in ("#SBATCH --mem=64G", "#SBATCH --exclusive", "#SBATCH --constraint=a100", "#SBATCH --qos=high",
                 "#SBATCH --reservation=maint", "#SBATCH --mail-type=END"):
        assert line in script.splitlines(), line
    srun = script[script.index("srun "):script.index("' &")]
    assert srun.split("bash -c ", 1)[1].startswith("'")  # single quotes: expanded on each node
    assert '--machine_rank "$SLURM_NODEID"' in srun and "--kill-on-bad-exit=1" in srun
    assert '--rdzv_backend "$RDZV_BACKEND"' in srun
    assert 'export RDZV_BACKEND=$([ "$NNODES" = 1 ] && echo static || echo c10d)' in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "trap on_preempt USR1 TERM" in script
    assert 'scontrol requeue "$JOB_REF"' in script and "#SBATCH --requeue" in script
    assert f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out" in script.splitlines() and "--array" not in script
    assert "world size:        4 node(s) x 8 process(es) = 32" in result.stdout
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "run" / "job.sbatch")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # The per-node script (single-quoted for srun's bash -c) holds the setup lines and the training
    # command intact, quotes included: run it through bash's parser and read back what each node runs.
    quoted = script[script.index("bash -c '") + len("bash -c "):script.index("' &") + 1]
    payload = subprocess.run(["bash", "-c", "printf %s " + quoted], capture_output=True, text=True)
    assert "    module load cuda/12.4\n" in payload.stdout
    assert f"    {SETUP_WITH_QUOTES}\n" in payload.stdout  # exactly as given, for each node's own shell
    assert "'model.config_overrides={hidden_dropout_prob: 0.0}'" in payload.stdout
    assert payload.stdout.index("module load") < payload.stdout.index("exec ")  # setup before the launch


def test_container_option_renders_pyxis_srun(assets, isolated_env, tmp_path):
    """pyxis: the node's task runs in the image with the work and run directories mounted; the
    interpreter is the image's (this machine's venv does not exist in there). Rendered, not run: this
    machine has no enroot/pyxis."""
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    check_ok(render(path, isolated_env, "--nodes", "2", "--gpus-per-node", "8", "--memory-per-rank", "80GiB", "--container-image",
                    "nvcr.io/nvidia/pytorch:24.05-py3", "--container-python", "python3", "training.global_batch_size=64"))
    script = (tmp_path / "run" / "job.sbatch").read_text()
    srun = script[script.index("srun "):script.index("bash -c ")]
    assert "--container-image=nvcr.io/nvidia/pytorch:24.05-py3" in srun
    assert f"--container-mounts={REPO},{(tmp_path / 'run').resolve()}" in srun or \
        f"--container-mounts={(tmp_path / 'run').resolve()},{REPO}" in srun
    assert f"--container-workdir={REPO}" in srun
    assert "export LAUNCHER_PYTHON=python3" in script


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nodes", "0", "--gpus-per-node", "1"], "--nodes 0: need at least 1 node"),
        (["--nodes", "2", "--gpus-per-node", "0", "--time", "1", "--signal-seconds", "120"], "must come before the time limit"),
        (["--nodes", "2", "--gpus-per-node", "0", "--time", "soon"], "use a Slurm time limit"),
        (["--nodes", "2", "--gpus-per-node", "0", "--sbatch-arg=--time=5"], "--time is set by the launcher (use --time)"),
        (["--nodes", "2", "--gpus-per-node", "0", "--sbatch-arg=reservation"], "give an sbatch option"),
        (["--nodes", "2", "--gpus-per-node", "0", "--mem", "lots"], "use a Slurm memory size"),
        (["--nodes", "2", "--gpus-per-node", "0", "data.max_length=100000"], "data.max_length=100000 is longer than"),
        (["--nodes", "1", "--gpus-per-node", "2"], "this machine cannot see for a Slurm job: pass --memory-per-rank"),
        (["--nodes", "1", "--gpus-per-node", "2", "--memory-per-rank", "lots"], "--memory-per-rank 'lots': give a size"),
    ],
)
def test_bad_slurm_requests(assets, isolated_env, tmp_path, args, expected):
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    result = render(path, isolated_env, *args)
    assert result.returncode == 2 and expected in result.stderr
    assert not (tmp_path / "run").exists()


def test_submit_without_sbatch_launches_nothing(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    env = dict(isolated_env, PATH=str(Path(sys.executable).parent) + ":/usr/bin/nonexistent")
    result = render(path, env, "--nodes", "2", "--gpus-per-node", "0", "--submit")
    assert result.returncode == 2 and "sbatch is not on PATH" in result.stderr
    assert not (tmp_path / "run").exists()


def submit(recipe_path, env, *args, time_limit="10") -> str:
    result = render(recipe_path, env, "--nodes", "2", "--gpus-per-node", "0", "--time", time_limit, "--submit", *args)
    check_ok(result)
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


MATRIX_STEPS = 24
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def matrix_recipe(assets, out_dir):
    recipe = slurm_recipe(assets, out_dir, max_steps=MATRIX_STEPS)
    recipe["model"]["config_overrides"] = NO_DROPOUT
    recipe["evaluation"]["every_steps"] = recipe["checkpoint"]["every_steps"] = 8
    return recipe


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, assets, isolated_env):
    """The reference every Slurm job is held to: the same recipe on 1 node x 2 processes, no Slurm."""
    root = tmp_path_factory.mktemp("slurm-reference")
    path = write_recipe(root / "recipe.yaml", matrix_recipe(assets, root / "run"))
    check_ok(run_launcher(["train", str(path)], isolated_env, nproc=2, accelerate_args=("--multi_gpu",)))
    return root / "run"


def finished(job: str) -> bool:
    return job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_two_node_job_trains_like_one_node(cluster, one_node, assets, isolated_env, tmp_path, strategy):
    path = write_recipe(tmp_path / "recipe.yaml", matrix_recipe(assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    setup = 'echo "node setup: it\'s node $SLURM_NODEID"'  # runs on every node, before the launch
    job = submit(path, isolated_env, "--strategy", strategy, "--setup", setup)
    wait_for(lambda: finished(job), 600, f"job {job}")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_state(job) == "COMPLETED", log[-4000:]
    ranks = set(re.findall(r"\[node (n\d)\] machine_rank=(\d) of 2", log))
    assert ranks == {("n1", "0"), ("n2", "1")}  # two nodes, each with its own machine rank
    assert sorted(re.findall(r"node setup: it's node (\d)", log)) == ["0", "1"]
    start = read_events(run_dir, "start")[0]
    assert (start["world_size"], start["strategy"]) == (2, strategy)
    assert len(read_events(run_dir, "end")) == 1 and (run_dir / "metrics.json").exists()
    assert_same_losses(losses(run_dir), losses(one_node), rel=1e-5)
    assert_same_weights(weights(one_node), weights(run_dir), key_bias_tolerance(3e-3, MATRIX_STEPS))


@pytest.mark.slow
def test_time_limit_warning_requeues_resumes_and_matches_an_uninterrupted_run(cluster, one_node, assets,
                                                                                isolated_env, tmp_path):
    """ZeRO-3 over 2 nodes with a real 3-minute time limit: Slurm itself sends the warning signal
    (--signal=B:USR1@90, which Slurm may deliver up to a minute early), every rank checkpoints at one
    step, the job requeues itself, resumes and ends with the losses of an uninterrupted run."""
    path = write_recipe(tmp_path / "recipe.yaml", matrix_recipe(assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    # 24 steps x 4 s: the first attempt is still training when the warning comes (30-90 s in)
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="4")
    job = submit(path, env, "--strategy", "zero3", "--signal-seconds", "90", time_limit="3")

    def restarted() -> bool:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        match = re.search(r"Restarts=(\d+)", out)
        return bool(match and int(match.group(1)) >= 1) or finished(job)

    wait_for(restarted, 400, "Slurm's time-limit warning and the requeue")
    assert not finished(job), (run_dir / f"slurm-{job}.out").read_text()[-4000:]  # it was stopped, not done
    # The resumed attempt would get the same 3-minute limit and warning; give it room to finish.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20"], check=True, capture_output=True)
    wait_for(lambda: finished(job) and json.loads((run_dir / "status.json").read_text())["state"] == "finished",
             600, "the requeued job to finish")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_state(job) == "COMPLETED", log[-4000:]
    assert "stop signal: every rank checkpoints" in log and "checkpointed; requeueing to resume" in log
    assert "(restart 1)" in log
    assert "warning: LAUNCHER_TEST_STEP_DELAY=4 is set" in log  # a test-only setting never runs silently
    resumes = read_events(run_dir, "resume")
    assert len(resumes) == 1 and 0 <= resumes[0]["step"] < MATRIX_STEPS
    steps = [e["step"] for e in read_events(run_dir, "train")]
    assert steps == list(range(1, MATRIX_STEPS + 1))  # every step once: nothing lost, nothing twice
    assert_same_losses(losses(run_dir), losses(one_node), rel=1e-5)
    assert_same_weights(weights(one_node), weights(run_dir), key_bias_tolerance(3e-3, MATRIX_STEPS))
    final = json.loads((run_dir / "metrics.json").read_text())
    ref = json.loads((one_node / "metrics.json").read_text())
    assert final["test"]["accuracy"] == ref["test"]["accuracy"]
    assert final["test"]["loss"] == pytest.approx(ref["test"]["loss"], rel=1e-5)
