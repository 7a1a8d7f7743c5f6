"""How the launcher uses the metric libraries (launcher/metrics.py and the tasks' compute_metrics).

The libraries (scikit-learn, seqeval, rouge-score, sacrebleu) are trusted; these tests check what the
launcher adds: which call and options (averages, zero_division, chunking mode, stemming, tokenizer,
scale), the label id -> name mapping, the keys a recipe's best_metric may name, edge cases the
libraries refuse (no example at all), and that metrics over records gathered from 2 ranks equal those
of 1 process. Expected numbers are computed by hand in the comments.
"""

from __future__ import annotations

import math
import random

import pytest

from launcher.errors import LauncherError
from launcher.metrics import (
    CLASSIFICATION_KEYS,
    bleu_score,
    compute_classification_metrics,
    entity_scores,
    perplexity,
    relation_f1,
    rouge_scores,
)
from launcher.recipe import validate_recipe
from launcher.sampling import eval_shard
from launcher.tasks import TASKS
from launcher.tasks.question_answering import WINDOW_LIMIT

ALL = ["accuracy", "precision", "recall", "f1"]

# ---------------------------------------------------------------------------------------------------
# Classification (scikit-learn)
# ---------------------------------------------------------------------------------------------------


def test_classification_by_hand():
    # true:      neg neg neu neu pos
    # predicted: neg neu neu neu neg
    scores = compute_classification_metrics(ALL, [0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["neg", "neu", "pos"])
    assert set(scores) == {"accuracy", "precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
                           "f1_macro", "f1_weighted", "per_class", "confusion_matrix"}
    assert scores["accuracy"] == pytest.approx(3 / 5)
    # rows = true label, columns = predicted label, both in id order
    assert scores["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # neg: 1 of 2 predicted right, 1 of 2 found; neu: 2 of 3, 2 of 2; pos: never predicted -> 0, not NaN
    assert list(scores["per_class"]) == ["neg", "neu", "pos"]
    assert scores["per_class"]["neg"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert scores["per_class"]["neu"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert scores["per_class"]["pos"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert scores["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert scores["f1_macro"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    # weighted by true support 2, 2, 1
    assert scores["precision_weighted"] == pytest.approx((0.5 * 2 + 2 / 3 * 2) / 5)
    assert scores["recall_weighted"] == pytest.approx((0.5 * 2 + 1 * 2) / 5)
    assert scores["f1_weighted"] == pytest.approx((0.5 * 2 + 0.8 * 2) / 5)


def test_macro_averages_over_classes_seen_but_the_table_lists_every_label():
    # Label "c" occurs nowhere: it is left out of the macro average (scikit-learn's label set without
    # labels=) but keeps its row in the per-class table and the confusion matrix.
    scores = compute_classification_metrics(ALL, [0, 0, 0, 0], [0, 0, 1, 1], ["a", "b", "c"])
    assert scores["precision_macro"] == pytest.approx((0.5 + 0.0) / 2)  # b never predicted: 0, not NaN
    assert scores["recall_macro"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["confusion_matrix"] == [[2, 0, 0], [2, 0, 0], [0, 0, 0]]


def test_each_metric_name_produces_exactly_the_keys_best_metric_may_name():
    for name, keys in CLASSIFICATION_KEYS.items():
        scores = compute_classification_metrics([name], [0, 1, 1], [0, 1, 0], ["a", "b"])
        assert set(scores) - {"per_class", "confusion_matrix"} == set(keys), name
        assert all(isinstance(scores[key], float) for key in keys)


def test_classification_of_no_example():
    scores = compute_classification_metrics(ALL, [], [], ["a", "b"])  # scikit-learn refuses empty input
    assert all(math.isnan(scores[key]) for name in ALL for key in CLASSIFICATION_KEYS[name])
    assert scores["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["confusion_matrix"] == [[0, 0], [0, 0]]


def test_hub_metric_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LauncherError, match="evaluate:accuracy could not be loaded"):
        compute_classification_metrics(["evaluate:accuracy"], [0, 1], [0, 1], ["a", "b"])


# ---------------------------------------------------------------------------------------------------
# Entities (seqeval)
# ---------------------------------------------------------------------------------------------------


def test_entities_by_hand():
    # A at 0 found, A at 2 missed, B at 3 spurious: micro P = 1/2, R = 1/2; tags equal at 0, 1 of 4.
    scores = entity_scores([["B-A", "O", "B-A", "O"]], [["B-A", "O", "O", "B-B"]])
    assert list(scores) == ["precision", "recall", "f1", "support", "precision_macro", "precision_weighted",
                            "recall_macro", "recall_weighted", "f1_macro", "f1_weighted", "accuracy", "per_type"]
    assert (scores["precision"], scores["recall"], scores["f1"], scores["support"]) == (0.5, 0.5, 0.5, 2)
    assert scores["accuracy"] == 0.5
    # per type: A P=1 R=1/2 F=2/3 (2 true); B P=R=F=0 (0 true)
    assert scores["per_type"] == {"A": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
                                  "B": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["f1_weighted"] == pytest.approx((2 / 3 * 2 + 0 * 0) / 2)
    assert scores["precision_macro"] == 0.5 and scores["recall_weighted"] == 0.5


def test_entities_use_conlleval_chunking_and_keep_sentences_apart():
    # IOB1: an I- tag after O starts an entity (seqeval's default mode; strict IOB2 would drop it).
    scores = entity_scores([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]])
    assert (scores["f1"], scores["support"]) == (1.0, 1)
    # An entity ending one sentence and an I- tag starting the next are two entities, not one.
    scores = entity_scores([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["I-PER", "O"]])
    assert scores["support"] == 2 and scores["f1"] == 1.0


def test_entities_when_every_tag_is_O_or_there_is_no_sentence():
    # Nothing predicted: 0/0 precision counts 0 (not NaN), so F1 stays a number.
    missed = entity_scores([["B-PER", "I-PER", "O"]], [["O", "O", "O"]])
    assert (missed["precision"], missed["recall"], missed["f1"], missed["support"]) == (0.0, 0.0, 0.0, 1)
    assert missed["accuracy"] == pytest.approx(1 / 3)
    no_entity = entity_scores([["O", "O"]], [["O", "O"]])
    assert (no_entity["f1"], no_entity["accuracy"], no_entity["f1_weighted"]) == (0.0, 1.0, 0.0)
    assert math.isnan(no_entity["f1_macro"]) and no_entity["per_type"] == {}
    for empty in ([], [[]]):  # seqeval refuses no sentence and divides by zero tags
        scores = entity_scores(empty, empty)
        assert (scores["f1"], scores["support"], scores["per_type"]) == (0.0, 0, {})
        assert math.isnan(scores["accuracy"])
    with pytest.raises(ValueError):
        entity_scores([["O", "O"]], [["O"]])


# ---------------------------------------------------------------------------------------------------
# ROUGE (rouge-score) and BLEU (sacrebleu)
# ---------------------------------------------------------------------------------------------------


def test_rouge_by_hand():
    # tokens the cat sat on the mat / the cat is on the mat: 5 of 6 unigrams shared each way; bigrams
    # the-cat, on-the, the-mat: 3 of 5; longest common subsequence "the cat on the mat": 5 of 6.
    scores = rouge_scores(["the cat sat on the mat"], ["The cat is on the mat."])
    assert scores == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5),
                      "rougeL": pytest.approx(5 / 6), "rougeLsum": pytest.approx(5 / 6)}
    # rougeLsum reads "\n"-separated sentences: reference [a b c] [d e], candidate [a c d] [b e]:
    # union LCS {a, c} + {b}, then {d} + {e}: 5 of 5. rougeL over the whole text: LCS a c d e = 4 of 5.
    scores = rouge_scores(["a c d\nb e"], ["a b c\nd e"], rouge_types=["rougeL", "rougeLsum"])
    assert scores == {"rougeL": pytest.approx(0.8), "rougeLsum": 1.0}


def test_rouge_is_a_mean_over_examples_without_stemming():
    # example scores 1 and 0 -> 0.5 (pooling the counts of both would give 2/3)
    assert rouge_scores(["a b", "x"], ["a b", "y"], rouge_types=["rouge1"]) == {"rouge1": 0.5}
    # no stemmer, as before: cats != cat, running != runs
    assert rouge_scores(["cats running"], ["cat runs"], rouge_types=["rouge1"]) == {"rouge1": 0.0}
    # several references: the best one counts
    assert rouge_scores(["a b"], [["x y", "a b"]], rouge_types=["rouge1"]) == {"rouge1": 1.0}


def test_rouge_of_empty_text_and_of_no_example():
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert rouge_scores(["", "北京"], ["the cat", "北京"]) == {key: 0.0 for key in keys}  # ASCII tokens only
    assert all(math.isnan(value) for value in rouge_scores([], []).values())
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_scores(["a"], ["a", "b"])


def test_bleu_by_hand():
    # 13a tokens: The cat sat on the mat . / The cat is on the mat . -> n-gram matches 6/7, 4/6, 2/5, 1/4
    scores = bleu_score(["The cat sat on the mat."], [["The cat is on the mat."]])
    assert (scores["counts"], scores["totals"]) == ([6, 4, 2, 1], [7, 6, 5, 4])
    assert (scores["bp"], scores["sys_len"], scores["ref_len"], scores["ratio"]) == (1.0, 7, 7, 1.0)
    assert scores["score"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)  # 0..100
    assert scores["precisions"] == pytest.approx([600 / 7, 400 / 6, 40.0, 25.0])


def test_bleu_reads_each_examples_own_references():
    # Example 1 has two references (closest length 4), example 2 one: every n-gram matches, 7 tokens
    # against 8 reference tokens -> brevity penalty exp(1 - 8/7).
    scores = bleu_score(["a b c", "x y z w"], [["a b c d", "a"], ["x y z w"]])
    assert (scores["counts"], scores["totals"]) == ([7, 5, 3, 1], [7, 5, 3, 1])
    assert (scores["sys_len"], scores["ref_len"]) == (7, 8)
    assert scores["score"] == pytest.approx(100 * math.exp(1 - 8 / 7))


def test_bleu_of_empty_text_and_of_no_example():
    scores = bleu_score(["", ""], [["a b c"], ["d"]])
    assert (scores["score"], scores["bp"], scores["sys_len"], scores["ref_len"]) == (0.0, 0.0, 0, 4)
    assert bleu_score([], [])["score"] == 0.0  # sacrebleu fails on an empty corpus
    with pytest.raises(ValueError, match="example 0: references must be a non-empty list"):
        bleu_score(["a"], ["a"])


# ---------------------------------------------------------------------------------------------------
# Relations (scikit-learn, no-relation left out) and perplexity
# ---------------------------------------------------------------------------------------------------


def test_relation_f1_by_hand():
    # positive predictions a (right), c (wrong: b), c (wrong: NA); positive references a, b, d
    scores = relation_f1(["a", "b", "NA", "d", "NA"], ["a", "c", "c", "NA", "NA"], "NA")
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert scores["support"] == 3
    assert list(scores["per_relation"]) == ["a", "b", "c", "d"]
    assert scores["per_relation"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_relation"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["f1_macro"] == pytest.approx((1 + 0 + 0 + 0) / 4)
    assert scores["precision_macro"] == pytest.approx(1 / 4) and scores["recall_macro"] == pytest.approx(1 / 4)


def test_relation_f1_with_nothing_positive():
    # nothing predicted positive: precision 0/0 counts 0 (the TACRED script says 1.0; F1 is 0 either way)
    nothing = relation_f1(["a", "NA"], ["NA", "NA"], "NA")
    assert (nothing["precision"], nothing["recall"], nothing["f1"], nothing["support"]) == (0.0, 0.0, 0.0, 1)
    for true, pred in ((["NA"], ["NA"]), ([], [])):
        scores = relation_f1(true, pred, "NA")
        assert (scores["f1"], scores["support"], scores["per_relation"]) == (0.0, 0, {})
        assert math.isnan(scores["f1_macro"])
    with pytest.raises(ValueError, match="2 reference labels but 1 predicted"):
        relation_f1(["a", "b"], ["a"], "NA")


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(5), 10) == pytest.approx(5.0)
    # exp of the token mean over everything: batches of 1 token (nll 1) and 3 tokens (nll 3) -> e, not
    # the mean of per-batch perplexities (e + e) / 2 ... nor exp of the mean of per-batch means
    assert perplexity(1.0 + 3.0, 1 + 3) == pytest.approx(math.e)
    assert perplexity(1.0 + 6.0, 1 + 3) == pytest.approx(math.exp(7 / 4))
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="total_tokens must be >= 0"):
        perplexity(1.0, -1)


# ---------------------------------------------------------------------------------------------------
# The tasks: label names, best_metric keys, records gathered from 2 ranks
# ---------------------------------------------------------------------------------------------------


def make_task(task: str, **sections):
    recipe = {"name": "m", "task": task, "model": {"name_or_path": "m"}, "data": {"train": "train.jsonl"}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return TASKS[task](validate_recipe(recipe))


def classifier(task: str, labels: list[str], **sections):
    made = make_task(task, data={"labels": labels}, **sections)
    made.restore_fitted({"label_names": labels})  # what the engine does with cached data
    return made


def test_token_classification_maps_tag_ids_to_names_in_id_order():
    task = classifier("token_classification", ["O", "B-LOC", "B-PER", "I-PER"])
    # gold: B-PER I-PER O B-LOC; predicted: B-PER I-PER O, and the last word unseen (-1) -> O
    record = {"id": 0, "gold": [2, 3, 0, 1], "prediction": [2, 3, 0, -1], "loss": 1.0, "targets": 3,
              "cut_words": 1, "empty_words": 0}
    scores = task.compute_metrics([record])
    assert (scores["precision"], scores["recall"], scores["support"], scores["accuracy"]) == (1.0, 0.5, 2, 0.75)
    assert scores["per_type"]["PER"]["f1"] == 1.0 and scores["per_type"]["LOC"]["recall"] == 0.0


def test_relation_extraction_leaves_out_the_no_relation_label_by_name():
    # no_relation has id 1 here, not 0
    task = classifier("relation_extraction", ["works_for", "no_relation", "lives_in"])
    records = [{"id": i, "label": y, "prediction": p, "loss": 1.0, "probabilities": [], "truncated": False}
               for i, (y, p) in enumerate([(0, 0), (1, 1), (2, 1), (1, 0)])]
    scores = task.compute_metrics(records)
    # positive predictions works_for (right), works_for (wrong); positive references works_for, lives_in
    assert (scores["precision"], scores["recall"], scores["support"]) == (0.5, 0.5, 2)
    assert list(scores["per_relation"]) == ["lives_in", "works_for"]
    assert scores["per_relation"]["works_for"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                                   "support": 1}
    assert scores["accuracy"] == 0.5
    assert scores["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]  # rows: true label


def test_sequence_classification_names_its_classes_in_id_order():
    task = classifier("sequence_classification", ["pos", "neg"])
    records = [{"id": i, "label": y, "prediction": p, "loss": 0.5, "probabilities": []}
               for i, (y, p) in enumerate([(0, 0), (0, 1), (1, 1)])]
    scores = task.compute_metrics(records)
    assert list(scores["per_class"]) == ["pos", "neg"]
    assert scores["per_class"]["pos"]["recall"] == 0.5 and scores["per_class"]["neg"]["precision"] == 0.5


def _qa_feature(fid, example, candidates, null, answers):
    return {"id": fid, "example": example, "candidates": [list(c) for c in candidates], "null_score": null,
            "answers": list(answers), "loss": 1.0 + fid % 3}


# One split per task: 7 evaluation rows (9 QA features), so that 2 ranks pad with a duplicate of row 0,
# which each task scores wrong on purpose (counted twice, it would change the metrics).
CASES = {
    "sequence_classification": (
        {"data": {"labels": ["pos", "neg", "neutral"]}},
        [{"id": i, "label": y, "prediction": p, "loss": 0.1 * i, "probabilities": []}
         for i, (y, p) in enumerate([(1, 0), (0, 0), (2, 2), (1, 1), (0, 1), (0, 0), (2, 0)])],
    ),
    "token_classification": (
        {"data": {"labels": ["O", "B-PER", "I-PER", "B-LOC"]}},
        [{"id": i, "gold": g, "prediction": p, "loss": 1.0 + i, "targets": len(g), "cut_words": 0, "empty_words": 0}
         for i, (g, p) in enumerate([([1, 2, 0], [0, 0, 3]), ([3], [3]), ([0, 0], [0, 0]), ([1, 0, 1], [1, 0, 3]),
                                     ([0, 3], [0, 3]), ([1, 2], [1, 2]), ([2, 0], [1, 0])])],
    ),
    "relation_extraction": (
        {"data": {"labels": ["no_relation", "works_for", "lives_in"]}},
        [{"id": i, "label": y, "prediction": p, "loss": 0.2 * i, "probabilities": [], "truncated": i == 3}
         for i, (y, p) in enumerate([(1, 0), (1, 1), (2, 2), (0, 0), (0, 1), (2, 1), (1, 1)])],
    ),
    "seq2seq": (
        {},
        [{"id": i, "prediction": p, "reference": r, "gen_len": 2 + i, "loss_sum": 1.5 * i, "target_tokens": 3}
         for i, (p, r) in enumerate([("x y z", "the cat sat. It slept."), ("a dog", "a dog ran"), ("", "b c"),
                                     ("one two three", "one two three"), ("red cat", "the red cat"),
                                     ("Guten Morgen", "Guten Tag"), ("it is. done!", "it is done.")])],
    ),
    "causal_lm_sft": (
        {},
        [{"id": i, "nll": 0.7 * (i + 1), "tokens": i + 2, "truncated": i == 0, "reply_turn": 1} for i in range(7)],
    ),
    "question_answering": (
        {"data": {"text_pair_column": "context", "label_column": "answers", "max_length": 32},
         "question_answering": {"doc_stride": 8, "allow_unanswerable": True}},
        [  # examples 0..5; example 0 answered wrong, example 2 has two windows (their null scores differ)
            _qa_feature(0, 0, [(5.0, 0, 3, "dog")], 1.0, ["cat"]),
            _qa_feature(WINDOW_LIMIT, 1, [(4.0, 0, 3, "cat")], 1.0, ["cat", "the cat"]),
            _qa_feature(2 * WINDOW_LIMIT, 2, [(1.0, 0, 3, "sun")], 0.5, []),
            _qa_feature(2 * WINDOW_LIMIT + 1, 2, [(2.0, 4, 7, "sky")], 3.0, []),
            _qa_feature(3 * WINDOW_LIMIT, 3, [(3.0, 0, 9, "big house")], 1.0, ["a big old house"]),
            _qa_feature(4 * WINDOW_LIMIT, 4, [], 2.0, []),
            _qa_feature(5 * WINDOW_LIMIT, 5, [(2.5, 0, 5, "Paris")], 0.1, ["paris"]),
            _qa_feature(5 * WINDOW_LIMIT + 1, 5, [(0.5, 6, 9, "ok")], 4.0, ["paris"]),
            _qa_feature(5 * WINDOW_LIMIT + 2, 5, [], 0.2, ["paris"]),
        ],
    ),
}


def task_for(name: str):
    sections, _ = CASES[name]
    task = make_task(name, **sections)
    if "labels" in sections.get("data", {}):
        task.restore_fitted({"label_names": sections["data"]["labels"]})
    return task


def gathered(records: list[dict], world_size: int, seed: int) -> list[dict]:
    """What compute_metrics gets on `world_size` ranks: each rank's shard (sampling.eval_shard, padded
    by wrapping around), all shards concatenated (gather), de-duplicated by id keeping the first, as
    engine/evaluate.predict does - and shuffled, so the metrics cannot lean on arrival order."""
    arrived = [records[i] for rank in range(world_size) for i in eval_shard(len(records), world_size, rank)]
    assert len(arrived) > len(records)  # there is a padding duplicate to remove
    random.Random(seed).shuffle(arrived)
    unique: dict = {}
    for record in arrived:
        unique.setdefault(record["id"], record)
    return list(unique.values())


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):  # the order of a float sum may differ; counts may not
        assert b == pytest.approx(a, rel=1e-12, abs=1e-15, nan_ok=True), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_every_best_metric_key_is_produced(name):
    task = task_for(name)
    task.recipe.evaluation.metrics = list(task.metric_keys)
    scores = task.compute_metrics(CASES[name][1])
    for metric, keys in task.metric_keys.items():
        for key in keys:
            assert isinstance(scores.get(key), float), (metric, key, scores.get(key))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_gathered_in_any_order_score_like_one_process(name):
    task = task_for(name)
    records = CASES[name][1]
    single = task.compute_metrics(records)
    for seed in range(3):
        assert_same(single, task.compute_metrics(gathered(records, 2, seed)))
