"""Offline metrics agree with scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from launcher.metrics import compute_classification_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a dev dependency (pip install -e .[dev])")


@pytest.mark.parametrize("num_labels, seed", [(2, 0), (3, 1), (5, 2)])
def test_matches_sklearn(num_labels, seed):
    rng = np.random.default_rng(seed)
    references = rng.integers(0, num_labels, 200)
    predictions = np.where(rng.random(200) < 0.6, references, rng.integers(0, num_labels, 200))
    names = [f"c{i}" for i in range(num_labels)]
    ours = compute_classification_metrics(["accuracy", "precision", "recall", "f1"], predictions, references, names)
    assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(references, predictions))
    for kind, fn in (("precision", sklearn_metrics.precision_score), ("recall", sklearn_metrics.recall_score),
                     ("f1", sklearn_metrics.f1_score)):
        for average in ("macro", "weighted"):
            expected = fn(references, predictions, average=average, zero_division=0)
            assert ours[f"{kind}_{average}"] == pytest.approx(expected), (kind, average)
    report = sklearn_metrics.classification_report(references, predictions, output_dict=True, zero_division=0)
    for i, name in enumerate(names):
        assert ours["per_class"][name]["f1"] == pytest.approx(report[str(i)]["f1-score"])
        assert ours["per_class"][name]["support"] == report[str(i)]["support"]
    assert np.array_equal(ours["confusion_matrix"], sklearn_metrics.confusion_matrix(references, predictions, labels=range(num_labels)))


def test_class_never_predicted_scores_zero_not_nan():
    ours = compute_classification_metrics(["precision", "f1"], [0, 0, 0, 0], [0, 0, 1, 1], ["a", "b"])
    assert ours["per_class"]["b"]["precision"] == 0.0
    assert ours["precision_macro"] == pytest.approx(0.25)


def test_hub_metric_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from launcher.errors import LauncherError

    with pytest.raises(LauncherError, match="evaluate:accuracy could not be loaded"):
        compute_classification_metrics(["evaluate:accuracy"], [0, 1], [0, 1], ["a", "b"])
