"""launcher.text_metrics agrees with the reference scorers it re-implements.

The references (seqeval, rouge-score, sacrebleu, scikit-learn; dev dependencies) are compared on
randomized inputs with fixed seeds; the official SQuAD and TACRED scripts are re-written here as
oracles (they are scripts, not packages). Hand-computed cases check each metric without any reference.
"""

from __future__ import annotations

import collections
import inspect
import math
import random
import re
import string
import warnings

import numpy as np
import pytest

from launcher.text_metrics import (
    bleu_score,
    entity_scores,
    get_entities,
    normalize_answer,
    perplexity,
    porter_stem,
    relation_f1,
    rouge_scores,
    rouge_tokenize,
    squad_scores,
    tokenize_13a,
)

DEV = "dev dependency: pip install -e .[dev]"


@pytest.fixture(scope="module")
def seqeval():
    return pytest.importorskip("seqeval.metrics", reason=DEV)


@pytest.fixture(scope="module")
def rouge_scorer():
    return pytest.importorskip("rouge_score.rouge_scorer", reason=DEV)


@pytest.fixture(scope="module")
def sacrebleu():
    return pytest.importorskip("sacrebleu", reason=DEV)


@pytest.fixture(scope="module")
def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics", reason=DEV)


def close(value, expected):
    return value == pytest.approx(expected, rel=1e-12, abs=1e-15, nan_ok=True)


# Words for random text: articles, case, ASCII and non-ASCII punctuation, digits, accents, CJK, odd spaces.
WORDS = (
    "the a an The An THE cat cats dog dogs sat sitting runs running ran jumped jumping happily happy "
    "generalization generalizations relational conditional hopefulness formalize electrical adjustable "
    "Paris paris Zürich café naïve Æther İstanbul straße 北京 東京 москва 3.14 1,000 5-6 2019 42 "
    "don't it's U.S.A. e-mail co-operate (note) [x] {y} \"quoted\" 'single' “curly” «guillemets» "
    "— – - ... ! ? , . ; : & &amp; &quot; <skipped> @home #tag $5 100% a/b x_y éthe ñan the- -\n"
).split()
SPACES = [" ", " ", " ", " ", "  ", "\t", "\u00a0", "\u3000", " \n"]


def random_text(rng: random.Random, low: int = 0, high: int = 12) -> str:
    n = rng.randint(low, high)
    out = []
    for _ in range(n):
        out.append(rng.choice(WORDS))
        out.append(rng.choice(SPACES))
    return "".join(out).strip(" ") if rng.random() < 0.8 else "".join(out)


def perturb(rng: random.Random, text: str) -> str:
    """A prediction near `text`: words dropped, added, swapped, re-cased or re-punctuated."""
    words = text.split()
    ops = rng.randint(0, 3)
    for _ in range(ops):
        kind = rng.random()
        if kind < 0.25 and words:
            words.pop(rng.randrange(len(words)))
        elif kind < 0.5:
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        elif kind < 0.7 and words:
            i = rng.randrange(len(words))
            words[i] = words[i].upper() if rng.random() < 0.5 else words[i] + rng.choice("!.,?")
        elif kind < 0.85 and len(words) > 1:
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------
# Named entities vs seqeval
# ---------------------------------------------------------------------------------------------------

TAG_POOLS = {
    "iob": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"],
    "iobes": ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"],
    # What taggers really emit on a bad day: bare prefixes, empty types, unknown prefixes, dashes.
    "malformed": ["O", "B-PER", "I-PER", "I-LOC", "B", "I", "I-", "E", "S", "X-PER", ".", "B-A-B", "MISC", "S-PER",
                  "Z"],
}


def random_tags(rng: random.Random, pool: list[str], n_sentences: int):
    true_tags, pred_tags = [], []
    for _ in range(n_sentences):
        length = rng.randint(0, 10)
        true = [rng.choice(pool) if rng.random() < 0.5 else "O" for _ in range(length)]
        pred = [t if rng.random() < 0.7 else rng.choice(pool) for t in true]
        true_tags.append(true)
        pred_tags.append(pred)
    return true_tags, pred_tags


def assert_matches_seqeval(seqeval, true_tags, pred_tags, ours=None):
    ours = ours or entity_scores(true_tags, pred_tags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours["f1"] == seqeval.f1_score(true_tags, pred_tags)
        assert ours["precision"] == seqeval.precision_score(true_tags, pred_tags)
        assert ours["recall"] == seqeval.recall_score(true_tags, pred_tags)
        report = seqeval.classification_report(true_tags, pred_tags, output_dict=True)
        if any(true_tags):
            assert ours["accuracy"] == seqeval.accuracy_score(true_tags, pred_tags)
    rows = {name: row for name, row in report.items() if not name.endswith(" avg")}
    assert list(ours["per_type"]) == list(rows)
    for name, row in rows.items():
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                            ("support", "support")):
            assert ours["per_type"][name][key] == row[theirs], (name, key)
    assert ours["support"] == report["micro avg"]["support"]
    for average in ("macro", "weighted"):
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert close(ours[f"{key}_{average}"], report[f"{average} avg"][theirs]), (average, key)


@pytest.mark.parametrize("pool", list(TAG_POOLS))
@pytest.mark.parametrize("seed", range(4))
def test_entities_match_seqeval(seqeval, pool, seed):
    from seqeval.metrics.sequence_labeling import get_entities as get_entities_ref

    rng = random.Random(seed)
    true_tags, pred_tags = random_tags(rng, TAG_POOLS[pool], 150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about each malformed tag
        assert get_entities(true_tags) == get_entities_ref(true_tags)
        assert get_entities(pred_tags) == get_entities_ref(pred_tags)
    assert_matches_seqeval(seqeval, true_tags, pred_tags)


@pytest.mark.parametrize(
    "true_tags, pred_tags",
    [
        ([["O", "O", "O"]], [["O", "O", "O"]]),  # no entity anywhere
        ([["O", "O"]], [["B-PER", "O"]]),  # only predicted
        ([["B-PER", "O"]], [["O", "O"]]),  # only true
        ([["B-PER"]], [["B-PER"]]),  # single token
        ([["I-PER"]], [["B-PER"]]),  # IOB1 start
        ([[], ["B-LOC", "I-LOC"], []], [[], ["B-LOC", "B-LOC"], []]),  # empty sentences
        ([["B-PER", "I-PER"], ["I-PER", "O"]], [["B-PER", "I-PER"], ["I-PER", "O"]]),  # no cross-sentence chunk
        ([["B-Straße", "I-Straße", "B-東京"]], [["B-Straße", "I-Straße", "I-東京"]]),  # unicode types
        ([["Z", "O"], ["Z", "B-X"]], [["O", "Z"], ["Z", "I-X"]]),  # an unknown bare tag first and after "O"
    ],
)
def test_entity_edge_cases_match_seqeval(seqeval, true_tags, pred_tags):
    assert_matches_seqeval(seqeval, true_tags, pred_tags)


def test_bilou_is_iobes_for_seqeval(seqeval):
    rng = random.Random(7)
    pool = ["O", "B-PER", "I-PER", "L-PER", "U-PER", "B-LOC", "L-LOC", "U-LOC", "U", "L"]
    true_tags, pred_tags = random_tags(rng, pool, 100)
    convert = {"L-PER": "E-PER", "U-PER": "S-PER", "L-LOC": "E-LOC", "U-LOC": "S-LOC", "U": "S", "L": "E"}
    as_iobes = [[[convert.get(t, t) for t in s] for s in tags] for tags in (true_tags, pred_tags)]
    assert_matches_seqeval(seqeval, *as_iobes, ours=entity_scores(true_tags, pred_tags, bilou=True))


def test_entities_by_hand():
    # seqeval's docstring example: MISC is off by one token, PER is right.
    true_tags = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred_tags = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(true_tags, pred_tags)
    assert (scores["precision"], scores["recall"], scores["f1"], scores["support"]) == (0.5, 0.5, 0.5, 2)
    assert scores["accuracy"] == 0.8
    assert scores["per_type"] == {
        "MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }
    # IOB1: I- starts an entity, B- only separates two adjacent ones of the same type; a type change
    # splits; IOBES E-/S- close entities.
    assert get_entities([["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-ORG"]]) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3), ("ORG", 5, 5)]
    assert get_entities([["B-PER", "E-PER", "S-PER", "S-LOC", "I-LOC"]]) == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 3, 3), ("LOC", 4, 4)]
    # offsets count an "O" after every sentence
    assert get_entities([["B-X"], ["B-Y"]]) == [("X", 0, 0), ("Y", 2, 2)]
    # BILOU: U-X U-X is two entities (seqeval alone would merge them)
    bilou = entity_scores([["U-X", "U-X", "B-Y", "L-Y"]], [["U-X", "U-X", "B-Y", "L-Y"]], bilou=True)
    assert bilou["support"] == 3 and bilou["f1"] == 1.0
    # 2 of 3 predicted are right, 2 of 4 true are found
    scores = entity_scores([["B-A", "O", "B-B", "I-B", "O", "B-A", "B-C"]],
                           [["B-A", "O", "B-B", "O", "O", "B-A", "B-B"]])
    assert (scores["precision"], scores["recall"]) == (0.5, 0.5)
    scores = entity_scores([["B-A", "O", "B-A", "O"]], [["B-A", "O", "O", "B-B"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert scores["f1_macro"] == 0.5 * (2 / 3 + 0.0) and scores["f1_weighted"] == 2 / 3


def test_entities_without_entities_or_tags():
    scores = entity_scores([["O", "O"]], [["O", "O"]])
    assert (scores["precision"], scores["recall"], scores["f1"], scores["accuracy"]) == (0.0, 0.0, 0.0, 1.0)
    assert math.isnan(scores["f1_macro"]) and scores["f1_weighted"] == 0.0 and scores["per_type"] == {}
    empty = entity_scores([], [])
    assert empty["f1"] == 0.0 and math.isnan(empty["accuracy"])
    assert math.isnan(entity_scores([[]], [[]])["accuracy"])


def test_entity_input_errors():
    with pytest.raises(ValueError, match="sentence 0: 2 reference tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])
    with pytest.raises(ValueError, match="1 reference sentences but 2 predicted"):
        entity_scores([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="non-empty strings"):
        entity_scores([[""]], [["O"]])


# ---------------------------------------------------------------------------------------------------
# SQuAD vs the official evaluate-v1.1.py / evaluate-v2.0.py logic
# ---------------------------------------------------------------------------------------------------


def official_normalize(s):
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_v1(references: dict, predictions: dict) -> dict:
    """evaluate-v1.1.py: evaluate(dataset, predictions), with the dataset flattened to {id: answers}."""

    def f1_score(prediction, ground_truth):
        prediction_tokens = official_normalize(prediction).split()
        ground_truth_tokens = official_normalize(ground_truth).split()
        common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        return (2 * precision * recall) / (precision + recall)

    def exact_match_score(prediction, ground_truth):
        return official_normalize(prediction) == official_normalize(ground_truth)

    def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
        return max(metric_fn(prediction, gt) for gt in ground_truths)

    f1 = exact_match = total = 0
    for qid, ground_truths in references.items():
        total += 1
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def official_v2(references: dict, predictions: dict) -> dict:
    """evaluate-v2.0.py main() without a no-answer probability file (na_probs all 0, threshold 1.0)."""

    def get_tokens(s):
        if not s:
            return []
        return official_normalize(s).split()

    def compute_exact(a_gold, a_pred):
        return int(official_normalize(a_gold) == official_normalize(a_pred))

    def compute_f1(a_gold, a_pred):
        gold_toks = get_tokens(a_gold)
        pred_toks = get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(pred_toks)
        recall = 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    qid_to_has_ans = {qid: bool(answers) for qid, answers in references.items()}
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_scores, f1_scores = {}, {}
    for qid, answers in references.items():
        gold_answers = [a for a in answers if official_normalize(a)]
        if not gold_answers:
            gold_answers = [""]
        if qid not in predictions:
            continue
        a_pred = predictions[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    na_probs = {k: 0.0 for k in predictions}
    exact_thresh = {q: (float(not qid_to_has_ans[q]) if na_probs[q] > 1.0 else s) for q, s in exact_scores.items()}
    f1_thresh = {q: (float(not qid_to_has_ans[q]) if na_probs[q] > 1.0 else s) for q, s in f1_scores.items()}

    def make_eval_dict(qid_list=None):
        if not qid_list:
            total = len(exact_thresh)
            return {"exact": 100.0 * sum(exact_thresh.values()) / total,
                    "f1": 100.0 * sum(f1_thresh.values()) / total, "total": total}
        total = len(qid_list)
        return {"exact": 100.0 * sum(exact_thresh[k] for k in qid_list) / total,
                "f1": 100.0 * sum(f1_thresh[k] for k in qid_list) / total, "total": total}

    out = make_eval_dict()
    if has_ans_qids:
        out.update({f"HasAns_{k}": v for k, v in make_eval_dict(has_ans_qids).items()})
    if no_ans_qids:
        out.update({f"NoAns_{k}": v for k, v in make_eval_dict(no_ans_qids).items()})
    return out


def assert_squad_equal(ours: dict, official: dict):
    assert set(ours) == set(official)
    for key, value in official.items():
        if key.endswith("total"):
            assert ours[key] == value
        else:
            assert close(100.0 * ours[key], value), key


def random_squad(rng: random.Random, n: int, unanswerable: float):
    references, predictions = {}, {}
    for i in range(n):
        qid = f"q{i}"
        if rng.random() < unanswerable:
            answers = []
        else:
            answers = [random_text(rng, 1, 6) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.1:
                answers.append(rng.choice(["the", "An", "!!", "  ", "a."]))  # normalizes to ""
        references[qid] = answers
        roll = rng.random()
        if roll < 0.15:
            predictions[qid] = ""
        elif roll < 0.25:
            predictions[qid] = rng.choice(["the", "?", "an!"])
        elif roll < 0.8 and answers:
            predictions[qid] = perturb(rng, rng.choice(answers))
        else:
            predictions[qid] = random_text(rng, 1, 6)
    return references, predictions


@pytest.mark.parametrize("seed", range(5))
def test_squad_v1_matches_official(seed):
    references, predictions = random_squad(random.Random(seed), 300, unanswerable=0.0)
    ours = squad_scores(predictions, references)
    assert ours["total"] == 300
    assert_squad_equal({k: v for k, v in ours.items() if k != "total"}, official_v1(references, predictions))


@pytest.mark.parametrize("seed", range(5))
def test_squad_v2_matches_official(seed):
    references, predictions = random_squad(random.Random(100 + seed), 300, unanswerable=0.4)
    assert_squad_equal(squad_scores(predictions, references), official_v2(references, predictions))
    # all answerable / all unanswerable, scored as v2
    answerable = {q: a for q, a in references.items() if a}
    assert_squad_equal(squad_scores(predictions, answerable, version_2=True), official_v2(answerable, predictions))
    unanswerable = {q: a for q, a in references.items() if not a}
    assert_squad_equal(squad_scores(predictions, unanswerable), official_v2(unanswerable, predictions))


def test_squad_by_hand():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day; THE end.") == "apple day end"
    assert normalize_answer("theatre anthem") == "theatre anthem"  # whole words only
    assert normalize_answer("“Zürich” — A café") == "“zürich” — café"  # non-ASCII punctuation stays
    assert normalize_answer("İstanbul\u00a0\u3000naïve") == "i̇stanbul naïve"
    assert normalize_answer("éthe ñan") == "éthe ñan"  # Unicode word boundaries: no article here

    # v1.1: "the cat sat" vs "a cat sat down": tokens [cat, sat] vs [cat, sat, down]: P=1, R=2/3, F1=0.8
    scores = squad_scores({"1": "the cat sat", "2": "Paris", "3": "nothing"},
                          {"1": ["a cat sat down"], "2": ["paris!", "in Paris"], "3": ["x"]})
    assert scores == {"exact_match": pytest.approx(1 / 3), "f1": pytest.approx((0.8 + 1 + 0) / 3), "total": 3}
    # a missing prediction scores 0 but counts
    assert squad_scores({}, {"1": ["a"]}) == {"exact_match": 0.0, "f1": 0.0, "total": 1}

    # v2.0: "" is the right answer to an unanswerable question and wrong for an answerable one
    scores = squad_scores({"1": "", "2": "something", "3": "", "4": "the Cat"},
                          {"1": [], "2": [], "3": ["cat"], "4": ["cat", "dog"]})
    assert scores == {
        "exact": 0.5, "f1": 0.5, "total": 4,
        "HasAns_exact": 0.5, "HasAns_f1": 0.5, "HasAns_total": 2,
        "NoAns_exact": 0.5, "NoAns_f1": 0.5, "NoAns_total": 2,
    }
    # a gold answer that normalizes to "" is dropped; with none left, only "" is right (still HasAns)
    scores = squad_scores({"1": "", "2": "x"}, {"1": ["The"], "2": []})
    assert scores["HasAns_exact"] == 1.0 and scores["NoAns_exact"] == 0.0
    # v1.1 F1 of two empty normalizations is 0 (EM is 1); v2.0 says 1
    assert squad_scores({"1": "a"}, {"1": ["the"]}) == {"exact_match": 1.0, "f1": 0.0, "total": 1}
    assert squad_scores({"1": "a"}, {"1": ["the"]}, version_2=True)["f1"] == 1.0

    with pytest.raises(ValueError, match="needs one"):
        squad_scores({"1": ""}, {"1": []}, version_2=False)
    with pytest.raises(ValueError, match="list of strings"):
        squad_scores({"1": "x"}, {"1": "x"})
    assert math.isnan(squad_scores({}, {})["f1"])


# ---------------------------------------------------------------------------------------------------
# ROUGE vs rouge_score
# ---------------------------------------------------------------------------------------------------

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def random_summary(rng: random.Random) -> str:
    return "\n".join(random_text(rng, 0, 9) for _ in range(rng.randint(0, 4)))


@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_rouge_matches_rouge_score(rouge_scorer, use_stemmer, seed):
    rng = random.Random(seed)
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES + ["rouge3"], use_stemmer=use_stemmer)
    references = [random_summary(rng) for _ in range(60)]
    predictions = [
        "\n".join(perturb(rng, line) for line in ref.split("\n")) if rng.random() < 0.7 else random_summary(rng)
        for ref in references
    ]
    theirs = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    for i, (ref, pred) in enumerate(zip(references, predictions)):
        ours = rouge_scores([pred], [ref], rouge_types=ROUGE_TYPES + ["rouge3"], use_stemmer=use_stemmer)
        for rouge_type in ROUGE_TYPES + ["rouge3"]:
            assert ours[rouge_type] == theirs[i][rouge_type].fmeasure, (i, rouge_type, ref, pred)
    ours = rouge_scores(predictions, references, use_stemmer=use_stemmer)
    for rouge_type in ROUGE_TYPES:
        assert close(ours[rouge_type], np.mean([s[rouge_type].fmeasure for s in theirs]))


def test_rouge_multiple_references_match_score_multi(rouge_scorer):
    rng = random.Random(11)
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES)
    references = [[random_summary(rng) for _ in range(rng.randint(1, 3))] for _ in range(40)]
    predictions = [perturb(rng, refs[0]) for refs in references]
    ours = rouge_scores(predictions, references)
    for rouge_type in ROUGE_TYPES:
        expected = np.mean([scorer.score_multi(refs, pred)[rouge_type].fmeasure
                            for refs, pred in zip(references, predictions)])
        assert close(ours[rouge_type], expected)


def stemmer_vocabulary() -> list[str]:
    # Real English from the standard library's source, plus generated words with Porter's suffixes.
    words = set()
    for module in (inspect, random, string, re, collections, warnings):
        words.update(re.findall(r"[a-z]+", inspect.getsource(module).lower()))
    rng = random.Random(3)
    stems = sorted(w for w in words if 2 <= len(w) <= 8)
    suffixes = ["", "s", "es", "ies", "sses", "ed", "ied", "eed", "ing", "y", "ly", "ational", "tional", "enci",
                "anci", "izer", "bli", "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism",
                "iveness", "fulness", "ousness", "aliti", "iviti", "biliti", "fulli", "logi", "icate", "ative",
                "alize", "iciti", "ical", "ful", "ness", "al", "ance", "ence", "er", "ic", "able", "ible", "ant",
                "ement", "ment", "ent", "sion", "tion", "ou", "ism", "ate", "iti", "ous", "ive", "ize", "e", "ll"]
    for _ in range(6000):
        words.add(rng.choice(stems) + rng.choice(suffixes))
    for _ in range(1500):
        words.add("".join(rng.choice("aeiouybcdlnrstwxz") for _ in range(rng.randint(4, 9))))
    words.update(["caresses", "ponies", "ties", "caress", "cats", "feed", "agreed", "plastered", "bled", "motoring",
                  "sing", "conflated", "troubled", "sized", "hopping", "tanned", "falling", "hissing", "fizzed",
                  "failing", "filing", "happy", "sky", "skies", "dying", "lying", "tying", "news", "innings",
                  "outings", "cannings", "howe", "proceed", "exceed", "succeed", "flies", "dies", "spied", "died",
                  "enjoy", "yyyy", "syzygy", "toy", "generously", "archaeology", "geology", "controlling", "roll",
                  "2019", "3d", "abc123"])
    return sorted(words)


def test_porter_stemmer_matches_nltk():
    porter = pytest.importorskip("nltk.stem.porter", reason=DEV)
    stemmer = porter.PorterStemmer()
    vocabulary = stemmer_vocabulary()
    assert len(vocabulary) > 5000
    mismatches = [(w, porter_stem(w), stemmer.stem(w)) for w in vocabulary if porter_stem(w) != stemmer.stem(w)]
    assert not mismatches, mismatches[:20]


def test_rouge_by_hand():
    # unigrams: the x2, cat, on, mat shared: 5/6 each way; bigrams: the cat, on the, the mat: 3/5;
    # LCS "the cat on the mat": 5
    scores = rouge_scores(["the cat sat on the mat"], ["The cat is on the mat."])
    assert scores == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5),
                      "rougeL": pytest.approx(5 / 6), "rougeLsum": pytest.approx(5 / 6)}
    # Lsum: reference sentences [a b c], [d e]; candidate [a c d], [b e]: union LCS per reference
    # sentence = {a, c} u {b} = 3 hits, then {d} u {e} = 2: 5 hits of 5 both ways
    assert rouge_scores(["a c d\nb e"], ["a b c\nd e"], rouge_types=["rougeLsum"]) == {"rougeLsum": 1.0}
    # ... while one LCS over the joined texts is a c d e / a b c d e: P = 4/5, R = 4/5
    assert rouge_scores(["a c d\nb e"], ["a b c\nd e"], rouge_types=["rougeL"])["rougeL"] == pytest.approx(0.8)
    assert rouge_tokenize("Héllo, WORLD-42 北京 it's") == ["h", "llo", "world", "42", "it", "s"]
    assert rouge_tokenize("Running dogs generalizations", use_stemmer=True) == ["run", "dog", "gener"]
    assert [porter_stem(w) for w in ("caresses", "ponies", "relational", "hopefulness", "sky")] == [
        "caress", "poni", "relat", "hope", "sky"]
    # nothing to match: empty or non-ASCII text, and an empty corpus
    assert rouge_scores(["", "北京"], ["the cat", "北京"]) == {t: 0.0 for t in ROUGE_TYPES}
    assert all(math.isnan(v) for v in rouge_scores([], []).values())
    assert rouge_scores(["a b", "x"], [["x y", "a b"], ["x"]], rouge_types=["rouge1"]) == {"rouge1": 1.0}
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge_scores(["a"], ["a"], rouge_types=["rougeW"])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_scores(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------------
# BLEU vs sacrebleu
# ---------------------------------------------------------------------------------------------------


def as_streams(references: list[list[str]]) -> list[list]:
    """Our per-example reference lists -> sacrebleu's reference streams (None pads missing ones)."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def assert_bleu_equal(ours: dict, theirs):
    assert close(ours["score"], theirs.score)
    assert ours["counts"] == list(theirs.counts) and ours["totals"] == list(theirs.totals)
    assert all(close(a, b) for a, b in zip(ours["precisions"], theirs.precisions))
    assert close(ours["bp"], theirs.bp)
    assert (ours["sys_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)


@pytest.mark.parametrize("options", [{}, {"lowercase": True}, {"tokenize": "none"}])
@pytest.mark.parametrize("seed", range(3))
def test_bleu_matches_sacrebleu(sacrebleu, options, seed):
    rng = random.Random(seed)
    references = [[random_text(rng, 1, 15) for _ in range(rng.randint(1, 4))] for _ in range(120)]
    predictions = [perturb(rng, refs[0]) if rng.random() < 0.8 else random_text(rng, 0, 15) for refs in references]
    theirs = sacrebleu.corpus_bleu(predictions, as_streams(references), **options)
    assert_bleu_equal(bleu_score(predictions, references, **options), theirs)
    # sentence by sentence too (short segments exercise smoothing and the brevity penalty)
    for prediction, refs in list(zip(predictions, references))[:30]:
        assert_bleu_equal(bleu_score([prediction], [refs], **options),
                          sacrebleu.corpus_bleu([prediction], as_streams([refs]), **options))


@pytest.mark.parametrize(
    "predictions, references",
    [
        (["", ""], [["a b c"], ["d"]]),  # empty predictions: BP 0
        (["x y z"], [["a b c"]]),  # no match at all
        (["a"], [["a"]]),  # single token: no 2-grams, BLEU 0 without effective order
        (["a b c d"], [["a b c d"]]),  # perfect
        (["a b c d e f"], [["a b c x e f"]]),  # some orders with no match: exp smoothing
        (["A b, c."], [["", "a b , c ."]]),  # an empty reference
        (["Zürich 北京 café — “ok”"], [["Zürich 北京 café — “ok”", "zurich"]]),  # unicode
        (["3.14 and 1,000 5-6 &amp; <skipped>x -\nhi  "], [["3.14 and 1,000 5 - 6 & x hi"]]),  # 13a rules
        (["ends with a dash -\n", "ends -\n\n"], [["ends with a dash -"], ["ends"]]),  # rstrip before 13a
    ],
)
def test_bleu_edge_cases_match_sacrebleu(sacrebleu, predictions, references):
    assert_bleu_equal(bleu_score(predictions, references), sacrebleu.corpus_bleu(predictions, as_streams(references)))


def test_bleu_by_hand():
    assert tokenize_13a("Hello, world! 3.14 and 1,000 5-6.") == "Hello , world ! 3.14 and 1,000 5 - 6 ."
    assert tokenize_13a("a &amp; b &lt;c&gt; &quot;d&quot;") == 'a & b < c > " d "'
    # "The cat sat on the mat ." vs "The cat is on the mat .": matches 6/7, 4/6, 2/5, 1/4, same length
    scores = bleu_score(["The cat sat on the mat."], [["The cat is on the mat."]])
    assert scores["counts"] == [6, 4, 2, 1] and scores["totals"] == [7, 6, 5, 4]
    assert scores["bp"] == 1.0 and (scores["sys_len"], scores["ref_len"]) == (7, 7)
    assert scores["score"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25)
    # brevity penalty: 3 tokens against the closest reference (4, not 1 or 10): exp(1 - 4/3)
    scores = bleu_score(["a b c"], [["a b c d", "a", "a b c d e f g h i j"]])
    assert scores["ref_len"] == 4 and scores["bp"] == pytest.approx(math.exp(1 - 4 / 3))
    # exp smoothing: no 4-gram match of 1 -> precision 100 / (2 * 1)
    scores = bleu_score(["a b c d"], [["a b c x"]])
    assert scores["precisions"] == pytest.approx([75.0, 200 / 3, 50.0, 50.0])
    # a tie between reference lengths picks the shorter one
    assert bleu_score(["a b c"], [["a b", "a b c d"]])["ref_len"] == 2
    assert bleu_score([], [])["score"] == 0.0
    with pytest.raises(ValueError, match="example 0 has no reference"):
        bleu_score(["a"], [[]])
    with pytest.raises(ValueError, match="list of strings"):
        bleu_score(["a"], ["a"])


# ---------------------------------------------------------------------------------------------------
# Relation F1 vs scikit-learn and the TACRED scorer
# ---------------------------------------------------------------------------------------------------


def tacred_score(key, prediction, no_relation):
    """tacred/scorer.py score(): micro P/R/F1 over everything but no_relation."""
    correct_by_relation, guessed_by_relation, gold_by_relation = (collections.Counter() for _ in range(3))
    for gold, guess in zip(key, prediction):
        if gold == no_relation and guess == no_relation:
            pass
        elif gold == no_relation and guess != no_relation:
            guessed_by_relation[guess] += 1
        elif gold != no_relation and guess == no_relation:
            gold_by_relation[gold] += 1
        elif gold != no_relation and guess != no_relation:
            guessed_by_relation[guess] += 1
            gold_by_relation[gold] += 1
            if gold == guess:
                correct_by_relation[guess] += 1
    prec_micro = 1.0
    if sum(guessed_by_relation.values()) > 0:
        prec_micro = float(sum(correct_by_relation.values())) / float(sum(guessed_by_relation.values()))
    recall_micro = 0.0
    if sum(gold_by_relation.values()) > 0:
        recall_micro = float(sum(correct_by_relation.values())) / float(sum(gold_by_relation.values()))
    f1_micro = 0.0
    if prec_micro + recall_micro > 0.0:
        f1_micro = 2.0 * prec_micro * recall_micro / (prec_micro + recall_micro)
    return prec_micro, recall_micro, f1_micro


@pytest.mark.parametrize("seed", range(5))
def test_relation_f1_matches_sklearn_and_tacred(sklearn_metrics, seed):
    rng = np.random.default_rng(seed)
    labels = np.array(["no_relation", "per:title", "org:founded", "per:age", "org:members"])
    true = rng.choice(labels, 400, p=[0.6, 0.1, 0.1, 0.1, 0.1])
    pred = np.where(rng.random(400) < 0.6, true, rng.choice(labels, 400))
    ours = relation_f1(list(true), list(pred), "no_relation")
    relations = sorted((set(true) | set(pred)) - {"no_relation"})
    for average in ("micro", "macro"):
        p, r, f, _ = sklearn_metrics.precision_recall_fscore_support(
            true, pred, labels=relations, average=average, zero_division=0)
        suffix = "" if average == "micro" else "_macro"
        assert (close(ours[f"precision{suffix}"], p), close(ours[f"recall{suffix}"], r),
                close(ours[f"f1{suffix}"], f)) == (True, True, True), average
    p, r, f, s = sklearn_metrics.precision_recall_fscore_support(true, pred, labels=relations, zero_division=0)
    assert list(ours["per_relation"]) == relations
    for i, relation in enumerate(relations):
        row = ours["per_relation"][relation]
        assert (close(row["precision"], p[i]), close(row["recall"], r[i]), close(row["f1"], f[i])) == (True,) * 3
        assert row["support"] == s[i]
    assert all(close(a, b) for a, b in zip((ours["precision"], ours["recall"], ours["f1"]),
                                             tacred_score(true, pred, "no_relation")))
    assert ours["support"] == int((true != "no_relation").sum())


def test_relation_f1_by_hand():
    # 3 positive predictions (a right, b wrong, c spurious), 3 positive references (a, b, d)
    scores = relation_f1(["a", "b", "NA", "d", "NA"], ["a", "c", "c", "NA", "NA"], "NA")
    assert (scores["precision"], scores["recall"], scores["f1"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3),
                                                                     pytest.approx(1 / 3))
    assert scores["per_relation"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert scores["per_relation"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert scores["f1_macro"] == pytest.approx(1 / 4)  # a, b, c, d
    # nothing predicted positive: 0/0 precision is 0 here (TACRED says 1.0; F1 is 0 either way)
    nothing = relation_f1(["a", "NA"], ["NA", "NA"], "NA")
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)
    assert tacred_score(["a", "NA"], ["NA", "NA"], "NA") == (1.0, 0.0, 0.0)
    only_negatives = relation_f1(["NA"], ["NA"], "NA")
    assert only_negatives["f1"] == 0.0 and math.isnan(only_negatives["f1_macro"])
    assert only_negatives["per_relation"] == {}
    assert relation_f1([0, 1, 2], [0, 1, 1], no_relation=0)["f1"] == pytest.approx(0.5)  # integer labels
    with pytest.raises(ValueError, match="2 reference labels but 1 predicted"):
        relation_f1(["a", "b"], ["a"], "NA")


# ---------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(5), 10) == pytest.approx(5.0)
    # a uniform model over V tokens has perplexity V
    vocab, n = 50, 37
    logits = np.zeros((n, vocab))
    targets = np.random.default_rng(0).integers(0, vocab, n)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert perplexity(float(-log_probs[np.arange(n), targets].sum()), n) == pytest.approx(vocab)
    # exp of the token mean, not the mean of per-batch perplexities
    assert perplexity(1.0 + 3.0, 1 + 3) == pytest.approx(math.e)
    assert math.isnan(perplexity(0.0, 0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="total_tokens must be >= 0"):
        perplexity(1.0, -1)
