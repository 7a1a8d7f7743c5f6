"""Offline metrics behind one interface.

A metric is a function ``(predictions, references, label_names) -> dict`` of numbers (and nested
per-class tables). They are computed once, on rank 0, over the gathered and de-duplicated
per-example predictions. ``evaluate:NAME`` wraps a Hugging Face ``evaluate`` metric for users with
network access (its scripts live on the Hub, so it cannot load offline).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import LauncherError

MetricFn = Callable[[Sequence[int], Sequence[int], Sequence[str]], dict]


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> np.ndarray:
    """matrix[true, predicted] = count."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(references, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or never present) has precision (recall) 0, as in scikit-learn's
    # zero_division=0: an undefined score must not inflate the macro average.
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_scores(predictions, references, label_names) -> dict:
    matrix = confusion_matrix(predictions, references, len(label_names))
    true_pos = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = _safe_div(true_pos, predicted)
    recall = _safe_div(true_pos, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {
        "matrix": matrix,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
    }


def accuracy(predictions, references, label_names) -> dict:
    predictions, references = np.asarray(predictions), np.asarray(references)
    if len(references) == 0:
        return {"accuracy": float("nan")}
    return {"accuracy": float((predictions == references).mean())}


def _averaged(kind: str) -> MetricFn:
    def metric(predictions, references, label_names) -> dict:
        scores = per_class_scores(predictions, references, label_names)
        values, support = scores[kind], scores["support"]
        # Macro averages over the classes that occur in the references or the predictions
        # (scikit-learn's label set when labels= is not given).
        present = (support > 0) | (scores["matrix"].sum(axis=0) > 0)
        macro = float(values[present].mean()) if present.any() else float("nan")
        weighted = float((values * support).sum() / support.sum()) if support.sum() else float("nan")
        return {f"{kind}_macro": macro, f"{kind}_weighted": weighted}

    metric.__name__ = kind
    return metric


def classification_report(predictions, references, label_names) -> dict:
    """Per-class precision/recall/F1/support and the confusion matrix (rows = true labels)."""
    scores = per_class_scores(predictions, references, label_names)
    per_class = {
        str(name): {
            "precision": float(scores["precision"][i]),
            "recall": float(scores["recall"][i]),
            "f1": float(scores["f1"][i]),
            "support": int(scores["support"][i]),
        }
        for i, name in enumerate(label_names)
    }
    return {"per_class": per_class, "confusion_matrix": scores["matrix"].tolist()}


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
