"""Multi-process (CPU gloo) runs through `accelerate launch`: the distributed promises, checked.

- DDP and DeepSpeed ZeRO-0/1/2/3 on 2 ranks train, export, and give the same per-step losses.
- The same global batch gives the same training whatever the split (micro x accumulation x ranks).
- Evaluation on 2 ranks equals 1-process evaluation of the same weights, example by example.
- The ZeRO-3 export holds the full consolidated weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (assert_same_losses, assert_same_weights, check_ok, key_bias_tolerance, losses, read_events, run_launcher,
                      toy_recipe_dict, weights, write_recipe)

pytestmark = pytest.mark.slow

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
STEPS = 6
LEARNING_RATE = 3e-3
KEY_BIAS_ATOL = key_bias_tolerance(LEARNING_RATE, STEPS)


def invariance_recipe(assets, out_dir, **training):
    return toy_recipe_dict(
        assets, out_dir,
        model={"config_overrides": NO_DROPOUT},
        training={"max_steps": STEPS, "learning_rate": LEARNING_RATE, "log_every": 1, "global_batch_size": 8,
                  "warmup_steps": 2, "weight_decay": 0.01, "max_grad_norm": 0.5,
                  # grouping is the harder case for split invariance: it must regroup whole global batches
                  "group_by_length": True, **training},
        evaluation={"every_epoch": False, "micro_batch_size": 4},
    )


def train_run(tmp_path_factory, assets, env, name, nproc, accelerate_args=(), **training):
    root = tmp_path_factory.mktemp(name)
    path = write_recipe(root / "recipe.yaml", invariance_recipe(assets, root / "run", **training))
    result = run_launcher(["train", str(path)], env, nproc=nproc, accelerate_args=accelerate_args)
    check_ok(result)
    return root / "run"


@pytest.fixture(scope="module")
def split_runs(tmp_path_factory, assets, isolated_env, invariance_ddp_run):
    """Global batch 8 as micro x accumulation x ranks."""
    runs = {
        "8x1x1": train_run(tmp_path_factory, assets, isolated_env, "s811", None, micro_batch_size=8),
        "4x2x1": train_run(tmp_path_factory, assets, isolated_env, "s421", None, micro_batch_size=4),
        "4x1x2": invariance_ddp_run,  # (conftest: shared with test_multinode)
        "2x2x2": train_run(tmp_path_factory, assets, isolated_env, "s222", 2, ("--multi_gpu",), micro_batch_size=2),
    }
    return runs


def test_batch_split_is_what_each_run_reports(split_runs):
    for name, run_dir in split_runs.items():
        micro, accum, world = (int(x) for x in name.split("x"))
        start = read_events(run_dir, "start")[0]
        assert (start["micro_batch_size"], start["grad_accum_steps"], start["world_size"]) == (micro, accum, world)
        assert start["global_batch_size"] == 8


def test_same_global_batch_same_losses_and_weights(split_runs):
    reference = losses(split_runs["8x1x1"])
    assert len(reference) == STEPS
    ref_weights = weights(split_runs["8x1x1"])
    for name, run_dir in split_runs.items():
        assert losses(run_dir) == pytest.approx(reference, rel=1e-5), name
        assert_same_weights(ref_weights, weights(run_dir), KEY_BIAS_ATOL)
    # and training actually moved the weights (the comparison is not between untouched models)
    assert losses(split_runs["8x1x1"])[-1] < losses(split_runs["8x1x1"])[0]


def evaluate_in_one_process(run_dir, split: str, out_dir) -> tuple[dict, list[dict]]:
    """`launcher eval --checkpoint RUN/model --split SPLIT` in this process (one rank, no sharding)."""
    from accelerate.state import AcceleratorState

    from launcher.engine.eval import run_evaluation

    try:
        (result,) = run_evaluation(str(run_dir / "recipe.yaml"), [], split, run_dir / "model", out_dir)
    finally:
        AcceleratorState._reset_state(True)
    rows = [json.loads(x) for x in (out_dir / f"{split}-predictions.jsonl").read_text().splitlines()]
    return result["metrics"], rows


def test_two_rank_evaluation_equals_one_process_on_the_same_weights(split_runs, tmp_path):
    """The 2-rank run evaluated its final weights sharded over the ranks (odd split sizes: the last
    shard is padded with examples rank 0 also has); its exported model, evaluated in one process,
    must give the same metrics and, example by example, the same predictions."""
    run_dir = split_runs["4x1x2"]
    double = json.loads((run_dir / "metrics.json").read_text())
    for split, size in (("validation", 37), ("test", 53)):  # not divisible by world x batch
        single, one_process_rows = evaluate_in_one_process(run_dir, split, tmp_path / "eval")
        assert single["num_examples"] == double[split]["num_examples"] == size
        for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "per_class", "confusion_matrix"):
            assert single[key] == double[split][key], (split, key)
        assert single["loss"] == pytest.approx(double[split]["loss"], rel=1e-6)
    rows = one_process_rows  # of the test split, the one the run writes predictions for
    two_rank_rows = [json.loads(x) for x in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in two_rank_rows] == [r["id"] for r in rows] == list(range(53))
    for a, b in zip(two_rank_rows, rows):
        assert (a["text"], a["label"], a["prediction"]) == (b["text"], b["label"], b["prediction"]), a["id"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=2e-6), a["id"]
    # After 6 steps the model still predicts one class for every example (so the predictions alone
    # would not tell a shuffled row from the right one), but its probabilities differ from example to
    # example by far more than the tolerance. (A trained model's predictions are compared the same way
    # in test_eval.test_exported_checkpoint_evaluates_on_any_split.)
    positive = [r["probabilities"]["positive"] for r in rows]
    assert max(positive) - min(positive) > 50 * 2e-6


def test_eval_jobs_in_one_process_equal_separate_evaluations(split_runs, assets, tmp_path, capsys):
    """`launcher eval --jobs` (what a continual run uses for a row of its matrix): two evaluations of one
    checkpoint in one process, the second with another test file, each equal to its own evaluation."""
    from accelerate.state import AcceleratorState

    from launcher.cli import main

    run_dir = split_runs["4x1x2"]
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"overrides": [], "output": str(tmp_path / "as-is")},
                                {"overrides": [f"data.test={assets['validation']}"], "output": str(tmp_path / "swapped")}]))
    try:
        assert main(["eval", str(run_dir / "recipe.yaml"), "--checkpoint", str(run_dir / "model"), "--jobs", str(jobs)]) == 0
    finally:
        AcceleratorState._reset_state(True)
    as_is = json.loads((tmp_path / "as-is" / "test.json").read_text())["metrics"]
    swapped = json.loads((tmp_path / "swapped" / "test.json").read_text())["metrics"]
    double = json.loads((run_dir / "metrics.json").read_text())
    assert (as_is["num_examples"], swapped["num_examples"]) == (53, 37)
    for key in ("accuracy", "f1_macro", "confusion_matrix"):
        assert as_is[key] == double["test"][key] and swapped[key] == double["validation"][key], key
    assert swapped["loss"] == pytest.approx(double["validation"]["loss"], rel=1e-6)
    # a malformed job file is one line naming the option, before anything is evaluated
    for bad in ([{"overides": [], "output": "x"}], [{"overrides": []}], [{"output": "x"}, {"output": "x"}], []):
        jobs.write_text(json.dumps(bad))
        assert main(["eval", str(run_dir / "recipe.yaml"), "--checkpoint", str(run_dir / "model"), "--jobs", str(jobs)]) == 2
        assert "error: --jobs: " in capsys.readouterr().err
    # an output that cannot be written, in the second job: refused before the first job writes anything
    (tmp_path / "a-file").write_text("")
    jobs.write_text(json.dumps([{"output": str(tmp_path / "first")}, {"output": str(tmp_path / "a-file" / "x")}]))
    assert main(["eval", str(run_dir / "recipe.yaml"), "--checkpoint", str(run_dir / "model"), "--jobs", str(jobs)]) == 2
    assert not (tmp_path / "first").exists()


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory, assets, isolated_env, split_runs):
    runs = {"ddp": split_runs["4x1x2"]}
    for stage in (1, 2, 3):
        runs[f"zero{stage}"] = train_run(
            tmp_path_factory, assets, isolated_env, f"zero{stage}", 2,
            ("--use_deepspeed", "--zero_stage", str(stage)), micro_batch_size=4,
        )
    return runs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_exports_and_matches_ddp(strategy_runs, stage):
    run_dir = strategy_runs[f"zero{stage}"]
    start = read_events(run_dir, "start")[0]
    assert start["strategy"] == f"zero{stage}" and start["world_size"] == 2
    config = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == stage and config["train_batch_size"] == 8
    assert config["gradient_clipping"] == 0.5
    assert_same_losses(losses(run_dir), losses(strategy_runs["ddp"]), rel=1e-5)
    lrs = [e["lr"] for e in read_events(run_dir, "train")]
    assert lrs == pytest.approx([e["lr"] for e in read_events(strategy_runs["ddp"], "train")])
    assert_same_weights(weights(strategy_runs["ddp"]), weights(run_dir), KEY_BIAS_ATOL)


def test_zero3_export_is_the_full_model_the_ranks_evaluated(strategy_runs):
    """Reload the ZeRO-3 export in a plain process: full-size tensors, and the same test predictions
    the sharded model produced during the run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = strategy_runs["zero3"]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    exported = weights(run_dir)
    for name, param in model.named_parameters():
        assert exported[name].shape == param.shape and param.numel() > 0, name
    rows = [json.loads(x) for x in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        encoded = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
        probabilities = model(**encoded).logits.softmax(-1)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for row, probs in zip(rows, probabilities.tolist()):
        assert [row["probabilities"][name] for name in labels] == pytest.approx(probs, abs=1e-5)


def test_torchrun_runs_the_same_entry_point(tmp_path, assets, isolated_env, split_runs):
    """`torchrun -m launcher train` (no accelerate launch) is a first-class way to start ranks."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, free_port

    path = write_recipe(tmp_path / "recipe.yaml", invariance_recipe(assets, tmp_path / "run", micro_batch_size=4))
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "launcher", "train", str(path)],
        env=isolated_env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    check_ok(result)
    assert read_events(tmp_path / "run", "start")[0]["world_size"] == 2
    assert_same_losses(losses(tmp_path / "run"), losses(split_runs["4x1x2"]), rel=1e-6)
