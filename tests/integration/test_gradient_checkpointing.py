"""`training.gradient_checkpointing` gives the same training, and `distributed.strategy: auto` picks it
(with ZeRO-3) when the memory per rank calls for it - then every rank runs what the plan chose.

The tiny BERT keeps its dropout on: torch's checkpoint restores the RNG state before recomputing a layer,
so the recomputed dropout masks are the ones the forward pass drew and the losses stay equal.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import assert_same_losses, REPO, check_ok, read_events, run_launcher, toy_recipe_dict, write_recipe

pytestmark = pytest.mark.slow

STEPS = 6


def recipe(assets, out_dir, **training):
    return toy_recipe_dict(assets, out_dir, training={"max_steps": STEPS, "log_every": 1, "micro_batch_size": 8, **training},
                           evaluation={"every_epoch": False})


def losses(run_dir) -> list[float]:
    return [event["loss"] for event in read_events(run_dir, "train")]


def one_process(tmp_path_factory, assets, env, name, method="full", **training):
    root = tmp_path_factory.mktemp(name)
    path = write_recipe(root / "recipe.yaml", {**recipe(assets, root / "run", **training), "finetune": {"method": method}})
    check_ok(run_launcher(["train", str(path)], env))
    return root / "run"


def launcher_run(tmp_path_factory, assets, env, name, *args):
    root = tmp_path_factory.mktemp(name)
    path = write_recipe(root / "recipe.yaml", recipe(assets, root / "run"))
    result = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    check_ok(result)
    return root / "run", result.stdout


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, assets, isolated_env):
    return {
        "plain": one_process(tmp_path_factory, assets, isolated_env, "plain"),
        "checkpointing": one_process(tmp_path_factory, assets, isolated_env, "ckpt", gradient_checkpointing=True),
    }


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, assets, isolated_env):
    return {
        "ddp": launcher_run(tmp_path_factory, assets, isolated_env, "ddp", "--strategy", "ddp"),
        # The tiny BERT's model states are ~0.3 MiB and its activations at 8 x 64 (its position limit) ~3.6 MiB
        # (~2.1 with checkpointing): 3.5 MiB per rank (2.98 usable) leaves room for ZeRO-3 with checkpointing only.
        "auto": launcher_run(tmp_path_factory, assets, isolated_env, "auto", "--memory-per-rank", "3.5MiB"),
    }


def test_checkpointing_gives_the_same_losses_on_one_process(one_process_runs):
    plain, checkpointed = one_process_runs["plain"], one_process_runs["checkpointing"]
    assert read_events(plain, "start")[0]["gradient_checkpointing"] is False
    assert read_events(checkpointed, "start")[0]["gradient_checkpointing"] is True
    assert len(losses(plain)) == STEPS
    assert_same_losses(losses(checkpointed), losses(plain), rel=1e-5, atol=1e-5)
    assert len(set(losses(plain))) == STEPS  # the steps differ: a real comparison, not of a constant


def test_auto_chooses_zero3_with_checkpointing_and_every_rank_runs_it(two_rank_runs):
    run_dir, plan = two_rank_runs["auto"]
    out = " ".join(plan.split())
    assert "strategy: zero3 + checkpointing (auto: the cheapest that fits" in out
    assert "zero3 + checkpointing" in out and "<- chosen" in out
    assert "training.gradient_checkpointing=true distributed.strategy=zero3" in out  # the ranks' command line
    start = read_events(run_dir, "start")[0]
    assert (start["strategy"], start["gradient_checkpointing"], start["world_size"]) == ("zero3", True, 2)
    # ZeRO-3 + checkpointing on 2 ranks trains exactly as DDP without checkpointing (dropout on)
    ddp_dir, _ = two_rank_runs["ddp"]
    assert read_events(ddp_dir, "start")[0]["gradient_checkpointing"] is False
    assert_same_losses(losses(run_dir), losses(ddp_dir), rel=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_checkpointing_with_parameter_efficient_methods(tmp_path_factory, assets, isolated_env, method):
    """Only the method's weights (and the head) train: gradients must still reach them through the
    checkpointed layers (peft's LoRA inside them; the launcher's adapters as hooks outside them)."""
    runs = [one_process(tmp_path_factory, assets, isolated_env, f"{method}-{flag}", method=method,
                        gradient_checkpointing=flag, max_steps=3) for flag in (False, True)]
    for run_dir in runs:
        assert read_events(run_dir, "start")[0]["finetune_method"] == method
    plain, checkpointed = (losses(run_dir) for run_dir in runs)
    assert read_events(runs[1], "start")[0]["gradient_checkpointing"] is True
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-5) and len(set(plain)) == 3
