"""Continual recipes without training: the section's checks (one line, exit 2, nothing written), the shared
label space, each stage's recipe, the replay buffer as a pure function of seed and data, and the forgetting
matrix's summary numbers against a hand computation."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
import yaml
from assets import write_toy_topic_csv
from conftest import toy_recipe_dict

from launcher.cli import main
from launcher.errors import DataError, LauncherError, RecipeError
from launcher.forgetting import summarize, table
from launcher.launch.continual import label_groups, make_continual, replay_buffer, replay_count, replay_rows
from launcher.launch.plan import LaunchRequest, build_plan
from launcher.recipe import load_recipe
from launcher.tasks import TASKS


def continual_recipe(assets, tmp_path, topic_dir, **continual) -> dict:
    recipe = toy_recipe_dict(assets, tmp_path / "run")
    stages = [
        {"name": "sentiment", "data": {"train": assets["train"], "validation": assets["validation"], "test": assets["test"]}},
        {"name": "topic", "data": {"train": str(topic_dir / "train.csv"), "test": str(topic_dir / "test.csv"),
                                   "validation_size": 0.1, "text_column": "sentence", "label_column": "topic"},
         "training": {"max_steps": 3}},
    ]
    recipe["data"] = {"max_length": 32}  # what every stage shares; the files are the stages'
    recipe["continual"] = {"stages": stages, **continual}
    return recipe


@pytest.fixture(scope="module")
def topic_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("topic")
    write_toy_topic_csv(directory / "train.csv", 60, seed=1)
    write_toy_topic_csv(directory / "test.csv", 21, seed=2)
    return directory


def write(tmp_path, recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


# ---- the section's checks ------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(strategy="forget"), "continual.strategy: Input should be 'naive', 'replay' or 'ewc'"),
    (lambda c: c.update(label_space="per_task"), "continual.label_space: Input should be 'shared' or 'per_stage'"),
    (lambda c: c.update(ewc={"weight": 1.0}), "continual.ewc is set but strategy is naive"),
    (lambda c: c.update(strategy="ewc"), "strategy ewc needs continual.ewc (at least weight)"),
    (lambda c: c["stages"][1]["data"].pop("train"), "stage 'topic' has no data.train; each stage trains on its own data"),
    (lambda c: c.update(replay={"buffer_size": 10}), "continual.replay is set but strategy is naive"),
    (lambda c: c.update(strategy="replay"), "strategy replay needs continual.replay (at least buffer_size)"),
    (lambda c: c["stages"][1].update(name="sentiment"), "stage name 'sentiment' is used twice"),
    (lambda c: c["stages"][1]["data"].update(trian="x.csv"), "data.trian: unknown key; did you mean train?"),
    (lambda c: c["stages"][1]["training"].update(epoch=1), "training.epoch: unknown key; did you mean epochs?"),
    (lambda c: c.update(stages=c["stages"][:1]), "continual.stages: List should have at least 2 items"),
    (lambda c: c.update(replay={"buffer_size": 10, "ratio": 1.0}, strategy="replay"), "continual.replay.ratio: Input should be less than 1"),
])
def test_bad_continual_section_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, topic_dir, capsys, change, message):
    recipe = continual_recipe(assets, tmp_path, topic_dir)
    change(recipe["continual"])
    assert main(["run", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_stage_checks_name_the_stage_before_any_work(assets, tmp_path, topic_dir, capsys):
    recipe = continual_recipe(assets, tmp_path, topic_dir)
    recipe["continual"]["stages"][1]["data"].pop("test")
    assert main(["run", write(tmp_path, recipe)]) == 2
    err = capsys.readouterr().err
    assert "continual.stages[1] (topic): no test split for the forgetting matrix; give data.test or data.test_size" in err
    recipe = continual_recipe(assets, tmp_path, topic_dir)
    recipe["continual"]["stages"][1]["data"]["label_column"] = "label"
    assert main(["run", write(tmp_path, recipe)]) == 2
    assert "continual.stages[1] (topic): data.train" in capsys.readouterr().err  # the column is not in its file
    recipe = continual_recipe(assets, tmp_path, topic_dir, metric="bleu")
    assert main(["run", write(tmp_path, recipe)]) == 2
    assert "continual.metric: 'bleu' is not among evaluation.metrics" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_slurm_and_sweep_refuse_a_continual_recipe(assets, tmp_path, topic_dir):
    path = write(tmp_path, continual_recipe(assets, tmp_path, topic_dir))
    with pytest.raises(LauncherError, match="a recipe with stages runs stage after stage with `launcher run RECIPE`"):
        build_plan(path, [], LaunchRequest())


# ---- the stages' recipes -------------------------------------------------------------------------

def test_stage_recipes_share_the_label_union_and_carry_the_model(assets, tmp_path, topic_dir):
    path = write(tmp_path, continual_recipe(assets, tmp_path, topic_dir))
    alone = load_recipe(path)
    assert alone.data.train == assets["train"] and alone.data.max_length == 32  # read alone: its first stage
    run = make_continual(path, ["training.learning_rate=1e-3"])
    assert run.labels == ["negative", "positive", "music", "other"]  # stage order, each stage's sorted labels
    first, second = (load_recipe(path, run.overrides(stage)) for stage in run.stages)
    assert first.continual is None and second.continual is None
    assert first.model.name_or_path == assets["model"]
    assert second.model.name_or_path == str(tmp_path / "run" / "stages" / "0-sentiment" / "model")
    assert first.output.dir == str(tmp_path / "run" / "stages" / "0-sentiment")
    assert second.data.train == str(topic_dir / "train.csv") and second.data.text_column == "sentence"
    assert second.data.max_length == 32 and second.training.max_steps == 3 and first.training.max_steps is None
    assert first.data.labels == second.data.labels == run.labels
    assert first.training.learning_rate == second.training.learning_rate == 1e-3


def test_per_stage_label_space_scores_each_example_among_its_own_stage_labels(assets, tmp_path, topic_dir):
    """Task-incremental: in training (the stage's own rows and replayed rows alike) and in the matrix's
    evaluations, an example's loss and prediction are over its own stage's labels, the other logits out."""
    path = write(tmp_path, continual_recipe(assets, tmp_path, topic_dir, label_space="per_stage"))
    run = make_continual(path, [])
    assert run.labels == ["negative", "positive", "music", "other"]
    assert run.label_groups == [["negative", "positive"], ["music", "other"]]
    for stage in run.stages:
        for training in (True, False):  # the stage's run, and the evaluations of its test split
            assert load_recipe(path, run.overrides(stage, training=training)).data.label_groups == run.label_groups
    shared = make_continual(write(tmp_path, continual_recipe(assets, tmp_path, topic_dir)), [])
    assert shared.label_groups == [] and load_recipe(path, shared.overrides(shared.stages[1])).data.label_groups is None

    def task_of(overrides):
        recipe = load_recipe(path, overrides)
        task = TASKS[recipe.task](recipe)
        task.fit(None)  # data.labels is given: the label set does not come from the data
        return task

    per_stage, whole = task_of(run.overrides(run.stages[1])), task_of(shared.overrides(shared.stages[1]))
    # The topic stage's batch: a topic row and, as replay would add, sentiment rows. The largest logits are
    # always the other stage's.
    logits = torch.tensor([[1.0, 2.0, 9.0, 8.0], [0.5, -1.0, 7.0, 9.0], [6.0, 9.0, 0.0, 1.0], [9.0, 7.0, 0.3, -0.2]],
                          requires_grad=True)
    labels = torch.tensor([0, 0, 2, 3])  # negative, negative, music, other
    batch = {"labels": labels, "example_id": torch.arange(4)}
    outputs = type("Outputs", (), {"logits": logits})()
    groups = [[0, 1], [0, 1], [2, 3], [2, 3]]
    by_hand = sum(F.cross_entropy(logits[i, g][None], torch.tensor([g.index(int(labels[i]))])) for i, g in enumerate(groups))
    loss = per_stage.loss_sum(outputs, batch)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    loss.backward()
    for i, g in enumerate(groups):  # no gradient reaches the other stage's logits
        assert all(logits.grad[i, k] == 0 for k in range(4) if k not in g) and logits.grad[i, g].abs().sum() > 0
    records = per_stage.records(outputs, batch)
    assert [r["prediction"] for r in records] == [1, 0, 3, 2]  # within the example's own stage's labels
    assert [r["probabilities"][k] for r, g in zip(records, groups) for k in range(4) if k not in g] == [0.0] * 8
    assert [r["prediction"] for r in whole.records(outputs, batch)] == [2, 3, 1, 0]  # shared: among all four
    assert whole.loss_sum(outputs, batch).item() > loss.item() + 10


def test_per_stage_label_sets_must_be_equal_or_disjoint(assets, tmp_path):
    assert label_groups([["a", "b"], ["c", "d", "e"], ["b", "a"]], ["s0", "s1", "s2"]) == [["a", "b"], ["c", "d", "e"]]
    with pytest.raises(LauncherError, match=r"label 'b' is in stage 0 \(s0\) and stage 1 \(s1\) with different label "
                                            r"sets; give the stages equal or disjoint label sets, or use label_space: shared"):
        label_groups([["a", "b"], ["b", "c"]], ["s0", "s1"])
    recipe = load_recipe(write(tmp_path, toy_recipe_dict(assets, tmp_path / "run")),
                         ['data.labels=["negative", "positive", "x"]', 'data.label_groups=[["negative"], ["positive"]]'])
    with pytest.raises(DataError, match=r"data.label_groups: labels \['x'\] are in no group; each label needs one"):
        TASKS[recipe.task](recipe).fit(None)


# ---- replay --------------------------------------------------------------------------------------

def pools():
    return [[{"text": f"a{i}", "label": "x"} for i in range(10)], [{"text": f"b{i}", "label": "y"} for i in range(3)]]


def test_replay_buffer_is_a_pure_function_of_seed_and_data():
    buffer = replay_buffer(pools(), 7, seed=5)
    assert buffer == replay_buffer(pools(), 7, seed=5)
    assert [row["stage"] for row in buffer] == [0, 0, 0, 0, 1, 1, 1]  # equal shares, the first stage the remainder
    assert len({(row["stage"], row["row"]) for row in buffer}) == 7  # drawn without replacement
    assert all(row["text"] == pools()[row["stage"]][row["row"]]["text"] for row in buffer)
    assert buffer != replay_buffer(pools(), 7, seed=6)
    assert len(replay_buffer(pools(), 20, seed=5)) == 10 + 3  # a share is at most the stage's rows
    assert replay_rows(buffer, 3, seed=5, stage=2) == replay_rows(buffer, 3, seed=5, stage=2)


def test_replay_count_makes_ratio_of_the_mixed_training_set():
    assert replay_count(own_rows=300, ratio=0.25, buffer_rows=1000) == 100  # 100 of 400
    assert replay_count(own_rows=300, ratio=0.25, buffer_rows=40) == 40  # at most the buffer


def test_replay_stage_trains_on_the_written_mixed_file(assets, tmp_path, topic_dir):
    recipe = continual_recipe(assets, tmp_path, topic_dir, strategy="replay",
                              replay={"buffer_size": 20, "ratio": 0.5, "seed": 1})
    path = write(tmp_path, recipe)
    run = make_continual(path, [])
    second = load_recipe(path, run.overrides(run.stages[1]))
    replay_dir = tmp_path / "run" / "stages" / "1-topic" / "replay"
    assert second.data.train == str(replay_dir / "train.jsonl") and second.data.validation_size == 0
    assert second.data.test == str(replay_dir / "test.jsonl") and second.data.validation == str(replay_dir / "validation.jsonl")
    first = load_recipe(path, run.overrides(run.stages[0]))
    assert first.data.train == assets["train"]  # the first stage has nothing to replay
    evaluated = load_recipe(path, run.overrides(run.stages[1], training=False))
    assert evaluated.data.train == str(topic_dir / "train.csv")  # evaluation reads the stage's own data


# ---- the forgetting matrix -----------------------------------------------------------------------

def test_summary_numbers_equal_a_hand_computation():
    matrix = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.85]]
    result = summarize(matrix)
    assert result["average_accuracy"] == pytest.approx((0.5 + 0.7 + 0.85) / 3)
    # forgetting: stage 0 best 0.9 -> 0.5, stage 1 best 0.8 -> 0.7
    assert result["average_forgetting"] == pytest.approx((0.4 + 0.1) / 2)
    assert result["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # A stage that ends better than it ever was before the last stage forgets negatively.
    improved = summarize([[0.6], [0.5, 0.8], [0.9, 0.7, 0.85]])
    assert improved["average_forgetting"] == pytest.approx(((0.6 - 0.9) + (0.8 - 0.7)) / 2)
    assert improved["backward_transfer"] == pytest.approx(((0.9 - 0.6) + (0.7 - 0.8)) / 2)
    assert summarize([[0.7]]) == {"average_accuracy": 0.7, "average_forgetting": None, "backward_transfer": None}
    with pytest.raises(ValueError, match="row 1 of the forgetting matrix has 1 cell"):
        summarize([[0.9], [0.6]])
    assert table(["a", "b"], [[0.9], [0.6, 0.8]]).splitlines()[2:] == ["| a | 0.9000 |  |", "| b | 0.6000 | 0.8000 |"]


def test_dry_run_plans_the_first_stage_and_writes_nothing(assets, tmp_path, topic_dir, capsys):
    path = write(tmp_path, continual_recipe(assets, tmp_path, topic_dir))
    assert main(["run", path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "continual run of 2 stages (naive)" in out
    assert "shared label space (4): negative, positive, music, other" in out
    assert f"{tmp_path / 'run' / 'stages' / '0-sentiment'}" in out
    assert not (tmp_path / "run").exists()


# ---- ewc -----------------------------------------------------------------------------------------

def test_ewc_penalty_is_zero_at_the_anchor_and_equals_a_hand_computation(tmp_path):
    import torch
    from safetensors.torch import save_file

    from launcher.engine.ewc import load_terms, penalty

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    tensors = {f"fisher.{n}": f for n, f in fisher.items()}
    tensors.update({f"anchor.{n}": p.detach().clone() for n, p in model.named_parameters()})
    save_file(tensors, str(tmp_path / "fisher.safetensors"))
    terms = load_terms(tmp_path / "fisher.safetensors", model)
    assert penalty(terms, weight=100.0).item() == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.3, 0.0]])
        model.bias -= torch.tensor([0.5, 0.0])
    hand = 0.5 * 100.0 * (fisher["weight"][0, 0] * 0.1 ** 2 + fisher["weight"][0, 2] * 0.2 ** 2
                          + fisher["weight"][1, 1] * 0.3 ** 2 + fisher["bias"][0] * 0.5 ** 2)
    value = penalty(terms, weight=100.0)
    assert value.item() == pytest.approx(hand.item(), rel=1e-6)
    value.backward()  # its gradient: lambda F (theta - theta*)
    assert model.bias.grad.tolist() == pytest.approx([100.0 * fisher["bias"][0].item() * -0.5, 0.0], rel=1e-6)


def test_ewc_file_of_another_model_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from launcher.engine.ewc import load_terms

    save_file({"fisher.weight": torch.ones(2, 2), "anchor.weight": torch.ones(2, 2)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(LauncherError, match=r"has no Fisher of shape \(2, 3\) for parameter weight; it was computed on another model"):
        load_terms(tmp_path / "f.safetensors", torch.nn.Linear(3, 2))
    with pytest.raises(LauncherError, match="not found; write it with launcher fisher"):
        load_terms(tmp_path / "missing.safetensors", torch.nn.Linear(3, 2))


def test_fisher_examples_are_split_across_ranks_without_overlap():
    from launcher.engine.ewc import fisher_indices

    alone = fisher_indices(50, 20, seed=3, world_size=1, rank=0)
    shards = [fisher_indices(50, 20, seed=3, world_size=3, rank=r) for r in range(3)]
    assert len(alone) == 20 and sorted(i for shard in shards for i in shard) == alone
    assert fisher_indices(5, 20, seed=3, world_size=1, rank=0) == [0, 1, 2, 3, 4]


def test_ewc_stage_gets_the_previous_stage_fisher_and_sharded_weights_are_refused(assets, tmp_path, topic_dir, capsys):
    recipe = continual_recipe(assets, tmp_path, topic_dir, strategy="ewc", ewc={"weight": 50.0, "fisher_samples": 10})
    path = write(tmp_path, recipe)
    run = make_continual(path, [])
    second = load_recipe(path, run.overrides(run.stages[1]))
    assert second.ewc.fisher == str(tmp_path / "run" / "stages" / "1-topic" / "ewc" / "fisher.safetensors")
    assert second.ewc.weight == 50.0 and load_recipe(path, run.overrides(run.stages[0])).ewc is None
    assert main(["run", path, "--strategy", "zero3", "--dry-run"]) == 0  # the first stage has no penalty
    capsys.readouterr()
    with pytest.raises(LauncherError, match="ewc: distributed.strategy zero3 shards the weights across ranks"):
        build_plan(path, run.overrides(run.stages[0]) + [f"ewc.fisher={tmp_path}/f", "ewc.weight=1"],
                   LaunchRequest(strategy="zero3"))
