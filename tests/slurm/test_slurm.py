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
from conftest import REPO, check_ok, read_events, run_launcher, toy_recipe_dict, write_recipe

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


def test_rendered_script_evaluates_ranks_on_each_node(assets, isolated_env, tmp_path):
    """What public sbatch scripts get wrong, checked in the text (no cluster needed)."""
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    result = render(path, isolated_env, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2:00:00",
                    "--account", "proj", "--memory-per-rank", "80GiB", "training.global_batch_size=128")
    check_ok(result)
    out = " ".join(result.stdout.split())
    # auto chose from the compute nodes' GPU memory, which only the user can tell from a login node
    assert "strategy: ddp (auto: the cheapest rung fits" in out and "memory per rank: 80.00 GiB (--memory-per-rank)" in out
    script = (tmp_path / "run" / "job.sbatch").read_text()
    assert script.count("--nodes=") == 1 and "#SBATCH --nodes=4" in script  # node count stated once
    assert "#SBATCH --gpus-per-node=8" in script and "${SLURM_GPUS_PER_NODE" in script
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --account=proj" in script
    srun = script[script.index("srun "):script.index("' &")]
    assert srun.split("bash -c ", 1)[1].startswith("'")  # single quotes: expanded on each node
    assert '--machine_rank "$SLURM_NODEID"' in srun and "--kill-on-bad-exit=1" in srun
    assert "--rdzv_backend c10d" in srun
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "MAIN_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "trap on_preempt USR1 TERM" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "#SBATCH --requeue" in script
    assert "world size:        4 node(s) x 8 process(es) = 32" in result.stdout
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "run" / "job.sbatch")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nodes", "0", "--gpus-per-node", "1"], "--nodes 0: need at least 1 node"),
        (["--nodes", "2", "--gpus-per-node", "0", "--time", "1", "--signal-seconds", "120"], "must come before the time limit"),
        (["--nodes", "2", "--gpus-per-node", "0", "--time", "soon"], "use a Slurm time limit"),
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


def submit(recipe_path, env) -> str:
    result = render(recipe_path, env, "--nodes", "2", "--gpus-per-node", "0", "--time", "10", "--submit")
    check_ok(result)
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


@pytest.mark.slow
def test_two_node_job_trains_with_world_size_two(cluster, assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run", max_steps=10))
    run_dir = tmp_path / "run"
    job = submit(path, isolated_env)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, f"job {job}")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_state(job) == "COMPLETED", log[-4000:]
    ranks = set(re.findall(r"\[node (n\d)\] machine_rank=(\d) of 2", log))
    assert ranks == {("n1", "0"), ("n2", "1")}  # two nodes, each with its own machine rank
    assert read_events(run_dir, "start")[0]["world_size"] == 2
    assert len(read_events(run_dir, "end")) == 1 and (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster, assets, isolated_env, tmp_path):
    # the uninterrupted reference: same recipe, same world size (1 node x 2 processes), no Slurm
    reference = write_recipe(tmp_path / "reference.yaml", slurm_recipe(assets, tmp_path / "reference"))
    check_ok(run_launcher(["train", str(reference)], isolated_env, nproc=2, accelerate_args=("--multi_gpu",)))

    path = write_recipe(tmp_path / "recipe.yaml", slurm_recipe(assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="0.1")  # long enough to be interrupted mid-run
    job = submit(path, env)

    def reached(step):
        try:
            return any(e["step"] >= step for e in read_events(run_dir, "train"))
        except (OSError, ValueError):
            return False

    wait_for(lambda: reached(8), 300, "step 8")
    # Slurm's time-limit warning, delivered now: what --signal=B:USR1@N does before the limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and
             json.loads((run_dir / "status.json").read_text())["state"] == "finished", 600, "the requeued job to finish")
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert job_state(job) == "COMPLETED", log[-4000:]
    assert "checkpointed; requeueing to resume" in log and "(restart 1)" in log
    resumes = read_events(run_dir, "resume")
    assert len(resumes) == 1 and 8 <= resumes[0]["step"] < 60
    losses = {e["step"]: e["loss"] for e in read_events(run_dir, "train")}
    expected = {e["step"]: e["loss"] for e in read_events(tmp_path / "reference", "train")}
    assert losses == pytest.approx(expected, rel=1e-6)
    final = json.loads((run_dir / "metrics.json").read_text())
    ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert final["test"]["accuracy"] == ref["test"]["accuracy"]
    assert final["test"]["loss"] == pytest.approx(ref["test"]["loss"], rel=1e-5)
