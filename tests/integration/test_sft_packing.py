"""sft.packing end to end on the tiny GPT-2 and the toy dialogues (1- and 20-token replies, so the
unpacked batches carry a lot of padding):

- packed runs split as 8x1x1, 4x2x1 and 2x2x2 (micro x accumulation x ranks, 2 gloo ranks) log the
  per-step losses of the unpacked 8x1x1 run and export its weights: packing changes speed, not the
  answer, and the step still holds the same examples whatever the split;
- the packed steps hold no padding (the throughput counts: real tokens == tokens fed);
- a packed 2-rank run killed mid-way and resumed equals the straight packed run.
"""

from __future__ import annotations

import pytest
from conftest import assert_same_losses, assert_same_weights, check_ok, read_events, run_launcher, write_recipe

from dialogue_assets import write_dialogue_splits
from test_task_causal_lm_sft import KEY_BIAS_ATOL, STEPS, losses, sft_recipe, weights

pytestmark = pytest.mark.slow

CHECKPOINT = {"every_steps": 2, "keep_last": 3}


@pytest.fixture(scope="module")
def dialogue_data(tmp_path_factory) -> dict:
    return write_dialogue_splits(tmp_path_factory.mktemp("dialogues"))


def packing_recipe(assets, data, out_dir, packing: bool, micro: int) -> dict:
    # random batches (no length grouping): the unpacked run pads short conversations to long ones
    recipe = sft_recipe(assets, data, out_dir, micro_batch_size=micro, group_by_length=False)
    recipe["sft"] = {"generate_max_new_tokens": 0, "packing": packing}
    recipe["checkpoint"] = CHECKPOINT
    return recipe


def launch(path, env, nproc, fault=None):
    env = dict(env, LAUNCHER_FAULT=fault) if fault else env
    if nproc == 1:
        return run_launcher(["train", str(path)], env)
    return run_launcher(["train", str(path)], env, nproc=nproc, accelerate_args=("--multi_gpu",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, assets, dialogue_data, isolated_env) -> dict:
    out = {}
    for name, packing, micro, nproc in (("unpacked 8x1x1", False, 8, 1), ("packed 8x1x1", True, 8, 1),
                                        ("packed 4x2x1", True, 4, 1), ("packed 2x2x2", True, 2, 2)):
        root = tmp_path_factory.mktemp(name.replace(" ", "-"))
        path = write_recipe(root / "recipe.yaml", packing_recipe(assets, dialogue_data, root / "run", packing, micro))
        check_ok(launch(path, isolated_env, nproc))
        out[name] = root / "run"
    return out


def test_packed_runs_train_like_the_unpacked_run_on_every_split(runs):
    reference = losses(runs["unpacked 8x1x1"])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    unpacked = read_events(runs["unpacked 8x1x1"], "train")
    assert sum(e["padded_tokens"] for e in unpacked) > 1.2 * sum(e["tokens"] for e in unpacked)  # padding to remove
    ref_weights = weights(runs["unpacked 8x1x1"])
    for name, run_dir in runs.items():
        micro, accum, world = (int(x) for x in name.split()[1].split("x"))
        start = read_events(run_dir, "start")[0]
        assert (start["micro_batch_size"], start["grad_accum_steps"], start["world_size"]) == (micro, accum, world)
        assert_same_losses(losses(run_dir), reference, rel=1e-5)
        assert_same_weights(ref_weights, weights(run_dir), KEY_BIAS_ATOL)
        events = read_events(run_dir, "train")
        assert [e["tokens"] for e in events] == [e["tokens"] for e in unpacked], name  # the same real tokens
        if name.startswith("packed"):
            assert all(e["padded_tokens"] == e["tokens"] for e in events), name  # and nothing else


def test_packed_run_killed_and_resumed_equals_the_straight_run(runs, assets, dialogue_data, isolated_env, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", packing_recipe(assets, dialogue_data, tmp_path / "run", True, 2))
    run_dir = tmp_path / "run"
    failed = launch(path, isolated_env, 2, fault="1:5")  # rank 1 fails in step 5; the last checkpoint is step 4
    assert failed.returncode != 0 and "injected fault" in failed.stderr
    resumed = launch(path, isolated_env, 2)
    check_ok(resumed)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000004'}" in resumed.stdout
    straight = runs["packed 2x2x2"]
    steps = {e["step"]: e["loss"] for e in read_events(run_dir, "train")}
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert_same_losses([steps[s] for s in sorted(steps)], losses(straight), rel=1e-6)
    assert_same_weights(weights(straight), weights(run_dir), KEY_BIAS_ATOL, rel=1e-6)
