"""causal_lm_sft without launching anything: which tokens are supervised (token by token, on two
chat templates), conversation validation, truncation/drop counting, and why the loss must be a sum
over tokens normalized over the whole step (a per-micro-batch mean is not split-invariant)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dialogue_assets import make_dialogue  # noqa: E402

from launcher.errors import DataError, ModelError  # noqa: E402
from launcher.recipe import validate_recipe  # noqa: E402
from launcher.schema import Recipe  # noqa: E402
from launcher.tasks.causal_lm_sft import SFTSection  # noqa: E402
from launcher.tasks import TASKS  # noqa: E402
from launcher.tasks.causal_lm_sft import IGNORE, encode_conversation, normalize_conversation  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """ChatML like SmolLM2/Qwen: special <|im_start|>/<|im_end|>, and a newline token after the end marker."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>", "\n", " ", "system", "user", "assistant", "hi", "hello", "there",
             "how", "are", "you", "fine", "thanks", "be", "brief"]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[ \n]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHATML
    return tokenizer


def supervised_tokens(tokenizer, encoded) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(t) for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]


def test_tiny_template_supervises_exactly_the_assistant_content_and_its_eos(tiny_tokenizer):
    messages = [{"role": "system", "content": "the film"}, {"role": "user", "content": "good film"},
                {"role": "assistant", "content": "positive"}, {"role": "user", "content": "bad plot"},
                {"role": "assistant", "content": "negative very bad"}]
    encoded = encode_conversation(tiny_tokenizer, messages, max_length=64)
    tokens = tiny_tokenizer.convert_ids_to_tokens(encoded.input_ids)
    # <system> is not in the toy vocabulary: <unk>
    expected = [("<unk>", 0), ("the", 0), ("film", 0), ("<eos>", 0), ("<user>", 0), ("good", 0), ("film", 0),
                ("<eos>", 0), ("<assistant>", 0), ("positive", 1), ("<eos>", 1), ("<user>", 0), ("bad", 0),
                ("plot", 0), ("<eos>", 0), ("<assistant>", 0), ("negative", 1), ("very", 1), ("bad", 1), ("<eos>", 1)]
    assert list(zip(tokens, [int(label != IGNORE) for label in encoded.labels])) == expected
    # a supervised label is the token itself (the loss shifts), everything else is ignored
    assert all(label in (IGNORE, token) for token, label in zip(encoded.input_ids, encoded.labels))
    assert encoded.input_ids == tiny_tokenizer(tiny_tokenizer.apply_chat_template(messages, tokenize=False),
                                               add_special_tokens=False)["input_ids"]
    assert encoded.supervised == 6 and not encoded.truncated
    assert (encoded.reply_turn, encoded.prompt_length) == (4, 16)  # the last reply starts after 16 tokens


def test_chatml_supervises_the_end_marker_but_not_the_newline_after_it(chatml_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]
    encoded = encode_conversation(chatml_tokenizer, messages, max_length=100)
    tokens = chatml_tokenizer.convert_ids_to_tokens(encoded.input_ids)
    marks = "".join("S" if label != IGNORE else "." for label in encoded.labels)
    shown = list(zip(tokens, marks))
    assert shown[-8:] == [("<|im_start|>", "."), ("assistant", "."), ("\n", "."), ("fine", "S"), (" ", "S"),
                          ("thanks", "S"), ("<|im_end|>", "S"), ("\n", ".")]
    first_reply = tokens.index("hello")
    assert shown[first_reply - 1:first_reply + 3] == [("\n", "."), ("hello", "S"), ("<|im_end|>", "S"), ("\n", ".")]
    assert supervised_tokens(chatml_tokenizer, encoded) == ["hello", "<|im_end|>", "fine", " ", "thanks", "<|im_end|>"]


def test_truncation_cuts_labels_and_keeps_a_prompt_that_fits(tiny_tokenizer):
    messages = [{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"},
                {"role": "user", "content": "bad plot"}, {"role": "assistant", "content": "negative very bad"}]
    full = encode_conversation(tiny_tokenizer, messages, max_length=64)
    cut = encode_conversation(tiny_tokenizer, messages, max_length=len(full.input_ids) - 2)
    assert cut.truncated and cut.input_ids == full.input_ids[:-2] and cut.labels == full.labels[:-2]
    assert cut.supervised == full.supervised - 2
    assert cut.reply_turn == 3  # the last reply still starts within max_length
    early = encode_conversation(tiny_tokenizer, messages, max_length=6)  # <user> good film <eos> <assistant> positive
    assert early.supervised == 1 and early.reply_turn == 1
    none = encode_conversation(tiny_tokenizer, messages, max_length=5)  # ends at <assistant>
    assert none.supervised == 0 and none.reply_turn == -1


def test_normalize_conversation_checks_rows_and_applies_the_system_prompt():
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}]
    assert normalize_conversation(conversation, "row 1", "messages") == conversation[:2]  # trailing user turn dropped
    with_system = normalize_conversation(json.dumps(conversation), "row 1", "messages", system_prompt="be brief")
    assert with_system[0] == {"role": "system", "content": "be brief"} and with_system[1:] == conversation[:2]
    own_system = [{"role": "system", "content": "mine"}, *conversation[:2]]
    assert normalize_conversation(own_system, "row 1", "messages", system_prompt="be brief") == own_system
    assert normalize_conversation([{"role": "user", "content": "hi"}], "row 1", "messages") == []
    cases = {
        "not JSON": "hello",
        "role 'tool'": [{"role": "tool", "content": "x"}],
        "content is empty": [{"role": "user", "content": None}],
        "not a {role, content} mapping": [{"role": "user"}],
        "starts with an assistant message": [{"role": "assistant", "content": "hi"}],
        "is empty": None,
    }
    for expected, value in cases.items():
        with pytest.raises(DataError, match="row 7") as caught:
            normalize_conversation(value, "data.train (x.jsonl) row 7", "messages")
        assert expected in str(caught.value) and "\n" not in str(caught.value)


def _recipe(model_dir, tmp_path, **data) -> Recipe:
    return validate_recipe({
        "name": "u", "task": "causal_lm_sft", "model": {"name_or_path": str(model_dir)},
        "data": {"train": "x.jsonl", "text_column": "messages", **data},
        "evaluation": {"metrics": ["perplexity"]}, "output": {"dir": str(tmp_path / "run")},
    })


def test_clean_split_counts_truncated_and_drops_conversations_without_a_reply(tiny_dir, tmp_path):
    import datasets

    rows = [
        [{"role": "user", "content": "good"}, {"role": "assistant", "content": "positive"}],  # kept
        [{"role": "user", "content": "good film"}],  # no assistant turn: dropped
        [{"role": "user", "content": " ".join(["film"] * 20)}, {"role": "assistant", "content": "positive"}],  # reply cut off
        [{"role": "user", "content": "bad"}, {"role": "assistant", "content": " ".join(["bad"] * 12)}],  # truncated, kept
    ]
    task = TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path, max_length=10))
    dataset = datasets.Dataset.from_dict({"messages": rows, "_row": list(range(4))})
    cleaned, dropped = task.clean_split("train", dataset, "data.train (x.jsonl)")
    assert dropped == 2 and cleaned["_row"] == [0, 3]
    assert task.report["train"] == {"conversations": 2, "truncated": 1, "dropped_no_assistant_turn": 1,
                                    "dropped_truncated_away": 1}
    features = cleaned.map(task.encoder(task.tokenizer), batched=True, with_indices=True,
                           remove_columns=cleaned.column_names)
    assert features["truncated"] == [0, 1] and features["example_id"] == [0, 1]
    assert all(len(ids) <= 10 for ids in features["input_ids"])
    # the metrics say it too, for every split
    metrics = task.compute_metrics([{"id": 0, "nll": 2.0, "tokens": 2, "truncated": False, "reply_turn": 1},
                                    {"id": 1, "nll": 6.0, "tokens": 6, "truncated": True, "reply_turn": 1}])
    assert metrics["truncated"] == 1 and metrics["data"]["train"]["dropped_truncated_away"] == 1
    assert metrics["loss"] == pytest.approx(1.0) and metrics["perplexity"] == pytest.approx(2.718281828)


def test_a_bad_row_is_named(tiny_dir, tmp_path):
    import datasets

    task = TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path))
    dataset = datasets.Dataset.from_dict({"messages": ['[{"role": "user", "content": "hi"}]', "[{oops"],
                                          "_row": [0, 1]})
    with pytest.raises(DataError, match=r"^data.train \(x.jsonl\) row 2: data.text_column 'messages' is text that is not JSON"):
        task.clean_split("train", dataset, "data.train (x.jsonl)")


def test_a_tokenizer_without_chat_template_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    tokenizer.chat_template = None
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    task = TASKS["causal_lm_sft"](_recipe(plain, tmp_path))
    with pytest.raises(ModelError, match=r"^model.tokenizer: the tokenizer from .* has no chat template.*use a chat/instruct"):
        task.encoder(AutoTokenizer.from_pretrained(plain))


def test_recipe_checks_for_the_task(tiny_dir, tmp_path):
    from launcher.errors import RecipeError
    from launcher.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\ntask: causal_lm_sft\nmodel: {{name_or_path: {tiny_dir}}}\ndata: {{train: x.jsonl}}\n")
    assert load_recipe(path).evaluation.metrics == ["perplexity"]  # the task's default
    with pytest.raises(RecipeError, match=r"evaluation.metrics\[0\]: unknown metric 'accuracy'.*available: perplexity"):
        load_recipe(path, ["evaluation.metrics=[accuracy]"])
    recipe = load_recipe(path, ["evaluation.metrics=[perplexity]", "evaluation.best_metric=perplexity"])
    assert TASKS["causal_lm_sft"](recipe).best_is_greater() is False  # lower perplexity wins by default
    recipe = load_recipe(path, ["evaluation.metrics=[perplexity]", "evaluation.best_metric=perplexity",
                                "evaluation.greater_is_better=true"])
    with pytest.raises(RecipeError, match="greater_is_better=true would keep the worst model"):
        TASKS["causal_lm_sft"](recipe)
    recipe = load_recipe(path, ["evaluation.metrics=[perplexity]", "sft.system_prompt=hi"])
    assert TASKS["causal_lm_sft"](recipe).sft.system_prompt == "hi"
    gguf = load_recipe(path, ["evaluation.metrics=[perplexity]", "model.gguf_file=m.gguf"])
    with pytest.raises(ModelError, match="model.tokenizer: a GGUF model .* needs its tokenizer as a directory"):
        TASKS["causal_lm_sft"](gguf)


# ---------------------------------------------------------------------------------------------
# Why token sums normalized over the step: the same global batch gives the same gradient however it
# is split; a mean per micro-batch (what a naive loop computes) does not when replies differ in length.


def _step_gradient(model, task, batches, normalization: str) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    total_targets = float(sum(task.count_targets(b) for b in batches))
    for batch in batches:
        outputs = model(**task.model_inputs(batch))
        if normalization == "step":  # the engine: sum over tokens / targets in the whole step
            loss = task.loss_sum(outputs, batch) / total_targets
        else:  # naive: token mean inside each micro-batch, averaged over micro-batches
            loss = task.loss_sum(outputs, batch) / task.count_targets(batch).float() / len(batches)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def test_per_micro_batch_mean_is_not_split_invariant_but_the_step_normalized_sum_is(tiny_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    task = TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path))
    rng = random.Random(0)
    # replies of 1 and 20 content tokens, so micro-batches hold very different numbers of targets
    conversations = [make_dialogue(rng, long_reply=i in (1, 2)) for i in range(8)]
    encoded = [encode_conversation(tiny_tokenizer, c, max_length=64) for c in conversations]
    rows = {"input_ids": [e.input_ids for e in encoded], "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded], "example_id": list(range(8)), "truncated": [0] * 8,
            "prompt_length": [e.prompt_length for e in encoded], "reply_turn": [e.reply_turn for e in encoded],
            "generate": [0] * 8}

    def split(size):
        return [task.collate({k: v[i:i + size] for k, v in rows.items()}, tiny_tokenizer) for i in range(0, 8, size)]

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.eval()  # no dropout: the comparison is about normalization only
    targets = [int(task.count_targets(b)) for b in split(2)]
    assert max(targets) >= 5 * min(targets), targets
    reference = _step_gradient(model, task, split(8), "step")
    for size in (4, 2, 1):
        same = _step_gradient(model, task, split(size), "step")
        assert (same - reference).norm() / reference.norm() < 1e-5, size
        naive = _step_gradient(model, task, split(size), "naive")
        assert (naive - reference).norm() / reference.norm() > 0.05, size


def test_batched_generation_equals_generating_each_prompt_alone(tiny_dir, tiny_tokenizer, tmp_path):
    """predict_batch generates from left-padded prompts of different lengths (the conversation up to its
    last reply); each equals greedy generation on that prompt alone."""
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tiny_dir, tmp_path)
    recipe.sft = SFTSection(generate_max_new_tokens=5)
    task = TASKS["causal_lm_sft"](recipe)
    rng = random.Random(3)
    conversations = [make_dialogue(rng, long_reply=i % 2 == 0, exchanges=1 + i % 2, system=i == 2) for i in range(4)]
    encoded = [encode_conversation(tiny_tokenizer, c, max_length=64) for c in conversations]
    rows = {"input_ids": [e.input_ids for e in encoded], "attention_mask": [[1] * len(e.input_ids) for e in encoded],
            "labels": [e.labels for e in encoded], "example_id": list(range(4)), "truncated": [0] * 4,
            "prompt_length": [e.prompt_length for e in encoded], "reply_turn": [e.reply_turn for e in encoded],
            "generate": [1] * 4}
    assert len({e.prompt_length for e in encoded}) > 1  # prompts of different lengths: padding matters
    batch = task.collate(rows, tiny_tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        records = task.predict_batch(model, batch, tiny_tokenizer)
    for record, conversation, e in zip(records, conversations, encoded):
        prompt = torch.tensor([e.input_ids[:e.prompt_length]])
        text = tiny_tokenizer.apply_chat_template(conversation[:e.reply_turn], add_generation_prompt=True, tokenize=False)
        assert tiny_tokenizer(text, add_special_tokens=False)["input_ids"] == prompt[0].tolist()
        with torch.no_grad():
            alone = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                                   pad_token_id=tiny_tokenizer.pad_token_id)
        expected = tiny_tokenizer.decode(alone[0, prompt.shape[1]:], skip_special_tokens=True).strip()
        assert record["generated"] == expected
    assert any(r["generated"] for r in records)


def test_the_chat_template_is_part_of_the_data_cache_key(tiny_dir, tmp_path):
    """The tokenizer fingerprint covers the vocabulary, not the template: the task adds the template, so
    features rendered with another template are never reused."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other-template"
    shutil.copytree(tiny_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = tokenizer.chat_template.replace("' <eos> '", "' <eos> \\n'")
    tokenizer.save_pretrained(other)
    first = TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path)).cache_inputs()
    second = TASKS["causal_lm_sft"](_recipe(other, tmp_path)).cache_inputs()
    assert first != second and first == TASKS["causal_lm_sft"](_recipe(tiny_dir, tmp_path)).cache_inputs()
