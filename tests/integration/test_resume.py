"""Never lose work: exact resume, atomic checkpoints, agreed stop, fail-fast, non-finite loss.

All on 2 CPU gloo ranks through `accelerate launch`, fp32, dropout ON (so RNG state must resume too).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (assert_same_losses, REPO, assert_same_key_bias, check_ok, free_port, key_bias_tolerance, read_events, run_launcher,
                      split_key_bias, toy_recipe_dict, write_recipe)
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 70  # 400 training rows / global batch 8 = 50 steps per epoch: 70 steps cross into epoch 2
LEARNING_RATE = 3e-3
ACCELERATE_ARGS = {"ddp": ("--multi_gpu",), "zero2": ("--use_deepspeed", "--zero_stage", "2"),
                   "fsdp": ("--use_fsdp", "--fsdp_version", "2")}


def resume_recipe(assets, out_dir, **training):
    return toy_recipe_dict(
        assets, out_dir,
        training={"max_steps": STEPS, "learning_rate": LEARNING_RATE, "log_every": 1, "global_batch_size": 8,
                  "micro_batch_size": 2, "warmup_steps": 5, "weight_decay": 0.01, **training},
        evaluation={"every_steps": 25, "best_metric": "accuracy", "micro_batch_size": 8},
        checkpoint={"every_steps": 10, "keep_last": 2},
    )


def launch(path, env, strategy, nproc=2, fault=None, extra=()):
    env = dict(env)
    if fault:
        env["LAUNCHER_FAULT"] = fault
    if nproc == 1 and strategy == "ddp":  # one plain process
        return run_launcher(["train", str(path), *extra], env)
    return run_launcher(["train", str(path), *extra], env, nproc=nproc, accelerate_args=ACCELERATE_ARGS[strategy])


def losses(run_dir) -> dict[int, float]:
    steps = {}
    for event in read_events(run_dir, "train"):
        assert event["step"] not in steps, f"step {event['step']} logged twice"
        steps[event["step"]] = event["loss"]
    return steps


def final_weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_run(reference, candidate):
    assert_same_losses(losses(candidate), losses(reference), rel=1e-6)
    assert len(losses(candidate)) == STEPS
    ref, new = final_weights(reference), final_weights(candidate)
    assert ref.keys() == new.keys()
    for name in ref:
        (ref_key, ref_rest), (new_key, new_rest) = split_key_bias(name, ref[name]), split_key_bias(name, new[name])
        if ref_key is not None:  # zero gradient, float noise only: see conftest.key_bias_tolerance
            assert_same_key_bias(name, ref_key, new_key, key_bias_tolerance(LEARNING_RATE, STEPS))
        assert torch.allclose(ref_rest, new_rest, rtol=1e-5, atol=1e-6), name
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    new_metrics = json.loads((candidate / "metrics.json").read_text())
    assert new_metrics["test"]["accuracy"] == ref_metrics["test"]["accuracy"]
    assert new_metrics["best"] == ref_metrics["best"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, assets, isolated_env):
    runs = {}
    for strategy in ACCELERATE_ARGS:
        root = tmp_path_factory.mktemp(f"straight-{strategy}")
        path = write_recipe(root / "recipe.yaml", resume_recipe(assets, root / "run"))
        check_ok(launch(path, isolated_env, strategy))
        runs[strategy] = root / "run"
    return runs


@pytest.mark.parametrize("strategy", list(ACCELERATE_ARGS))
def test_killed_twice_then_resumed_equals_straight_run(straight, assets, isolated_env, tmp_path, strategy):
    """Crash mid-epoch 0 (step 33; resume from step 30), crash again in epoch 1 (step 63; resume
    from 60), then finish: per-step losses, weights and metrics equal an uninterrupted run."""
    path = write_recipe(tmp_path / "recipe.yaml", resume_recipe(assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    for fault, resumes_from in (("1:33", None), ("0:63", 30), (None, 60)):
        result = launch(path, isolated_env, strategy, fault=fault)
        if fault:
            assert result.returncode != 0 and "injected fault" in result.stderr
        else:
            check_ok(result)
        if resumes_from is not None:
            assert f"resumed from {run_dir / 'checkpoints' / f'step-{resumes_from:08d}'}" in result.stdout
    assert_same_run(straight[strategy], run_dir)
    assert [e["step"] for e in read_events(run_dir, "resume")] == [30, 60]
    if strategy == "fsdp":  # each rank wrote its own shards (torch.distributed.checkpoint), and read them back
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            files = sorted(p.name for p in (run_dir / "checkpoints" / "step-00000070" / part).iterdir())
            assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], (part, files)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(straight, assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", resume_recipe(assets, tmp_path / "run"))
    run_dir = tmp_path / "run"
    result = launch(path, isolated_env, "ddp", fault="kill-in-checkpoint:40")
    assert result.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000030"
    assert (checkpoints / ".partial-step-00000040").is_dir()  # the interrupted write, never used
    assert not (checkpoints / "step-00000040").exists()
    result = launch(path, isolated_env, "ddp")
    check_ok(result)
    assert "step-00000030" in result.stdout and not (checkpoints / ".partial-step-00000040").exists()
    assert_same_run(straight["ddp"], run_dir)


def test_ddp_checkpoint_resumes_on_a_different_world_size(assets, isolated_env, tmp_path):
    """Saved on 2 ranks, resumed on 1: DDP state is whole and the global batch is the same, so the
    run continues exactly: the data order is defined by global batches, not by ranks. (Dropout is
    off here: its random masks are drawn per rank, so they cannot carry over to another layout.)"""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    runs = {}
    for name in ("straight", "resumed"):
        recipe = resume_recipe(assets, tmp_path / name / "run")
        recipe["model"]["config_overrides"] = no_dropout
        runs[name] = write_recipe(tmp_path / f"{name}.yaml", recipe)
    check_ok(launch(runs["straight"], isolated_env, "ddp"))
    assert launch(runs["resumed"], isolated_env, "ddp", fault="1:45").returncode != 0
    check_ok(launch(runs["resumed"], isolated_env, "ddp", nproc=1))
    assert read_events(tmp_path / "resumed" / "run", "resume")[0]["step"] == 40
    assert_same_run(tmp_path / "straight" / "run", tmp_path / "resumed" / "run")


def _wait_for_step(run_dir, step, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.returncode}")
        try:
            if any(e["step"] >= step for e in read_events(run_dir, "train")):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank_pids(rank: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"launcher" in cmdline and b"train" in cmdline and f"RANK={rank}".encode() in environ:
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("how", ["SIGUSR1 to launcher run", "SIGTERM to rank 1"])
def test_agreed_stop_checkpoints_and_resumes(straight, assets, isolated_env, tmp_path, how):
    recipe = resume_recipe(assets, tmp_path / "run", max_steps=STEPS)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2", "--main-port", str(free_port())]
    # A slow step keeps the run alive long enough to be interrupted at a step we do not choose.
    env = dict(isolated_env, LAUNCHER_TEST_STEP_DELAY="0.05")
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 12, process)
    if how.startswith("SIGUSR1"):
        process.send_signal(signal.SIGUSR1)
    else:
        (pid,) = _rank_pids(1)
        os.kill(pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped"
    stopped_at = status["step"]
    assert 12 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}" / "trainer_state.json").exists()
    # both ranks stopped at the same step: one checkpoint, written once, and no rank went further
    assert max(e["step"] for e in read_events(run_dir, "train")) == stopped_at
    resumed = subprocess.run(command, env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight["ddp"], run_dir)


def test_a_failing_rank_ends_the_whole_job_quickly(assets, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", resume_recipe(assets, tmp_path / "run",
                                                                  max_steps=10_000))
    start = time.time()
    result = launch(path, isolated_env, "ddp", fault="1:3")
    elapsed = time.time() - start
    assert result.returncode != 0
    assert elapsed < 60
    assert "error: [rank 1] unexpected failure" in result.stderr
    assert "RuntimeError: injected fault (LAUNCHER_FAULT=1:3)" in result.stderr


NAN_STEP = 3  # LAUNCHER_FAULT=nan-loss:3 makes rank 0's loss (and gradients) NaN at optimizer step 3


def nonfinite_recipe(assets, out_dir, **training):
    """5 short steps on the training split alone (no evaluation), a checkpoint after every step."""
    recipe = resume_recipe(assets, out_dir, max_steps=5, **training)
    recipe["data"] = {"train": assets["train"]}
    recipe["evaluation"] = {"every_epoch": False}
    recipe["checkpoint"] = {"every_steps": 1, "keep_last": 10}
    return recipe


def test_nonfinite_loss_stops_naming_its_step(assets, isolated_env, tmp_path):
    """The NaN of step 3 is found at the next loss read (step 4: log_every=4) and reported as step 3's."""
    recipe = nonfinite_recipe(assets, tmp_path / "run", log_every=4)
    recipe["checkpoint"] = {}
    result = launch(write_recipe(tmp_path / "recipe.yaml", recipe), isolated_env, "ddp", nproc=1,
                    fault=f"nan-loss:{NAN_STEP}")
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert f"non-finite loss (nan) at optimizer step {NAN_STEP} (epoch 0)" in line and "on_nonfinite_loss=skip" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "model").exists()


def _checkpoint(run_dir, step):
    directory = run_dir / "checkpoints" / f"step-{step:08d}"
    optimizer = torch.load(directory / "optimizer.bin", weights_only=True)
    return load_file(str(directory / "model.safetensors")), optimizer["state"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_skipped_nonfinite_step_leaves_weights_and_optimizer_untouched(assets, isolated_env, tmp_path, nproc):
    """on_nonfinite_loss=skip drops step 3 whole: the weights and Adam state after it are those before
    it, bit for bit; steps 4 and 5 train on. On 2 ranks only rank 0's loss is NaN (rank 1's gradients
    are poisoned through the DDP all-reduce): both ranks must agree to skip."""
    path = write_recipe(tmp_path / "recipe.yaml", nonfinite_recipe(assets, tmp_path / "run", on_nonfinite_loss="skip"))
    check_ok(launch(path, isolated_env, "ddp", nproc=nproc, fault=f"nan-loss:{NAN_STEP}"))
    run_dir = tmp_path / "run"
    (skipped,) = read_events(run_dir, "skipped_step")
    assert skipped["step"] == NAN_STEP and math.isnan(skipped["loss"])
    train = json.loads((run_dir / "metrics.json").read_text())["train"]
    assert (train["steps"], train["skipped_steps"], train["world_size"]) == (5, 1, nproc)
    trained = losses(run_dir)
    assert all(math.isfinite(trained[step]) for step in (1, 2, 4, 5)), trained

    (w1, _), (w2, adam2), (w3, adam3), (w4, _) = (_checkpoint(run_dir, step) for step in (1, 2, 3, 4))
    assert w2.keys() == w3.keys() and adam2.keys() == adam3.keys() and adam2
    for name in w2:
        assert torch.equal(w2[name], w3[name]), f"{name} changed in the skipped step"
    for index in adam2:
        for key in adam2[index]:  # step count, exp_avg, exp_avg_sq
            assert torch.equal(adam2[index][key], adam3[index][key]), f"Adam {key} of parameter {index} changed"
    # training goes on after the skipped step: step 4 moves what step 2 moved, to finite values
    moved_by_step_2 = {name for name in w1 if not torch.equal(w1[name], w2[name])}
    moved_by_step_4 = {name for name in w3 if not torch.equal(w3[name], w4[name])}
    assert moved_by_step_2 and moved_by_step_4 == moved_by_step_2
    assert all(torch.isfinite(t).all() for t in w4.values())
