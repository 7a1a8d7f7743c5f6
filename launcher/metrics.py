"""Evaluation metrics behind one small interface, computed by the field's own libraries.

Every function here takes whole-split predictions and references (gathered across ranks and
de-duplicated by the engine, scored once on rank 0) and returns plain Python numbers (and nested
per-class tables), ready for JSON:

=====================  ===================================================================  ============
function               computed by                                                          scale
=====================  ===================================================================  ============
classification         scikit-learn (``zero_division=0``)                                   0..1
entity_scores          seqeval, default (conlleval) mode                                    0..1
rouge_scores           rouge-score's ``RougeScorer``, mean F-measure over examples          0..1
bleu_score             ``sacrebleu.corpus_bleu`` defaults (13a, exp smoothing, order 4)     0..100
relation_f1            scikit-learn micro/macro P/R/F1 over every label but no-relation     0..1
squad_scores           :mod:`launcher.squad` (own port of the official scripts)             0..1
perplexity             exp of the mean token negative log-likelihood                        >= 1
=====================  ===================================================================  ============

All of them run offline. The libraries are imported inside the functions: recipe validation imports
this module (``check_metric_names``) and must not pay for scikit-learn. ``evaluate:NAME`` wraps a
Hugging Face ``evaluate`` metric for users with network access (its scripts live on the Hub).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Hashable, Sequence

import numpy as np

from .errors import LauncherError
from .squad import squad_scores  # noqa: F401  (part of this interface: tasks import it from here)

MetricFn = Callable[[Sequence[int], Sequence[int], Sequence[str]], dict]
NAN = float("nan")

# ---------------------------------------------------------------------------------------------------
# Classification: label ids, names in id order
# ---------------------------------------------------------------------------------------------------


def accuracy(predictions, references, label_names) -> dict:
    from sklearn.metrics import accuracy_score

    if len(references) == 0:  # scikit-learn refuses empty input
        return {"accuracy": NAN}
    return {"accuracy": float(accuracy_score(references, predictions))}


def _averaged(kind: str) -> MetricFn:
    index = ("precision", "recall", "f1").index(kind)

    def metric(predictions, references, label_names) -> dict:
        from sklearn.metrics import precision_recall_fscore_support

        if len(references) == 0:
            return {f"{kind}_macro": NAN, f"{kind}_weighted": NAN}
        # Without labels=, scikit-learn averages over the classes present in references or predictions.
        return {
            f"{kind}_{average}": float(precision_recall_fscore_support(
                references, predictions, average=average, zero_division=0)[index])
            for average in ("macro", "weighted")
        }

    metric.__name__ = kind
    return metric


def classification_report(predictions, references, label_names) -> dict:
    """Per-class precision/recall/F1/support over every label name, and the confusion matrix
    (``matrix[true][predicted]``, rows and columns in label-id order)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    ids = list(range(len(label_names)))
    if len(references) == 0:
        zeros = [0.0] * len(ids)
        precision = recall = f1 = support = zeros
        matrix = [[0] * len(ids) for _ in ids]
    else:
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=ids, average=None, zero_division=0)
        with warnings.catch_warnings():  # it warns on a 1x1 matrix even when labels= gives the one label
            warnings.filterwarnings("ignore", message="A single label was found")
            matrix = confusion_matrix(references, predictions, labels=ids).tolist()
    per_class = {
        str(name): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
        for i, name in enumerate(label_names)
    }
    return {"per_class": per_class, "confusion_matrix": matrix}


CLASSIFICATION_METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "precision": _averaged("precision"),
    "recall": _averaged("recall"),
    "f1": _averaged("f1"),
}

# The scalar keys each metric name produces (what evaluation.best_metric may name).
CLASSIFICATION_KEYS = {
    "accuracy": ["accuracy"],
    "precision": ["precision_macro", "precision_weighted"],
    "recall": ["recall_macro", "recall_weighted"],
    "f1": ["f1_macro", "f1_weighted"],
}


def check_metric_names(names: list[str], best_metric: str | None, available: dict[str, list[str]]) -> None:
    """Validate evaluation.metrics / evaluation.best_metric against what a task offers.

    Raises ValueError (inside recipe validation it becomes a RecipeError naming the file)."""
    import difflib

    for index, name in enumerate(names):
        if name.startswith("evaluate:"):
            continue
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(
                f"evaluation.metrics[{index}]: unknown metric {name!r}{hint} "
                f"(available: {', '.join(available)}, or evaluate:NAME for a Hub metric)"
            )
    if best_metric is None:
        return
    keys = ["loss"] + [key for name in names for key in available.get(name, [])]
    keys += [name.split(":", 1)[1] for name in names if name.startswith("evaluate:")]
    if best_metric not in keys:
        # "f1" means one of its averages; otherwise fall back to spelling similarity.
        close = [k for k in keys if k.startswith(best_metric + "_")] or difflib.get_close_matches(best_metric, keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ValueError(
            f"evaluation.best_metric: {best_metric!r} is not produced by evaluation.metrics{hint} "
            f"(choose one of: {', '.join(keys)})"
        )


def hub_metric(name: str) -> MetricFn:
    """A Hugging Face `evaluate` metric (needs network the first time)."""

    def metric(predictions, references, label_names) -> dict:
        import evaluate

        try:
            loaded = evaluate.load(name)
        except Exception as exc:  # evaluate raises many kinds (ConnectionError, FileNotFoundError...)
            raise LauncherError(
                f"evaluation.metrics: evaluate:{name} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); Hub metrics need network: use the offline "
                f"metrics (accuracy, precision, recall, f1) instead"
            ) from None
        result = loaded.compute(predictions=list(predictions), references=list(references))
        return {key: float(value) if np.isscalar(value) else value for key, value in result.items()}

    return metric


def compute_classification_metrics(names: list[str], predictions, references, label_names) -> dict:
    results: dict = {}
    for name in names:
        fn = hub_metric(name.split(":", 1)[1]) if name.startswith("evaluate:") else CLASSIFICATION_METRICS[name]
        results.update(fn(predictions, references, label_names))
    results.update(classification_report(predictions, references, label_names))
    return results


# ---------------------------------------------------------------------------------------------------
# Named entities: seqeval
# ---------------------------------------------------------------------------------------------------


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict:
    """Entity-level scores of tag sequences (one list of tags per sentence), by seqeval's default mode
    (conlleval chunking: IOB1, BIO and IOBES are read; an entity is right when type, first and last
    token match).

    Returns: ``precision``/``recall``/``f1`` (micro) and ``support`` (reference entities); the macro and
    weighted averages ``precision_macro`` ... ``f1_weighted`` (macro is NaN without any entity);
    ``accuracy`` (tag accuracy, NaN without tags); ``per_type`` ``{type: {precision, recall, f1,
    support}}`` sorted by type. Sentences of unequal lengths raise ValueError.
    """
    from seqeval.metrics import accuracy_score
    from seqeval.metrics import classification_report as seqeval_report

    true_tags, pred_tags = list(true_tags) or [[]], list(pred_tags) or [[]]  # seqeval refuses no sentence
    with warnings.catch_warnings():
        # seqeval warns about every tag without a B-/I-/E-/S- prefix (such tags are still chunked, as
        # conlleval does), numpy about the macro mean over no entity type (NaN is the answer).
        warnings.simplefilter("ignore")
        report = seqeval_report(true_tags, pred_tags, output_dict=True, zero_division=0)
        accuracy = float(accuracy_score(true_tags, pred_tags)) if any(true_tags) else NAN
    averages = {name: report.pop(f"{name} avg") for name in ("micro", "macro", "weighted")}
    result = {
        "precision": float(averages["micro"]["precision"]),
        "recall": float(averages["micro"]["recall"]),
        "f1": float(averages["micro"]["f1-score"]),
        "support": int(averages["micro"]["support"]),
    }
    for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
        for average in ("macro", "weighted"):
            result[f"{key}_{average}"] = float(averages[average][theirs])
    result["accuracy"] = accuracy
    result["per_type"] = {
        name: {"precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1-score"]),
               "support": int(row["support"])}
        for name, row in report.items()
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Generated text: rouge-score and sacrebleu
# ---------------------------------------------------------------------------------------------------


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    rouge_types: Sequence[str] = ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean over examples of rouge-score's per-example F-measure (``RougeScorer.score``, or
    ``score_multi`` - the best reference - when an example has a list of references).

    Plain mean, not the bootstrap median Hugging Face ``evaluate``'s ``rouge`` reports. rougeLsum reads
    sentences separated by ``"\\n"``. rouge-score keeps only ASCII letters and digits, so text without
    any (empty, or Chinese) scores 0. No example at all gives NaN for every type.
    """
    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_example = [
        scorer.score(reference, prediction) if isinstance(reference, str) else scorer.score_multi(reference, prediction)
        for prediction, reference in zip(predictions, references)
    ]
    if not per_example:
        return {rouge_type: NAN for rouge_type in rouge_types}
    return {rouge_type: sum(float(s[rouge_type].fmeasure) for s in per_example) / len(per_example)
            for rouge_type in rouge_types}


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus BLEU by ``sacrebleu.corpus_bleu`` with its defaults, on **sacrebleu's 0..100 scale** (a
    "BLEU of 0.27" reads as a different number everywhere else).

    ``references[i]`` lists the reference translations of ``predictions[i]`` (any number >= 1; this
    function transposes them into sacrebleu's reference streams). Returns ``score``, ``counts``/
    ``totals`` (matched/predicted n-grams per order), ``precisions`` (percent), ``bp`` (brevity
    penalty), ``sys_len``/``ref_len`` (tokens) and ``ratio`` = sys_len/ref_len. No example scores 0.
    """
    from sacrebleu import corpus_bleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:  # sacrebleu fails on an empty corpus
        return {"score": 0.0, "counts": [0] * 4, "totals": [0] * 4, "precisions": [0.0] * 4, "bp": 1.0,
                "sys_len": 0, "ref_len": 0, "ratio": 0.0}
    for index, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"example {index}: references must be a non-empty list of strings, got {refs!r}")
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = corpus_bleu(list(predictions), streams)
    return {"score": float(bleu.score), "counts": [int(c) for c in bleu.counts], "totals": [int(t) for t in bleu.totals],
            "precisions": [float(p) for p in bleu.precisions], "bp": float(bleu.bp), "sys_len": int(bleu.sys_len),
            "ref_len": int(bleu.ref_len), "ratio": float(bleu.ratio)}


# ---------------------------------------------------------------------------------------------------
# Relations: micro-F1 without the no-relation label
# ---------------------------------------------------------------------------------------------------


def relation_f1(true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable], no_relation: Hashable) -> dict:
    """Precision/recall/F1 with ``no_relation`` as the negative class (the TACRED convention): a positive
    prediction is right when it equals the reference. scikit-learn's ``precision_recall_fscore_support(
    labels=<every label seen but no_relation>, zero_division=0)``: ``precision``/``recall``/``f1``
    (micro), ``*_macro`` (unweighted mean over those labels; NaN if none), ``support`` (positive
    references) and ``per_relation`` ``{label: {precision, recall, f1, support}}`` sorted by label.
    """
    from sklearn.metrics import precision_recall_fscore_support

    if len(true_labels) != len(pred_labels):
        raise ValueError(f"{len(true_labels)} reference labels but {len(pred_labels)} predicted labels")
    relations = sorted((set(true_labels) | set(pred_labels)) - {no_relation})
    if not relations:  # nothing positive anywhere (scikit-learn also refuses empty input)
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "precision_macro": NAN,
                "recall_macro": NAN, "f1_macro": NAN, "per_relation": {}}

    def scores(average):
        return precision_recall_fscore_support(list(true_labels), list(pred_labels), labels=relations,
                                               average=average, zero_division=0)

    precision, recall, f1, support = scores(None)
    result = dict(zip(("precision", "recall", "f1"), (float(v) for v in scores("micro")[:3])))
    result["support"] = int(support.sum())
    result.update(zip(("precision_macro", "recall_macro", "f1_macro"), (float(v) for v in scores("macro")[:3])))
    result["per_relation"] = {
        label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i])}
        for i, label in enumerate(relations)
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Language modelling
# ---------------------------------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp(total_nll / total_tokens)``: own code, as it is one exponential of a mean.

    ``total_nll`` is the summed negative log-likelihood in nats over ``total_tokens`` predicted tokens,
    both summed over the whole split (and ranks) first: the exponential of the per-token mean, not a
    mean of per-batch perplexities. No tokens gives NaN; a mean too large to exponentiate gives inf.
    """
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
    if total_tokens == 0:
        return NAN
    try:
        return math.exp(float(total_nll) / total_tokens)
    except OverflowError:
        return float("inf")
