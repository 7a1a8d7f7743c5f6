"""sft.packing without launching anything: a packed micro-batch (one padding-free row, position ids
restarting per conversation) gives every supervised token the loss it has unpacked, on the tiny GPT-2
and on every family the task accepts for packing; families and methods that cannot keep packed
conversations apart are refused with one line."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dialogue_assets import make_dialogue  # noqa: E402

from launcher.errors import ModelError, RecipeError  # noqa: E402
from launcher.recipe import validate_recipe  # noqa: E402
from launcher.tasks import TASKS  # noqa: E402
from launcher.tasks.causal_lm_sft import IGNORE, PACKING_MODEL_TYPES, encode_conversation, token_losses  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from assets import write_tiny_causal_lm

    return write_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "gpt2")


def _recipe(model_dir, tmp_path, packing=True, method="full"):
    return validate_recipe({
        "name": "u", "task": "causal_lm_sft", "model": {"name_or_path": str(model_dir)},
        "data": {"train": "x.jsonl", "text_column": "messages"}, "sft": {"packing": packing},
        "finetune": {"method": method}, "evaluation": {"metrics": ["perplexity"]},
        "output": {"dir": str(tmp_path / "run")},
    })


def _rows(tokenizer, count=6, seed=0) -> dict[str, list]:
    """Conversations of very different lengths (1- and 20-token replies, 1 or 2 exchanges)."""
    rng = random.Random(seed)
    encoded = [encode_conversation(tokenizer, make_dialogue(rng, long_reply=i % 3 == 0, exchanges=1 + i % 2),
                                   max_length=64) for i in range(count)]
    return {"input_ids": [e.input_ids for e in encoded], "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded], "example_id": list(range(count)), "truncated": [0] * count,
            "prompt_length": [e.prompt_length for e in encoded], "reply_turn": [e.reply_turn for e in encoded],
            "generate": [0] * count}


def _supervised_token_losses(task, model, batch) -> torch.Tensor:
    """The NLL of every supervised token, in conversation order."""
    logits = model(**task.model_inputs(batch)).logits
    losses = token_losses(logits, batch["labels"])
    return losses[batch["labels"][:, 1:] != IGNORE]


def test_packed_batch_has_the_unpacked_per_token_losses(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    task = TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path))
    rows = _rows(tokenizer)
    padded, packed = task.collate(rows, tokenizer), task.collate_train(rows, tokenizer)
    lengths = [len(ids) for ids in rows["input_ids"]]
    assert packed["input_ids"].shape == (1, sum(lengths)) < padded["input_ids"].shape  # one row, no padding
    assert max(lengths) >= 2 * min(lengths)  # padding matters in the unpacked batch
    starts = torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)
    assert packed["position_ids"][0, starts].tolist() == [0] * len(lengths)  # positions restart per conversation
    assert int(task.count_targets(packed)) == int(task.count_targets(padded)) > len(lengths)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        unpacked_losses = _supervised_token_losses(task, model, padded)
        packed_losses = _supervised_token_losses(task, model, packed)
        assert torch.allclose(packed_losses, unpacked_losses, rtol=0, atol=1e-5)
        # ... and so the loss the engine normalizes (a sum over targets) is the same
        sums = [float(task.loss_sum(model(**task.model_inputs(b)), b)) for b in (padded, packed)]
    assert sums[1] == pytest.approx(sums[0], rel=1e-6)
    assert "attention_mask" not in task.model_inputs(packed)


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    # LLaMA-style families (SmolLM2 is llama): rotary positions, grouped-query attention
    return AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", PACKING_MODEL_TYPES)
def test_every_accepted_family_keeps_packed_conversations_apart(model_type, attention):
    """Logits of three sequences packed into one row (position ids restarting) equal each alone."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_config(model_type)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config).eval()
    sequences = [torch.randint(0, 64, (length,)) for length in (7, 3, 11)]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
        packed = model(input_ids=torch.cat(sequences)[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(len(s)) for s in sequences])[None]).logits[0]
    assert torch.allclose(packed, alone, rtol=0, atol=1e-5), (packed - alone).abs().max()


def test_packing_is_refused_for_other_families_and_virtual_token_methods(tmp_path):
    from transformers import AutoConfig

    other = tmp_path / "neo"
    AutoConfig.for_model("gpt_neo", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                         attention_types=[[["global"], 2]]).save_pretrained(other)
    task = TASKS["causal_lm_sft"](_recipe(other, tmp_path))
    with pytest.raises(ModelError, match=r"^sft.packing: gpt_neo models are not verified .* set sft.packing=false") as caught:
        task.check_limits()
    assert "\n" not in str(caught.value)
    TASKS["causal_lm_sft"](_recipe(other, tmp_path, packing=False)).check_limits()  # unpacked: fine
    for method in ("prompt_tuning", "prefix_tuning"):
        with pytest.raises(RecipeError, match=rf"^sft.packing: finetune.method={method} adds virtual tokens"):
            TASKS["causal_lm_sft"](_recipe(other, tmp_path, method=method))
