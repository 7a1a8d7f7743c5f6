"""Batch arithmetic, strategy resolution and the generated DeepSpeed config."""

from __future__ import annotations

import json

import pytest

from launcher.errors import TopologyError
from launcher.plan import BatchPlan, Strategy, check_launch, deepspeed_config, resolve_batch, resolve_strategy
from launcher.schema import TrainingSection


def training(**values) -> TrainingSection:
    return TrainingSection(**values)


@pytest.mark.parametrize(
    "values, world, expected",
    [
        ({"micro_batch_size": 8}, 1, (8, 1, 1, 8)),
        ({"micro_batch_size": 4, "grad_accum_steps": 2}, 2, (4, 2, 2, 16)),
        ({"micro_batch_size": 4, "global_batch_size": 32}, 2, (4, 4, 2, 32)),
        ({"micro_batch_size": 2, "global_batch_size": 8, "grad_accum_steps": 2}, 2, (2, 2, 2, 8)),
    ],
)
def test_batch_arithmetic(values, world, expected):
    plan = resolve_batch(training(**values), world)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.world_size, plan.global_batch_size) == expected
    assert plan.micro_batch_size * plan.grad_accum_steps * plan.world_size == plan.global_batch_size


def test_indivisible_global_batch_spells_out_the_arithmetic():
    with pytest.raises(TopologyError) as info:
        resolve_batch(training(micro_batch_size=4, global_batch_size=30), 4)
    message = str(info.value)
    assert "global_batch_size=30" in message
    assert "micro_batch_size 4 x world_size 4 = 16" in message
    assert "30 / 16 = 1.875" in message


def test_contradicting_accumulation_is_rejected():
    with pytest.raises(TopologyError, match="grad_accum_steps=3 contradicts global_batch_size=16"):
        resolve_batch(training(micro_batch_size=4, grad_accum_steps=3, global_batch_size=16), 2)


@pytest.mark.parametrize(
    "recipe_strategy, env, expected",
    [
        ("auto", {}, "ddp"),
        ("auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "zero3"),
        ("zero2", {}, "zero2"),
        ("zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "zero2"),
        ("auto", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                  "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu",
                  "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "zero3_offload"),
    ],
)
def test_strategy_resolution(recipe_strategy, env, expected):
    assert resolve_strategy(recipe_strategy, env) == Strategy(expected)


def test_offload_the_launcher_does_not_offer_is_refused():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}
    with pytest.raises(TopologyError, match="ZeRO-2 with offload_optimizer_device=cpu"):
        resolve_strategy("auto", env)


def test_strategy_conflict_with_accelerate_config():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    with pytest.raises(TopologyError, match="distributed.strategy=zero2 but accelerate was launched with DeepSpeed zero3"):
        resolve_strategy("zero2", env)


def test_external_deepspeed_json_is_refused():
    with pytest.raises(TopologyError, match="remove deepspeed_config_file"):
        resolve_strategy("auto", {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"})


DDP, ZERO2 = Strategy("ddp"), Strategy("zero2")


def test_accelerate_accumulation_must_not_contradict_recipe():
    plan = BatchPlan(4, 2, 2, 16)
    recipe_training = training(micro_batch_size=4, grad_accum_steps=2)
    check_launch(recipe_training, DDP, plan, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}, cuda=False)  # accelerate's default
    check_launch(recipe_training, DDP, plan, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, cuda=False)
    with pytest.raises(TopologyError, match="gradient_accumulation_steps=4 but the recipe resolves to 2"):
        check_launch(recipe_training, DDP, plan, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, cuda=False)


def test_accelerate_precision_must_not_contradict_recipe():
    plan = BatchPlan(8, 1, 1, 8)
    check_launch(training(precision="bf16"), DDP, plan, {"ACCELERATE_MIXED_PRECISION": "no"}, cuda=False)
    check_launch(training(precision="bf16"), DDP, plan, {"ACCELERATE_MIXED_PRECISION": "bf16"}, cuda=False)
    with pytest.raises(TopologyError, match="mixed_precision=bf16 but the recipe says training.precision=fp32"):
        check_launch(training(), DDP, plan, {"ACCELERATE_MIXED_PRECISION": "bf16"}, cuda=False)


@pytest.mark.parametrize("values, strategy, cuda, message", [
    ({"precision": "fp16"}, DDP, False, "training.precision=fp16 needs a GPU"),
    ({"compile": True}, ZERO2, True, r"training.compile works with DDP only, not under DeepSpeed \(zero2\)"),
    ({"on_nonfinite_loss": "skip"}, ZERO2, True, "on_nonfinite_loss=skip works with DDP only"),
])
def test_one_list_of_checks_refuses_what_cannot_run(values, strategy, cuda, message):
    """The same function runs in `launcher run --dry-run` and on every rank: what it refuses, both refuse."""
    with pytest.raises(TopologyError, match=message):
        check_launch(training(**values), strategy, BatchPlan(8, 1, 1, 8), {}, cuda=cuda)
    check_launch(training(), strategy, BatchPlan(8, 1, 1, 8), {}, cuda=cuda)  # the same launch without it is fine


@pytest.mark.parametrize("strategy, stage", [("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_deepspeed_config_is_explicit(strategy, stage):
    plan = resolve_batch(training(micro_batch_size=4, global_batch_size=32), 2)
    config = deepspeed_config(Strategy(strategy), plan, training(micro_batch_size=4, global_batch_size=32, max_grad_norm=0.5))
    assert "auto" not in json.dumps(config)
    assert config["train_batch_size"] == 32 == config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 2
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in config["zero_optimization"]) == (strategy == "zero3_offload")


def test_disabled_clipping_is_written_as_zero():
    # DeepSpeed 0.19 clips at 1.0 when the key is absent; "no clipping" must be said explicitly.
    plan = resolve_batch(training(), 1)
    assert deepspeed_config(ZERO2, plan, training(max_grad_norm=0))["gradient_clipping"] == 0.0


def test_zero3_offload_is_refused_where_cpu_adam_cannot_be_built(monkeypatch, tmp_path):
    """zero3_offload's optimizer is DeepSpeed's CPU Adam, compiled on first use: without ninja or a
    compiler (and no prebuilt op) the plan says so before any process starts; with them it is accepted."""
    import launcher.plan as plan_module

    batch, training = BatchPlan(8, 1, 1, 8), TrainingSection()
    check_launch(training, Strategy("zero3_offload"), batch, {}, cuda=False)  # this machine builds it
    monkeypatch.setattr(plan_module.shutil, "which", lambda tool: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TopologyError, match=r"distributed.strategy=zero3_offload needs DeepSpeed's CPU Adam, which is "
                                            r"not built and cannot be built here \(no ninja, no C\+\+ compiler \(c\+\+\) to compile it\); install it, "
                                            r"or use zero3"):
        check_launch(training, Strategy("zero3_offload"), batch, {}, cuda=False)
    check_launch(training, Strategy("zero3"), batch, {}, cuda=False)
