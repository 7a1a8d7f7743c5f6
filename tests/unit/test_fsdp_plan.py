"""FSDP2 strategies, the pure parts: strategy from the accelerate launch environment, the generated
accelerate config as accelerate itself reads it, the memory estimate, the FSDP units, resume checks.
(The runs themselves: tests/integration/test_fsdp.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from launcher.engine.checkpoint import TrainerState, check_resumable
from launcher.engine.fsdp import fsdp_plugin, transformer_units
from launcher.errors import LauncherError, TopologyError
from types import SimpleNamespace

from launcher.launch.accelerate import env_view, generated_config
from launcher.plan import BatchPlan, Strategy, check_launch, memory_estimate, resolve_strategy
from launcher.schema import TrainingSection

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    "recipe_strategy, env, expected",
    [
        ("auto", FSDP2, "fsdp"),  # accelerate's default: reshard_after_forward true
        ("auto", {**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "true"}, "fsdp"),
        ("auto", {**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_grad_op"),
        ("fsdp_grad_op", {**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}, "fsdp_grad_op"),
        ("fsdp", {}, "fsdp"),  # torchrun / a plain process: the recipe decides
    ],
)
def test_strategy_from_the_accelerate_fsdp_settings(recipe_strategy, env, expected):
    assert str(resolve_strategy(recipe_strategy, env)) == expected


@pytest.mark.parametrize(
    "recipe_strategy, env, message",
    [
        ("fsdp", {**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"},
         "distributed.strategy=fsdp but accelerate was launched with fsdp_grad_op"),
        ("zero2", FSDP2, "distributed.strategy=zero2 but accelerate was launched with fsdp;"),
        ("auto", {"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1; the launcher runs FSDP2 only: set fsdp_version: 2"),
        ("auto", {**FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, "sets fsdp_offload_params: true"),
        ("auto", {**FSDP2, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "sets fsdp_activation_checkpointing: true"),
        ("auto", {**FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, "fsdp_reshard_after_forward: SHARD_GRAD_OP; FSDP2 takes true (strategy fsdp) or false"),
    ],
)
def test_fsdp_settings_the_launcher_does_not_run_are_refused(recipe_strategy, env, message):
    with pytest.raises(TopologyError, match=re.escape(message)):
        resolve_strategy(recipe_strategy, env)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_grad_op"])
def test_generated_accelerate_config_is_what_accelerate_launch_hands_the_ranks(tmp_path, strategy):
    """The generated config, read by accelerate's own loader and turned into each rank's environment
    by accelerate's own launch code, resolves back to the strategy it was made for - also through
    the launcher's reading of a user's --config-file (env_view)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    plan = SimpleNamespace(strategy=Strategy(strategy), nodes=1, node_rank=0, world_size=2, main_address=None,
                           main_port=29500, device="cpu",
                           recipe=SimpleNamespace(training=SimpleNamespace(precision="fp32")))
    config = generated_config(plan)
    path = tmp_path / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    loaded = load_config_from_file(str(path)).to_dict()
    assert loaded["distributed_type"] == "FSDP" and loaded["fsdp_config"]["fsdp_version"] == 2

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "launcher", "train", "r.yaml"])
    args, _, _ = _validate_launch_command(args)
    rank_env = prepare_multi_gpu_env(args)
    assert str(resolve_strategy("auto", rank_env)) == strategy
    assert rank_env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"  # every rank loads its own weights
    view = env_view(loaded)
    assert {k: v for k, v in view.items() if "FSDP" in k} == {k: rank_env[k] for k in view if "FSDP" in k}
    assert str(resolve_strategy("auto", view)) == strategy


def test_memory_estimate_shards_what_each_fsdp_strategy_shards():
    n, world = 1000, 4
    ddp = memory_estimate(n, Strategy("ddp"), "fp32", world)
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4 * n, 4 * n, 8 * n)
    full = memory_estimate(n, Strategy("fsdp"), "fp32", world)
    assert (full.parameters, full.gradients, full.optimizer, full.cpu) == (n, n, 2 * n, 0)
    grad_op = memory_estimate(n, Strategy("fsdp_grad_op"), "fp32", world)  # whole weights during the step
    assert (grad_op.parameters, grad_op.gradients, grad_op.optimizer) == (4 * n, n, 2 * n)
    # bf16 under FSDP2: accelerate keeps fp32 sharded weights (the optimizer's own), no master copy
    assert memory_estimate(n, Strategy("fsdp"), "bf16", world).device_total == full.device_total


def test_compile_is_refused_under_fsdp():
    batch = BatchPlan(8, 1, 1, 8)
    check_launch(TrainingSection(compile=False), Strategy("fsdp"), batch, {}, cuda=False)
    check_launch(TrainingSection(compile=True), Strategy("ddp"), batch, {}, cuda=False)
    with pytest.raises(TopologyError, match=r"training.compile works with DDP only, not under FSDP \(fsdp_grad_op\)"):
        check_launch(TrainingSection(compile=True), Strategy("fsdp_grad_op"), batch, {}, cuda=False)


@pytest.mark.parametrize("strategy, reshard", [("fsdp", True), ("fsdp_grad_op", False)])
def test_plugin_is_fsdp2_with_sharded_checkpoints(strategy, reshard, monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")  # what `accelerate launch --use_fsdp` sets
    import os

    plugin = fsdp_plugin(Strategy(strategy))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is reshard
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is False
    # transformers reads this variable when loading: ranks > 0 must not be left with empty weights
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "False"


def test_units_are_the_transformer_blocks_not_the_embeddings(assets):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(assets["model"], num_labels=2)
    assert set(bert._no_split_modules) == {"BertEmbeddings", "BertLayer"}  # what accelerate would wrap
    assert transformer_units(bert) == ["BertLayer"]
    gpt2 = AutoModelForCausalLM.from_pretrained(assets["causal_lm"])  # tied input/output embeddings
    assert transformer_units(gpt2) == ["GPT2Block"]


def _state(**values) -> TrainerState:
    return TrainerState(**{"step": 10, "world_size": 2, "strategy": "fsdp", "global_batch_size": 8, **values})


def test_fsdp_checkpoints_resume_only_under_fsdp_on_the_same_world_size():
    directory = Path("run/checkpoints/step-00000010")
    check_resumable(_state(), "fsdp", 2, 8, directory)
    with pytest.raises(LauncherError, match="written under fsdp, this run uses ddp; resume with distributed.strategy=fsdp"):
        check_resumable(_state(), "ddp", 2, 8, directory)
    with pytest.raises(LauncherError, match="written under ddp, this run uses fsdp_grad_op"):
        check_resumable(_state(strategy="ddp"), "fsdp_grad_op", 2, 8, directory)
    with pytest.raises(LauncherError, match=re.escape("FSDP state sharded over 2 ranks (and their random states), "
                                                      "this run has 4. Resume with 2 processes")):
        check_resumable(_state(), "fsdp", 4, 8, directory)
