"""Resume on another world size: a ZeRO-2/ZeRO-3 checkpoint written by 2 ranks continues on 1 process
and one written by 1 process continues on 2 ranks, through DeepSpeed's universal checkpoint (converted
on the first such resume, reused after, the original left as it was), exactly like the uninterrupted
run; ZeRO-0 (full state) loads as it is; another global batch is refused.

CPU gloo ranks through `accelerate launch`, fp32, dropout OFF: dropout masks are drawn per rank, so
with dropout on no layout change can be bitwise exact (docs/failure-and-resume.md).
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_losses, check_ok, read_events, run_launcher, toy_recipe_dict, write_recipe
from safetensors.torch import load_file
from test_multinode import two_nodes

pytestmark = pytest.mark.slow

STEPS = 20
CHECKPOINT = "step-00000010"  # checkpoints every 10 steps; every interrupted run dies at step 13
ZERO = {f"zero{stage}": ("--use_deepspeed", "--zero_stage", str(stage)) for stage in (0, 2, 3)}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# The attention key bias has zero gradient in exact arithmetic; Adam turns float noise into steps
# (see test_distributed), so its value is noise in any run.
ZERO_GRADIENT = "attention.self.key.bias"


def elastic_recipe(assets, out_dir, **training):
    return toy_recipe_dict(
        assets, out_dir,
        model={"config_overrides": NO_DROPOUT},
        training={"max_steps": STEPS, "learning_rate": 3e-3, "log_every": 1, "global_batch_size": 8,
                  "micro_batch_size": 2, "warmup_steps": 5, "weight_decay": 0.01, **training},
        # No best_metric: the export must be the final weights, not best weights saved before the resume.
        evaluation={"every_steps": 10, "micro_batch_size": 8},
        checkpoint={"every_steps": 10, "keep_last": 3},
    )


def launch(path, env, strategy, nproc, fault=None):
    env = dict(env, LAUNCHER_FAULT=fault) if fault else env
    return run_launcher(["train", str(path)], env, nproc=nproc, accelerate_args=ZERO[strategy])


def losses(run_dir) -> dict[int, float]:
    steps = {}
    for event in read_events(run_dir, "train"):
        assert event["step"] not in steps, f"step {event['step']} logged twice"
        steps[event["step"]] = event["loss"]
    return steps


def tree_digest(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_run(reference, candidate):
    reference_losses, candidate_losses = losses(reference), losses(candidate)
    assert sorted(candidate_losses) == list(range(1, STEPS + 1))
    assert_same_losses(candidate_losses, reference_losses, rel=1e-5)
    ref_weights = load_file(str(reference / "model" / "model.safetensors"))
    new_weights = load_file(str(candidate / "model" / "model.safetensors"))
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        if not name.endswith(ZERO_GRADIENT):
            assert torch.allclose(ref_weights[name], new_weights[name], rtol=1e-5, atol=1e-6), name
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    new_metrics = json.loads((candidate / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert new_metrics[split]["loss"] == pytest.approx(ref_metrics[split]["loss"], rel=1e-5), split
        assert new_metrics[split]["accuracy"] == ref_metrics[split]["accuracy"], split


@pytest.fixture(scope="module")
def straight(tmp_path_factory, assets, isolated_env):
    """The uninterrupted run of a strategy on 2 ranks, made when first asked for."""
    runs = {}

    def run_dir(strategy):
        if strategy not in runs:
            root = tmp_path_factory.mktemp(f"straight-{strategy}")
            path = write_recipe(root / "recipe.yaml", elastic_recipe(assets, root / "run"))
            check_ok(launch(path, isolated_env, strategy, 2))
            runs[strategy] = root / "run"
        return runs[strategy]

    return run_dir


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2)], ids=["2-ranks-to-1", "1-rank-to-2"])
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_checkpoint_resumes_exactly_on_another_world_size(straight, assets, isolated_env, tmp_path,
                                                               strategy, saved_on, resumed_on):
    """ZeRO-3's 1 -> 2 case resumes on 2 (loopback) nodes, the others on one node."""
    path = write_recipe(tmp_path / "recipe.yaml", elastic_recipe(assets, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    crashed = launch(path, isolated_env, strategy, saved_on, fault="0:13")
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr
    original = tree_digest(checkpoints / CHECKPOINT)
    assert any(name.endswith("optim_states.pt") for name in original)  # ZeRO shards, not full state

    if resumed_on == 1:
        # The resumed run dies too, before its next checkpoint; the next resume is again from the
        # 2-rank checkpoint and loads the conversion the first one made.
        assert launch(path, isolated_env, strategy, resumed_on, fault="0:15").returncode != 0
        marker = checkpoints / f"{CHECKPOINT}.universal" / "converted_from.json"
        first_conversion = tree_digest(marker.parent), marker.stat().st_mtime_ns
    if strategy == "zero3" and resumed_on == 2:
        outputs = two_nodes(path, isolated_env, "--strategy", strategy)
        resumed = SimpleNamespace(stdout=outputs[0][0])  # node 0 holds global rank 0, which reports
        assert "2 node(s) x 1 process(es) = 2" in " ".join(outputs[1][0].split())
    else:
        resumed = launch(path, isolated_env, strategy, resumed_on)
        check_ok(resumed)
    universal = checkpoints / f"{CHECKPOINT}.universal"
    assert f"resumed from {checkpoints / CHECKPOINT} at step 10" in resumed.stdout
    assert (f"written by {saved_on} process(es), this run has {resumed_on}: loading ZeRO state through its "
            f"universal form {universal}") in resumed.stdout
    if resumed_on == 1:
        assert (tree_digest(universal), (universal / "converted_from.json").stat().st_mtime_ns) == first_conversion
    assert [e["step"] for e in read_events(tmp_path / "run", "resume")] == [10] * (2 if resumed_on == 1 else 1)

    # the original checkpoint is untouched; the conversion sits beside it, complete
    assert tree_digest(checkpoints / CHECKPOINT) == original
    assert json.loads((universal / "converted_from.json").read_text())["checkpoint"] == str((checkpoints / CHECKPOINT).resolve())
    assert (universal / "pytorch_model" / "zero" / "optimizer_state.pt").is_file()
    assert not list(checkpoints.glob(".partial-*"))

    # every step after the resume equals the uninterrupted run: same global batches, same state
    assert_same_run(straight(strategy), tmp_path / "run")


def test_zero0_checkpoint_holds_full_state_and_resumes_as_it_is(straight, assets, isolated_env, tmp_path):
    """ZeRO-0 partitions nothing: its checkpoint loads on another world size without conversion. (The
    reference is the 2-rank ZeRO-2 run: every strategy gives the same training, see test_distributed.)"""
    path = write_recipe(tmp_path / "recipe.yaml", elastic_recipe(assets, tmp_path / "run"))
    assert launch(path, isolated_env, "zero0", 2, fault="0:13").returncode != 0
    resumed = launch(path, isolated_env, "zero0", 1)
    check_ok(resumed)
    assert "written by 2 process(es), this run has 1: loading full state" in resumed.stdout
    assert not list((tmp_path / "run" / "checkpoints").glob("*.universal"))
    assert_same_run(straight("zero2"), tmp_path / "run")


def test_a_world_size_change_with_another_global_batch_is_refused(assets, isolated_env, tmp_path):
    """Without training.global_batch_size the global batch follows the world size, so the data
    position cannot carry over: refused in one line, nothing converted or changed."""
    recipe = elastic_recipe(assets, tmp_path / "run", grad_accum_steps=2)
    del recipe["training"]["global_batch_size"]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert launch(path, isolated_env, "zero2", 2, fault="0:13").returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    before = tree_digest(checkpoints)
    result = launch(path, isolated_env, "zero2", 1)
    assert result.returncode != 0
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert f"checkpoint.resume: {checkpoints / CHECKPOINT} was written with global batch 8, this run has 4" in line
    assert "Keep training.global_batch_size the same" in line
    assert tree_digest(checkpoints) == before  # nothing converted, nothing changed
