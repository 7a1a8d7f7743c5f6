"""Parameter-efficient fine-tuning: each method learns, touches only what it should, and its export
reloads (launcher.finetune.load_exported) and reproduces the run's own test predictions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import check_ok, read_events, run_launcher, toy_recipe_dict, write_recipe

from launcher.finetune import load_exported

pytestmark = pytest.mark.slow

# Learning rates that make each method learn the toy task within a few epochs.
METHODS = {
    "lora": {"learning_rate": 1e-2},
    "ia3": {"learning_rate": 1e-1},
    "prompt_tuning": {"learning_rate": 3e-2},
    "prefix_tuning": {"learning_rate": 1e-2},
    "adapter": {"learning_rate": 1e-2},
    "bitfit": {"learning_rate": 1e-2},
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, assets, isolated_env):
    """'Pretrained' tiny bases: PEFT methods adapt a model whose features already mean something, so
    the tiny random models are first fully fine-tuned on a related task, and only their body is kept
    (the classification head starts fresh)."""
    from transformers import AutoModel, AutoTokenizer

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for key, name in (("model", "bert"), ("causal_lm", "gpt2")):
        recipe = toy_recipe_dict(assets, root / f"{name}-run", training={"epochs": 3, "learning_rate": 3e-3})
        recipe["model"] = {"name_or_path": assets[key]}
        recipe["data"]["labels"] = ["positive", "negative"]  # a different label order than the tests use
        check_ok(run_launcher(["train", str(write_recipe(root / f"{name}.yaml", recipe))], isolated_env))
        body = AutoModel.from_pretrained(root / f"{name}-run" / "model")
        body.save_pretrained(root / name)
        AutoTokenizer.from_pretrained(root / f"{name}-run" / "model").save_pretrained(root / name)
        out[key] = str(root / name)
    return out


def method_recipe(assets, out_dir, method, **finetune):
    assets = {**assets, **assets.get("bases", {})}
    recipe = toy_recipe_dict(
        assets, out_dir,
        finetune={"method": method, "lora_r": 4, "num_virtual_tokens": 4, "adapter_size": 8, **finetune},
        training={"epochs": 4, "log_every": 10, "micro_batch_size": 16, **METHODS[method]},
        evaluation={"every_epoch": False},
    )
    if method == "prefix_tuning":  # needs past key values: a decoder (GPT-2 with a classification head)
        recipe["model"] = {"name_or_path": assets["causal_lm"]}
    return recipe


def test_methods_train_only_what_they_should(assets, bases, tmp_path):
    """In-process runs: which parameters change, and how many are trainable."""
    from accelerate.state import AcceleratorState

    from launcher.engine.run import FineTuneRun
    from launcher.recipe import load_recipe

    expectations = {
        "lora": lambda n: "lora_" in n or "classifier" in n,
        "ia3": lambda n: "ia3_" in n or "classifier" in n,
        "prompt_tuning": lambda n: "prompt_encoder" in n or "classifier" in n,
        "prefix_tuning": lambda n: "launcher_prefix" in n or "score" in n,
        "adapter": lambda n: "launcher_adapter" in n or "classifier" in n,
        "bitfit": lambda n: n.endswith(".bias") or "classifier" in n,
    }
    for method, intended in expectations.items():
        recipe_dict = method_recipe({**assets, "bases": bases}, tmp_path / method, method)
        recipe_dict["training"]["max_steps"] = 5
        path = write_recipe(tmp_path / f"{method}.yaml", recipe_dict)
        run = FineTuneRun(load_recipe(path))
        try:
            run.setup()
            module = run.accelerator.unwrap_model(run.model)
            before = {n: p.detach().clone() for n, p in module.named_parameters()}
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            run.train()
            changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
        finally:
            run.close()
            AcceleratorState._reset_state(True)
        assert trainable and all(intended(n) for n in trainable), (method, sorted(trainable - {n for n in trainable if intended(n)}))
        assert changed <= trainable, (method, sorted(changed - trainable)[:5])
        assert any("classifier" not in n and "score" not in n for n in changed), f"{method}: only the head moved"
        share = read_events(tmp_path / method, "start")[0]["trainable_share"]
        assert (share == 1.0) is False and 0 < share < (0.2 if method != "bitfit" else 0.5), (method, share)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_and_its_export_reproduces_the_test_predictions(assets, bases, isolated_env, tmp_path, method):
    path = write_recipe(tmp_path / "recipe.yaml", method_recipe({**assets, "bases": bases}, tmp_path / "run", method))
    check_ok(run_launcher(["train", str(path)], isolated_env))
    run_dir = tmp_path / "run"
    losses = [e["loss"] for e in read_events(run_dir, "train")]
    assert losses[-1] < 0.9 * losses[0], (method, losses)
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"] > 0.65  # chance is ~0.5
    _assert_export_reproduces(run_dir)
    _assert_card_snippet_predicts(run_dir, method)


def _assert_card_snippet_predicts(run_dir, method):
    """The model card's load snippet (pipeline, peft or launcher loader, per method) runs as pasted and
    predicts what the run predicted for the first test example."""
    import contextlib
    import io
    import re

    from huggingface_hub import ModelCard

    card = ModelCard.load(run_dir / "model" / "README.md")
    assert card.data.library_name == ("peft" if method in ("lora", "ia3", "prompt_tuning") else "transformers")
    assert f"**{method}** fine-tuning" in card.text
    (snippet,) = re.findall(r"```python\n(.*?)```", card.text, flags=re.S)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})  # noqa: S102 - the card's own code, as a reader would paste it
    first = json.loads((run_dir / "predictions" / "test.jsonl").read_text().splitlines()[0])
    other = ({"negative", "positive"} - {first["prediction"]}).pop()
    assert f"'{first['prediction']}'" in printed.getvalue() and f"'{other}'" not in printed.getvalue()


def _assert_export_reproduces(run_dir, model_dir="model"):
    model, tokenizer = load_exported(run_dir / model_dir)
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        probabilities = model(**encoded).logits.softmax(-1)
    config = model.config  # a peft wrapper forwards it from the base model
    labels = [config.id2label[i] for i in range(config.num_labels)]
    for row, probs in zip(rows, probabilities.tolist()):
        assert [row["probabilities"][name] for name in labels] == pytest.approx(probs, abs=1e-4)


def test_lora_merged_export_is_a_plain_model(assets, bases, isolated_env, tmp_path):
    from transformers import pipeline

    path = write_recipe(tmp_path / "recipe.yaml", method_recipe({**assets, "bases": bases}, tmp_path / "run", "lora",
                                                                merge_on_export=True))
    check_ok(run_launcher(["train", str(path)], isolated_env))
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions" / "test.jsonl").read_text().splitlines()]
    classify = pipeline("text-classification", model=str(tmp_path / "run" / "model-merged"), device="cpu")
    assert [o["label"] for o in classify([r["text"] for r in rows])] == [r["prediction"] for r in rows]


@pytest.mark.parametrize(
    "method, accelerate_args",
    [
        ("lora", ("--multi_gpu",)),
        ("adapter", ("--use_deepspeed", "--zero_stage", "2")),
        ("bitfit", ("--use_deepspeed", "--zero_stage", "2")),
        ("lora", ("--use_deepspeed", "--zero_stage", "3")),
        ("lora", ("--use_fsdp", "--fsdp_version", "2")),
    ],
)
def test_methods_under_ddp_zero_and_fsdp(assets, bases, isolated_env, tmp_path, method, accelerate_args):
    recipe = method_recipe({**assets, "bases": bases}, tmp_path / "run", method)
    recipe["evaluation"] = {"every_epoch": True, "best_metric": "accuracy"}  # best weights: save + restore paths
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    check_ok(run_launcher(["train", str(path)], isolated_env, nproc=2, accelerate_args=accelerate_args))
    assert read_events(tmp_path / "run", "start")[0]["world_size"] == 2
    _assert_export_reproduces(tmp_path / "run")


def test_unsupported_method_for_the_model_is_a_clear_error(assets, isolated_env, tmp_path):
    recipe = method_recipe(assets, tmp_path / "run", "lora", target_modules=["no_such_module"])
    result = run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env)
    assert result.returncode == 2 and "finetune.method=lora does not support this bert model" in result.stderr
    assert not (tmp_path / "run").exists()


def test_prefix_tuning_on_an_encoder_is_a_clear_error(assets, isolated_env, tmp_path):
    recipe = method_recipe(assets, tmp_path / "run", "prefix_tuning")
    recipe["model"] = {"name_or_path": assets["model"]}
    result = run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env)
    assert result.returncode == 2 and "prefix_tuning needs a decoder model that takes a key/value cache" in result.stderr
    assert not (tmp_path / "run").exists()


def test_merge_is_refused_for_methods_that_cannot_merge(assets, isolated_env, tmp_path):
    recipe = method_recipe(assets, tmp_path / "run", "adapter", merge_on_export=True)
    result = run_launcher(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))], isolated_env)
    assert result.returncode == 2 and "merge_on_export works for lora and ia3" in result.stderr
