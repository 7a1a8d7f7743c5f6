"""launcher.squad, the launcher's own SQuAD scorer, agrees with the official scripts.

The official evaluate-v1.1.py / evaluate-v2.0.py are scripts, not packages: their logic is re-written
here as oracles and compared on randomized inputs with fixed seeds; hand-computed cases check the
rules without any oracle (v2 unanswerable questions, empty predictions, the HasAns/NoAns breakdown).
"""

from __future__ import annotations

import collections
import math
import random
import re
import string

import pytest

from launcher.squad import normalize_answer, squad_scores


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


# The official evaluate-v1.1.py / evaluate-v2.0.py logic


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


def test_squad_v2_model_that_never_answers():
    # Every prediction empty: right on each unanswerable question, wrong on each answerable one.
    scores = squad_scores({"1": "", "2": "", "3": ""}, {"1": [], "2": [], "3": ["cat"]})
    assert scores == {
        "exact": 2 / 3, "f1": 2 / 3, "total": 3,
        "HasAns_exact": 0.0, "HasAns_f1": 0.0, "HasAns_total": 1,
        "NoAns_exact": 1.0, "NoAns_f1": 1.0, "NoAns_total": 2,
    }
    # only answerable questions, scored as v2 (the task passes version_2 from its recipe): no NoAns keys
    assert set(squad_scores({"3": ""}, {"3": ["cat"]}, version_2=True)) == {
        "exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
