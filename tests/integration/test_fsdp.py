"""PyTorch FSDP2 strategies on CPU gloo ranks: the same promises as DDP and ZeRO.

- `fsdp` and `fsdp_grad_op` on 2 ranks give DDP's per-step losses, gradient norms and exported weights,
  and really shard (each rank holds half the weights and Adam state).
- The same global batch gives the same training under FSDP whatever the split (micro x accumulation x
  ranks, one plain process included).
- The export is the full model: transformers reloads it and reproduces the run's test predictions.
(Resume: tests/integration/test_resume.py; LoRA: test_finetune_methods.py; generation in step:
test_task_causal_lm_sft.py; the pure parts: tests/unit/test_fsdp.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import assert_same_losses, REPO, check_ok, read_events, run_launcher, write_recipe
from test_distributed import KEY_BIAS_ATOL, STEPS, assert_same_weights, invariance_recipe, losses, weights

pytestmark = pytest.mark.slow

FSDP2 = ("--use_fsdp", "--fsdp_version", "2")
CLIP = 0.1  # below several steps' gradient norms here: clipping (over all shards) acts


def fsdp_recipe(assets, out_dir, micro_batch_size, strategy=None) -> dict:
    """test_distributed's invariance recipe, plus validation every 2 steps keeping the best weights:
    evaluation between training steps, and the best weights restored into the sharded model at the end."""
    recipe = invariance_recipe(assets, out_dir, micro_batch_size=micro_batch_size, max_grad_norm=CLIP)
    recipe["evaluation"].update(every_steps=2, best_metric="accuracy")
    if strategy:
        recipe["distributed"] = {"strategy": strategy}
    return recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, assets, isolated_env):
    """Global batch 8 under DDP and FSDP, split as micro x accumulation x ranks."""
    def train(name, micro, nproc=None, accelerate_args=(), strategy=None):
        root = tmp_path_factory.mktemp(name.replace(" ", "-"))
        path = write_recipe(root / "recipe.yaml", fsdp_recipe(assets, root / "run", micro, strategy))
        check_ok(run_launcher(["train", str(path)], isolated_env, nproc=nproc, accelerate_args=accelerate_args))
        return root / "run"

    out = {
        "ddp 4x1x2": train("ddp 4x1x2", 4, 2, ("--multi_gpu",)),
        "fsdp 4x1x2": train("fsdp 4x1x2", 4, 2, FSDP2),
        "fsdp 2x2x2": train("fsdp 2x2x2", 2, 2, FSDP2),
        # one plain process: the launcher gives it a one-rank environment and shards over that one rank
        "fsdp 8x1x1": train("fsdp 8x1x1", 8, strategy="fsdp"),
    }
    # `launcher run` writes the accelerate config (distributed_type FSDP) and launches it
    root = tmp_path_factory.mktemp("grad_op222")
    path = write_recipe(root / "recipe.yaml", fsdp_recipe(assets, root / "run", 2))
    result = subprocess.run([sys.executable, "-m", "launcher", "run", str(path), "--nproc", "2", "--strategy", "fsdp_grad_op"],
                            env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    check_ok(result)
    out["fsdp_grad_op 2x2x2"] = root / "run"
    return out


def grad_norms(run_dir) -> list[float]:
    return [e["grad_norm"] for e in read_events(run_dir, "train")]


@pytest.mark.parametrize("name", ["fsdp 4x1x2", "fsdp 2x2x2", "fsdp 8x1x1", "fsdp_grad_op 2x2x2"])
def test_fsdp_trains_like_ddp(runs, name):
    """Per-step losses (rel 1e-5, as for ZeRO), gradient norms, the best validation step and the
    exported (best) weights equal DDP's. The reduction order differs (reduce-scatter of shards vs one
    all-reduce), so float32 rounding differs at ~1e-7 (measured: weights within 1e-7 after 6 steps);
    the weights' relative tolerance (1e-5, as for ZeRO) leaves room for Adam amplifying that on
    near-zero gradients (the attention key bias, whose gradient is zero in exact arithmetic, is not
    compared)."""
    strategy, split = name.split()
    micro, accum, world = (int(x) for x in split.split("x"))
    run_dir, reference = runs[name], runs["ddp 4x1x2"]
    start = read_events(run_dir, "start")[0]
    assert start["strategy"] == strategy
    assert (start["micro_batch_size"], start["grad_accum_steps"], start["world_size"]) == (micro, accum, world)
    assert_same_losses(losses(run_dir), losses(reference), rel=1e-5)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(reference), rel=1e-5)  # (before clipping)
    assert max(grad_norms(reference)) > 2 * CLIP
    assert [e["lr"] for e in read_events(run_dir, "train")] == pytest.approx([e["lr"] for e in read_events(reference, "train")])
    assert losses(reference)[-1] < losses(reference)[0]  # training moved the weights
    # the export holds the best validation weights, restored into the shards at the end of the run
    best, reference_best = (json.loads((d / "metrics.json").read_text())["best"] for d in (run_dir, reference))
    assert best == reference_best and best["step"] < STEPS
    assert_same_weights(weights(reference), weights(run_dir), KEY_BIAS_ATOL)


@pytest.mark.parametrize("name", ["fsdp 4x1x2", "fsdp_grad_op 2x2x2"])
def test_fsdp_ranks_hold_half_the_weights_and_optimizer_state(runs, name):
    """Sharding really happened (accelerate would silently run DDP instead - same losses - if it did
    not take the FSDP plugin): after the first step each of 2 ranks holds about half of DDP's
    parameter and Adam-moment bytes (FSDP2 pads each tensor's first dimension to a multiple of 2)."""
    ddp = read_events(runs["ddp 4x1x2"], "first_step")[0]
    fsdp = read_events(runs[name], "first_step")[0]
    for key in ("rank_parameter_bytes", "rank_adam_moment_bytes"):
        assert 0.5 <= fsdp[key] / ddp[key] < 0.51, (key, fsdp[key], ddp[key])
    assert fsdp["rank_master_weight_bytes"] == 0


def test_launcher_run_wrote_an_fsdp2_accelerate_config(runs):
    config = yaml.safe_load((runs["fsdp_grad_op 2x2x2"] / "launch" / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 2
    assert config["fsdp_config"]["fsdp_version"] == 2 and config["fsdp_config"]["fsdp_reshard_after_forward"] is False


@pytest.mark.parametrize("name", ["fsdp 4x1x2", "fsdp_grad_op 2x2x2"])
def test_fsdp_export_is_the_full_model_the_ranks_evaluated(runs, name):
    """Reload the export with transformers in a plain process: the plain class name (not FSDP's
    FSDPBertFor...), full-size tensors, and the test predictions the sharded model made in the run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = runs[name]
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    exported = weights(run_dir)
    for param_name, param in model.named_parameters():
        assert exported[param_name].shape == param.shape and param.numel() > 0, param_name
    rows = [json.loads(x) for x in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == list(range(53))
    with torch.no_grad():
        encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        probabilities = model(**encoded).logits.softmax(-1)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for row, probs in zip(rows, probabilities.tolist()):
        assert [row["probabilities"][label] for label in labels] == pytest.approx(probs, abs=1e-5)
    ddp_metrics = json.loads((runs["ddp 4x1x2"] / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert metrics[split]["accuracy"] == ddp_metrics[split]["accuracy"]
        assert metrics[split]["loss"] == pytest.approx(ddp_metrics[split]["loss"], rel=1e-5)


def test_nonfinite_steps_are_skipped_under_fsdp(assets, isolated_env, tmp_path):
    """on_nonfinite_loss=skip: the sharded gradients of a non-finite step are dropped, the run goes on."""
    recipe = invariance_recipe(assets, tmp_path / "run", learning_rate=1e30, max_steps=12, max_grad_norm=0)
    recipe["distributed"] = {"strategy": "fsdp"}
    recipe["training"]["on_nonfinite_loss"] = "skip"
    check_ok(run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["strategy"] == "fsdp" and metrics["train"]["skipped_steps"] > 0
    assert len(read_events(tmp_path / "run", "skipped_step")) == metrics["train"]["skipped_steps"]
