"""SQuAD exact match and token F1: own code, because the official v1.1/v2.0 evaluation scripts are not a package.

A line-for-line port of ``evaluate-v1.1.py`` and ``evaluate-v2.0.py`` (without the no-answer probability
file), on fractions 0..1 instead of percentages; ``tests/unit/test_squad.py`` compares it with both scripts.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Hashable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lowercase, drop ASCII punctuation (``string.punctuation``), drop
    the words a/an/the, collapse whitespace. Non-ASCII punctuation (``“”``, ``。``) is kept, as there."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_overlap_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def _squad_f1_v1(prediction: str, gold: str) -> float:
    return _token_overlap_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _squad_f1_v2(gold: str, prediction: str) -> float:
    gold_tokens = normalize_answer(gold).split() if gold else []
    prediction_tokens = normalize_answer(prediction).split() if prediction else []
    if not gold_tokens or not prediction_tokens:
        # An empty answer (no-answer) scores 1 against an empty answer, 0 against anything else.
        return int(gold_tokens == prediction_tokens)
    return _token_overlap_f1(prediction_tokens, gold_tokens)


def squad_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    version_2: bool | None = None,
) -> dict:
    """Exact match and token F1 of extractive QA answers, as the official SQuAD scripts compute them.

    ``predictions`` maps a question id to the predicted answer text; ``references`` maps every question
    id to its gold answer texts (an empty list = unanswerable, SQuAD 2.0). Each question scores the best
    over its gold answers after :func:`normalize_answer`. Scores are **fractions 0..1** (the official
    scripts print percentages: multiply by 100 to compare). Prediction ids absent from ``references``
    are ignored. A question with no prediction scores 0 and still counts in the totals (the v1.1 rule;
    the v2.0 script would drop it from ``total``, a bias towards skipping hard questions).

    ``version_2=None`` (default) picks v2.0 when some question has no gold answer, else v1.1:

    - v1.1 (``evaluate-v1.1.py``): ``{"exact_match", "f1", "total"}``. Every question needs at least one
      gold answer.
    - v2.0 (``evaluate-v2.0.py``, no no-answer probability file): ``{"exact", "f1", "total"}`` plus
      ``HasAns_exact``/``HasAns_f1``/``HasAns_total`` when some question is answerable and
      ``NoAns_exact``/``NoAns_f1``/``NoAns_total`` when some is not. The only correct prediction for an
      unanswerable question is one that normalizes to ``""``. As in the script, gold answers that
      normalize to ``""`` (say ``"the"``) are dropped, and a question left with none is scored as
      unanswerable (while still counted under HasAns). v2.0 F1 also differs from v1.1 when a
      prediction normalizes to ``""``.

    Pass ``version_2`` explicitly when the output keys must not depend on the data (an evaluation set
    with only answerable SQuAD 2.0 questions would otherwise be scored as v1.1).
    """
    if version_2 is None:
        version_2 = any(len(answers) == 0 for answers in references.values())
    for qid, answers in references.items():
        if isinstance(answers, str):
            raise ValueError(f"question {qid!r}: gold answers must be a list of strings, got a string")
    total = len(references)
    if not version_2:
        exact_sum = f1_sum = 0.0
        for qid, answers in references.items():
            if not answers:
                raise ValueError(
                    f"question {qid!r} has no gold answer; SQuAD v1.1 needs one (pass version_2=True for "
                    f"unanswerable questions)"
                )
            if qid not in predictions:
                continue
            prediction = predictions[qid]
            exact_sum += max(normalize_answer(prediction) == normalize_answer(gold) for gold in answers)
            f1_sum += max(_squad_f1_v1(prediction, gold) for gold in answers)
        if not total:
            return {"exact_match": float("nan"), "f1": float("nan"), "total": 0}
        return {"exact_match": exact_sum / total, "f1": f1_sum / total, "total": total}

    exact: dict = {}
    f1: dict = {}
    for qid, answers in references.items():
        golds = [gold for gold in answers if normalize_answer(gold)] or [""]
        if qid not in predictions:
            exact[qid] = f1[qid] = 0
            continue
        prediction = predictions[qid]
        exact[qid] = max(int(normalize_answer(gold) == normalize_answer(prediction)) for gold in golds)
        f1[qid] = max(_squad_f1_v2(gold, prediction) for gold in golds)

    def summary(qids: list) -> tuple[float, float, int]:
        if not qids:
            return float("nan"), float("nan"), 0
        return sum(exact[q] for q in qids) / len(qids), sum(f1[q] for q in qids) / len(qids), len(qids)

    result: dict = {}
    result["exact"], result["f1"], result["total"] = summary(list(references))
    has_answer = [qid for qid, answers in references.items() if answers]
    no_answer = [qid for qid, answers in references.items() if not answers]
    if has_answer:
        result["HasAns_exact"], result["HasAns_f1"], result["HasAns_total"] = summary(has_answer)
    if no_answer:
        result["NoAns_exact"], result["NoAns_f1"], result["NoAns_total"] = summary(no_answer)
    return result
