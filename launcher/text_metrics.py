"""Offline metrics for NLP tasks beyond sequence classification.

Each function re-implements one reference scorer, operation for operation, with the standard library
and numpy only (the ``evaluate`` Hub scripts cannot load offline, and the reference packages are not
runtime dependencies). ``tests/unit/test_text_metrics.py`` compares every function with its reference
on randomized inputs.

=================  ==========================================================  ==================
function           equals                                                      scale
=================  ==========================================================  ==================
entity_scores      ``seqeval.metrics`` (default mode, i.e. conlleval chunking)  fractions 0..1
squad_scores       official SQuAD v1.1 / v2.0 ``evaluate`` scripts             fractions 0..1
rouge_scores       ``rouge_score.rouge_scorer.RougeScorer`` (mean F-measure)   fractions 0..1
bleu_score         ``sacrebleu.corpus_bleu`` defaults (13a, exp smoothing)     0..100 (sacrebleu)
relation_f1        TACRED scorer / scikit-learn micro-F1 without no_relation   fractions 0..1
perplexity         exp(mean token negative log-likelihood)                     >= 1
=================  ==========================================================  ==================

Fractions follow :mod:`launcher.metrics` (``accuracy`` is 0..1); only BLEU keeps sacrebleu's 0..100,
because a "BLEU of 0.27" is read as a different number everywhere else. Input errors raise
``ValueError``.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "entity_scores",
    "get_entities",
    "squad_scores",
    "normalize_answer",
    "rouge_scores",
    "rouge_tokenize",
    "porter_stem",
    "bleu_score",
    "tokenize_13a",
    "relation_f1",
    "perplexity",
]


# ---------------------------------------------------------------------------------------------------
# Named entities: seqeval, default (conlleval-compatible) mode
# ---------------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    # seqeval (suffix=False): the first character is the chunk tag, the type is what follows the first
    # "-" ("B-PER" -> B, PER; "O" -> O, _; "B" -> B, _; "B-A-B" -> B, A-B).
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"entity tags must be non-empty strings, got {tag!r}")
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_tag != "." and prev_type != type_


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and tag != "." and prev_type != type_


def get_entities(sequences: Sequence[Sequence[str]]) -> list[tuple[str, int, int]]:
    """Chunks ``(type, first, last)`` of tagged sentences, exactly as ``seqeval.metrics.get_entities``.

    Sentences are concatenated with an ``"O"`` after each (as seqeval does), so offsets are positions in
    that concatenation and a chunk never crosses a sentence boundary when the tags are well formed.
    Chunking is conlleval's: a chunk starts at ``B-``/``S-``, at an ``I-``/``E-`` after ``O`` or after a
    finished chunk, and wherever the type changes (so IOB1, IOB2/BIO and IOBES all work); it ends before
    ``B-``/``S-``/``O``, after ``E-``/``S-``, and wherever the type changes.
    """
    flat: list[str] = []
    for sentence in sequences:
        flat.extend(sentence)
        flat.append("O")
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, chunk in enumerate(flat + ["O"]):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _bilou_to_iobes(tag: str) -> str:
    if tag[:1] == "L" and (len(tag) == 1 or tag[1] == "-"):
        return "E" + tag[1:]
    if tag[:1] == "U" and (len(tag) == 1 or tag[1] == "-"):
        return "S" + tag[1:]
    return tag


def _check_tag_shapes(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> None:
    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} reference sentences but {len(pred_tags)} predicted ones")
    for index, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if isinstance(true, str) or isinstance(pred, str):
            raise ValueError(f"sentence {index}: expected a list of tags, got a string")
        if len(true) != len(pred):
            raise ValueError(f"sentence {index}: {len(true)} reference tags but {len(pred)} predicted tags")


def _prf(correct: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, ...]:
    # seqeval/scikit-learn with zero_division=0 ("warn" without the warning): 0/0 scores 0.
    correct, predicted, support = (np.asarray(a, dtype=np.float64) for a in (correct, predicted, support))
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(correct), where=denominator > 0)
    return precision, recall, f1


def entity_scores(
    true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]], *, bilou: bool = False
) -> dict:
    """Entity-level precision/recall/F1 of a tagger, as seqeval computes them by default.

    ``true_tags`` and ``pred_tags`` are lists of sentences, each a list of tags (``"B-PER"``, ``"I-PER"``,
    ``"O"``, ...) of the same length. Entities are chunked as in :func:`get_entities` (seqeval's default
    mode, compatible with conlleval.pl: IOB1, IOB2/BIO and IOBES are all read; an ``I-`` tag after ``O``
    or after another type starts an entity). ``bilou=True`` first maps ``L-`` to ``E-`` and ``U-`` to
    ``S-`` (seqeval itself does not know ``L``/``U`` and would merge ``U-X U-X`` into one entity).
    An entity is correct when its type, first and last token all match.

    Returns (0..1 fractions, 0/0 counted as 0):

    - ``precision``, ``recall``, ``f1``: micro averages over all entities (``seqeval.metrics.f1_score``,
      ``precision_score``, ``recall_score`` with default arguments); ``support``: number of reference
      entities;
    - ``precision_macro`` ... ``f1_weighted``: the ``macro avg`` and ``weighted avg`` rows of
      ``seqeval.metrics.classification_report`` (macro is NaN when there is no entity at all, as there);
    - ``accuracy``: token accuracy over all tags (``seqeval.metrics.accuracy_score``; NaN with no tags);
    - ``per_type``: ``{type: {precision, recall, f1, support}}`` for every type in the references or the
      predictions, sorted by name.

    Sentences of unequal lengths raise ``ValueError``. An empty corpus scores 0 with NaN accuracy
    (seqeval raises on it).
    """
    _check_tag_shapes(true_tags, pred_tags)
    flat_true = [tag for sentence in true_tags for tag in sentence]
    flat_pred = [tag for sentence in pred_tags for tag in sentence]
    if bilou:
        true_tags = [[_bilou_to_iobes(t) for t in sentence] for sentence in true_tags]
        pred_tags = [[_bilou_to_iobes(t) for t in sentence] for sentence in pred_tags]
    true_by_type: dict[str, set] = collections.defaultdict(set)
    pred_by_type: dict[str, set] = collections.defaultdict(set)
    for type_, first, last in get_entities(true_tags):
        true_by_type[type_].add((first, last))
    for type_, first, last in get_entities(pred_tags):
        pred_by_type[type_].add((first, last))
    types = sorted(set(true_by_type) | set(pred_by_type))
    correct = np.array([len(true_by_type[t] & pred_by_type[t]) for t in types], dtype=np.int64)
    predicted = np.array([len(pred_by_type[t]) for t in types], dtype=np.int64)
    support = np.array([len(true_by_type[t]) for t in types], dtype=np.int64)

    micro_p, micro_r, micro_f = (float(a[0]) for a in _prf(correct.sum(keepdims=True), predicted.sum(keepdims=True),
                                                           support.sum(keepdims=True)))
    precision, recall, f1 = _prf(correct, predicted, support)
    result = {"precision": micro_p, "recall": micro_r, "f1": micro_f, "support": int(support.sum())}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_macro"] = float(np.mean(values)) if len(types) else float("nan")
        # seqeval: with no reference entity the weighted average is 0 (zero_division), not NaN.
        result[f"{name}_weighted"] = float(np.average(values, weights=support)) if support.sum() else 0.0

    result["accuracy"] = (
        sum(t == p for t, p in zip(flat_true, flat_pred)) / len(flat_true) if flat_true else float("nan")
    )
    result["per_type"] = {
        t: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "support": int(support[i])}
        for i, t in enumerate(types)
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Extractive QA: the official SQuAD v1.1 and v2.0 evaluation scripts
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Summarization: Google's rouge_score package
# ---------------------------------------------------------------------------------------------------

# Porter stemmer, NLTK's default mode (PorterStemmer(mode=NLTK_EXTENSIONS)), which is what rouge_score's
# DefaultTokenizer(use_stemmer=True) uses.
_VOWELS = frozenset("aeiou")
_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
    "exceed": "exceed", "succeed": "succeed",
}


def _consonant_flags(word: str) -> list[bool]:
    # A letter is a consonant unless it is a vowel, or a "y" after a consonant.
    flags: list[bool] = []
    for i, ch in enumerate(word):
        if ch in _VOWELS:
            flags.append(False)
        elif ch == "y":
            flags.append(True if i == 0 else not flags[i - 1])
        else:
            flags.append(True)
    return flags


def _is_consonant(word: str, i: int) -> bool:
    return _consonant_flags(word[: i + 1])[i]


def _measure(stem: str) -> int:
    return "".join("c" if c else "v" for c in _consonant_flags(stem)).count("vc")


def _contains_vowel(stem: str) -> bool:
    return not all(_consonant_flags(stem))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    if len(word) >= 3:
        flags = _consonant_flags(word)
        if flags[-3] and not flags[-2] and flags[-1] and word[-1] not in "wxy":
            return True
    return len(word) == 2 and not _is_consonant(word, 0) and _is_consonant(word, 1)


def _apply_rules(word: str, rules) -> str:
    # The first rule whose suffix matches decides, whether or not its condition holds.
    for suffix, replacement, condition in rules:
        if suffix == "*d" and _ends_double_consonant(word):
            stem = word[:-2]
            return stem + replacement if condition is None or condition(stem) else word
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + replacement if condition is None or condition(stem) else word
    return word


def _positive_measure(stem: str) -> bool:
    return _measure(stem) > 0


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-3] + "ie"
    return _apply_rules(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        stem = word[:-3]
        return stem + "ee" if _measure(stem) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _contains_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    return _apply_rules(stem, [
        ("at", "ate", None),
        ("bl", "ble", None),
        ("iz", "ize", None),
        ("*d", stem[-1], lambda s: stem[-1] not in ("l", "s", "z")),
        ("", "e", lambda s: _measure(s) == 1 and _ends_cvc(s)),
    ])


def _step1c(word: str) -> str:
    return _apply_rules(word, [("y", "i", lambda s: len(s) > 1 and _is_consonant(s, len(s) - 1))])


def _step2(word: str) -> str:
    if word.endswith("alli") and _positive_measure(word[:-4]):
        return _step2(word[:-4] + "al")
    rules = [
        ("ational", "ate", _positive_measure),
        ("tional", "tion", _positive_measure),
        ("enci", "ence", _positive_measure),
        ("anci", "ance", _positive_measure),
        ("izer", "ize", _positive_measure),
        ("bli", "ble", _positive_measure),
        ("alli", "al", _positive_measure),
        ("entli", "ent", _positive_measure),
        ("eli", "e", _positive_measure),
        ("ousli", "ous", _positive_measure),
        ("ization", "ize", _positive_measure),
        ("ation", "ate", _positive_measure),
        ("ator", "ate", _positive_measure),
        ("alism", "al", _positive_measure),
        ("iveness", "ive", _positive_measure),
        ("fulness", "ful", _positive_measure),
        ("ousness", "ous", _positive_measure),
        ("aliti", "al", _positive_measure),
        ("iviti", "ive", _positive_measure),
        ("biliti", "ble", _positive_measure),
        ("fulli", "ful", _positive_measure),
        # the "l" of "logi" stays with the stem, so "geo"/"theo" count like "archaeo"
        ("logi", "log", lambda s: _positive_measure(word[:-3])),
    ]
    return _apply_rules(word, rules)


def _step3(word: str) -> str:
    return _apply_rules(word, [
        ("icate", "ic", _positive_measure),
        ("ative", "", _positive_measure),
        ("alize", "al", _positive_measure),
        ("iciti", "ic", _positive_measure),
        ("ical", "ic", _positive_measure),
        ("ful", "", _positive_measure),
        ("ness", "", _positive_measure),
    ])


def _step4(word: str) -> str:
    def gt1(stem: str) -> bool:
        return _measure(stem) > 1

    return _apply_rules(word, [
        ("al", "", gt1), ("ance", "", gt1), ("ence", "", gt1), ("er", "", gt1), ("ic", "", gt1),
        ("able", "", gt1), ("ible", "", gt1), ("ant", "", gt1), ("ement", "", gt1), ("ment", "", gt1),
        ("ent", "", gt1), ("ion", "", lambda s: _measure(s) > 1 and s[-1] in ("s", "t")), ("ou", "", gt1),
        ("ism", "", gt1), ("ate", "", gt1), ("iti", "", gt1), ("ous", "", gt1), ("ive", "", gt1),
        ("ize", "", gt1),
    ])


def _step5a(word: str) -> str:
    if word.endswith("e"):
        stem = word[:-1]
        if _measure(stem) > 1 or (_measure(stem) == 1 and not _ends_cvc(stem)):
            return stem
    return word


def _step5b(word: str) -> str:
    return _apply_rules(word, [("ll", "l", lambda s: _measure(word[:-1]) > 1)])


def porter_stem(word: str) -> str:
    """Porter stem of ``word`` as ``nltk.stem.porter.PorterStemmer().stem`` (NLTK_EXTENSIONS mode)."""
    stem = word.lower()
    if stem in _IRREGULAR:
        return _IRREGULAR[stem]
    if len(word) <= 2:
        return stem
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5a, _step5b):
        stem = step(stem)
    return stem


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge_score's default tokenizer: lowercase, every run of characters other than ``[a-z0-9]`` is a
    separator (so non-ASCII letters vanish), Porter-stem tokens longer than 3 characters if asked."""
    tokens = _ROUGE_TOKEN.findall(text.lower())
    if use_stemmer:
        tokens = [porter_stem(t) if len(t) > 3 else t for t in tokens]
        tokens = [t for t in tokens if _ROUGE_TOKEN.fullmatch(t)]
    return tokens


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngram_counts(tokens: list[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _rouge_n(target: list[str], prediction: list[str], n: int) -> float:
    target_ngrams, prediction_ngrams = _ngram_counts(target, n), _ngram_counts(prediction, n)
    overlap = sum(min(count, prediction_ngrams[ngram]) for ngram, count in target_ngrams.items())
    precision = overlap / max(sum(prediction_ngrams.values()), 1)
    recall = overlap / max(sum(target_ngrams.values()), 1)
    return _fmeasure(precision, recall)


def _lcs_table(ref: list[str], can: list[str]) -> list[list[int]]:
    table = [[0] * (len(can) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        row, above, token = table[i], table[i - 1], ref[i - 1]
        for j in range(1, len(can) + 1):
            row[j] = above[j - 1] + 1 if token == can[j - 1] else max(above[j], row[j - 1])
    return table


def _rouge_l(target: list[str], prediction: list[str]) -> float:
    if not target or not prediction:
        return 0.0
    lcs = _lcs_table(target, prediction)[-1][-1]
    return _fmeasure(lcs / len(prediction), lcs / len(target))


def _lcs_indices(ref: list[str], can: list[str]) -> list[int]:
    # One longest common subsequence (indices into ref), read back the way rouge_score does: the
    # choice matters for the union-LCS counts of ROUGE-Lsum.
    table = _lcs_table(ref, can)
    i, j, indices = len(ref), len(can), []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            indices.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return indices[::-1]


def _rouge_lsum(target_sentences: list[list[str]], prediction_sentences: list[list[str]]) -> float:
    # Summary-level LCS (ROUGE paper section 3.2) with ROUGE-1.5.5's guard against double counting.
    if not target_sentences or not prediction_sentences:
        return 0.0
    m = sum(map(len, target_sentences))
    n = sum(map(len, prediction_sentences))
    if not n or not m:
        return 0.0
    target_counts: collections.Counter = collections.Counter()
    prediction_counts: collections.Counter = collections.Counter()
    for sentence in target_sentences:
        target_counts.update(sentence)
    for sentence in prediction_sentences:
        prediction_counts.update(sentence)
    hits = 0
    for ref in target_sentences:
        union = sorted(set().union(*(_lcs_indices(ref, can) for can in prediction_sentences)))
        for token in (ref[i] for i in union):
            if prediction_counts[token] > 0 and target_counts[token] > 0:
                hits += 1
                prediction_counts[token] -= 1
                target_counts[token] -= 1
    return _fmeasure(hits / n, hits / m)


_ROUGE_TYPE = re.compile(r"rouge[0-9]$")


def _rouge_single(target: str, prediction: str, rouge_types: Sequence[str], use_stemmer: bool) -> dict[str, float]:
    target_tokens = rouge_tokenize(target, use_stemmer)
    prediction_tokens = rouge_tokenize(prediction, use_stemmer)
    scores = {}
    for rouge_type in rouge_types:
        if rouge_type == "rougeL":
            scores[rouge_type] = _rouge_l(target_tokens, prediction_tokens)
        elif rouge_type == "rougeLsum":
            scores[rouge_type] = _rouge_lsum(
                [rouge_tokenize(s, use_stemmer) for s in target.split("\n") if s],
                [rouge_tokenize(s, use_stemmer) for s in prediction.split("\n") if s],
            )
        else:
            scores[rouge_type] = _rouge_n(target_tokens, prediction_tokens, int(rouge_type[5:]))
    return scores


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE F-measures (fractions 0..1) of generated texts, as Google's ``rouge_score`` computes them.

    Per example this equals ``rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
    .score(reference, prediction)[type].fmeasure`` (``score_multi``, i.e. the best reference, when an
    example has a list of references); the result is the plain mean over examples. (Hugging Face
    ``evaluate``'s ``rouge`` reports a bootstrap median of that mean by default, which differs in the
    last digits.) Types: ``rougeN`` for N in 1..9 (n-gram overlap), ``rougeL`` (longest common
    subsequence of the whole texts) and ``rougeLsum`` (summary-level union LCS over sentences, which
    must be separated by ``"\\n"``; ``split_summaries`` sentence splitting is not offered).
    Tokens: see :func:`rouge_tokenize` (ASCII letters and digits only, so text without any, such as
    Chinese, scores 0). ``use_stemmer=True`` uses :func:`porter_stem` (NLTK's default Porter mode, as
    rouge_score does). Empty input gives NaN for every type.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    for rouge_type in rouge_types:
        if rouge_type not in ("rougeL", "rougeLsum") and not (_ROUGE_TYPE.match(rouge_type) and rouge_type != "rouge0"):
            raise ValueError(f"unknown ROUGE type {rouge_type!r} (rouge1..rouge9, rougeL, rougeLsum)")
    totals = {rouge_type: 0.0 for rouge_type in rouge_types}
    for prediction, reference in zip(predictions, references):
        targets = [reference] if isinstance(reference, str) else list(reference)
        if not targets:
            raise ValueError("an example has an empty list of references")
        per_target = [_rouge_single(t, prediction, rouge_types, use_stemmer) for t in targets]
        for rouge_type in rouge_types:
            totals[rouge_type] += max(scores[rouge_type] for scores in per_target)
    if not predictions:
        return {rouge_type: float("nan") for rouge_type in rouge_types}
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


# ---------------------------------------------------------------------------------------------------
# Translation: sacrebleu's corpus BLEU
# ---------------------------------------------------------------------------------------------------

_13A_RULES = [
    # mteval-v13a: symbols become tokens; "." and "," unless between digits; "-" after a digit
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line: str) -> str:
    """sacrebleu's default ``13a`` tokenizer (mteval-v13a.pl, as used by WMT); tokens joined by spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())


def _bleu_ngrams(tokens: list[str], max_order: int) -> collections.Counter:
    return collections.Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1)
    )


def bleu_score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    lowercase: bool = False,
    tokenize: str = "13a",
) -> dict:
    """Corpus BLEU, equal to ``sacrebleu.corpus_bleu`` with its defaults (``tokenize="13a"``,
    ``smooth_method="exp"``, max n-gram order 4, no effective order, case-sensitive).

    ``references[i]`` lists the reference translations of ``predictions[i]`` (any number >= 1 per
    example; sacrebleu's layout is the transpose, one stream per reference, padded with ``None``).
    Clipped n-gram counts use the maximum count over an example's references; the reference length of
    an example is the one closest to the prediction's length (the shorter on a tie). ``tokenize`` is
    ``"13a"`` or ``"none"`` (split on whitespace only); ``lowercase=True`` is sacrebleu's ``-lc``.

    Returns sacrebleu's numbers on **sacrebleu's 0..100 scale** (not 0..1 like the other metrics here):
    ``score``; ``precisions`` (four n-gram precisions, in percent, exp-smoothed where a count is 0);
    ``counts``/``totals`` (matched/predicted n-grams per order); ``bp`` (brevity penalty, 0..1);
    ``sys_len``/``ref_len`` (tokens); ``ratio`` = sys_len/ref_len. No prediction at all gives score 0.
    """
    max_order = 4
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if tokenize not in ("13a", "none"):
        raise ValueError(f"tokenize must be '13a' or 'none', got {tokenize!r}")

    def preprocess(sentence: str) -> list[str]:
        if lowercase:
            sentence = sentence.lower()
        sentence = sentence.rstrip()
        return (tokenize_13a(sentence) if tokenize == "13a" else sentence).split()

    sys_len = ref_len = 0
    correct = [0] * max_order
    total = [0] * max_order
    for index, (prediction, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str):
            raise ValueError(f"example {index}: references must be a list of strings, got a string")
        refs = [r for r in refs if r is not None]
        if not refs:
            raise ValueError(f"example {index} has no reference")
        ref_ngrams: collections.Counter = collections.Counter()
        ref_lens = []
        for ref in refs:
            tokens = preprocess(ref)
            ref_lens.append(len(tokens))
            for ngram, count in _bleu_ngrams(tokens, max_order).items():
                ref_ngrams[ngram] = max(ref_ngrams[ngram], count)
        tokens = preprocess(prediction)
        sys_len += len(tokens)
        ref_len += min(ref_lens, key=lambda length: (abs(len(tokens) - length), length))
        for ngram, count in _bleu_ngrams(tokens, max_order).items():
            total[len(ngram) - 1] += count
            correct[len(ngram) - 1] += min(count, ref_ngrams[ngram])

    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    score = 0.0
    if any(correct):
        smooth = 1.0
        for n in range(max_order):
            if total[n] == 0:
                break
            if correct[n] == 0:
                smooth *= 2
                precisions[n] = 100.0 / (smooth * total[n])
            else:
                precisions[n] = 100.0 * correct[n] / total[n]
        # sacrebleu floors log(0) at -9999999999 (an order with no n-gram at all makes BLEU 0)
        score = bp * math.exp(sum([math.log(p) if p != 0.0 else -9999999999 for p in precisions]) / max_order)
    return {
        "score": score,
        "counts": correct,
        "totals": total,
        "precisions": precisions,
        "bp": bp,
        "sys_len": sys_len,
        "ref_len": ref_len,
        "ratio": sys_len / ref_len if ref_len else 0.0,
    }


# ---------------------------------------------------------------------------------------------------
# Relation extraction / classification: micro-F1 without the "no relation" label
# ---------------------------------------------------------------------------------------------------


def relation_f1(true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable], no_relation: Hashable) -> dict:
    """Precision/recall/F1 of relation labels with ``no_relation`` treated as the negative class.

    The TACRED convention (``tacred/scorer.py``; also scikit-learn's ``precision_recall_fscore_support(
    labels=<every label but no_relation>, average="micro")``): a prediction is a positive when it is
    not ``no_relation``; a reference is a positive when it is not ``no_relation``; a positive prediction
    is correct when it equals the reference. ``precision`` = correct / positive predictions, ``recall`` =
    correct / positive references, ``f1`` their harmonic mean; fractions 0..1, 0/0 counted as 0 (the
    TACRED script instead reports precision 1.0 when nothing is predicted positive; F1 is the same).

    Also: ``precision_macro``/``recall_macro``/``f1_macro`` (unweighted mean over the relation labels
    seen in references or predictions; NaN if none; the mean of per-label F1, not the SemEval-2010
    task 8 official score, which merges directions and excludes Other), ``support`` (positive
    references), and ``per_relation``: ``{label: {precision, recall, f1, support}}``, sorted by label.
    """
    if len(true_labels) != len(pred_labels):
        raise ValueError(f"{len(true_labels)} reference labels but {len(pred_labels)} predicted labels")
    correct: collections.Counter = collections.Counter()
    guessed: collections.Counter = collections.Counter()
    gold: collections.Counter = collections.Counter()
    for true, pred in zip(true_labels, pred_labels):
        if pred != no_relation:
            guessed[pred] += 1
        if true != no_relation:
            gold[true] += 1
            if pred == true:
                correct[true] += 1
    labels = sorted((set(gold) | set(guessed)), key=lambda label: (str(type(label)), label))
    c = np.array([correct[label] for label in labels], dtype=np.int64)
    g = np.array([guessed[label] for label in labels], dtype=np.int64)
    s = np.array([gold[label] for label in labels], dtype=np.int64)
    micro = [float(a[0]) for a in _prf(c.sum(keepdims=True), g.sum(keepdims=True), s.sum(keepdims=True))]
    precision, recall, f1 = _prf(c, g, s)
    result = {"precision": micro[0], "recall": micro[1], "f1": micro[2], "support": int(s.sum())}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_macro"] = float(np.mean(values)) if labels else float("nan")
    result["per_relation"] = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(s[i])}
        for i, label in enumerate(labels)
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """Perplexity ``exp(total_nll / total_tokens)``.

    ``total_nll`` is the summed negative log-likelihood, in nats (natural log, what
    ``torch.nn.functional.cross_entropy(..., reduction="sum")`` returns), over ``total_tokens`` predicted
    tokens; sum both over the whole evaluation set (and over ranks) before calling, so that the result is
    the exponential of the per-token mean, not a mean of per-batch perplexities. No tokens gives NaN;
    a mean beyond what a float can exponentiate gives ``inf``.
    """
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
    if total_tokens == 0:
        return float("nan")
    mean = float(total_nll) / total_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return float("inf")
