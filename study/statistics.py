"""Weighted classification metrics and the patient-level bootstrap behind the study's confidence intervals.

The metrics are the ones of `metrics/rmt_classification` (accuracy, precision, sensitivity,
specificity, ROC-AUC; one-vs-rest macro averages for more than two classes, NaN where a ratio has a
zero denominator). Here they take a `(B, N)` matrix of sample weights and return `B` values at once,
so a whole bootstrap is a few matrix products. With all weights 1 they equal the evaluate metric
(tested in tests/test_study.py).

The bootstrap resamples patients (a cluster bootstrap): each replicate draws as many patients as the
test split has, with replacement, and a sample weighs as often as its patient was drawn. Samples of one patient are
correlated, so resampling rows would make the intervals too narrow.
"""

from collections.abc import Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "precision", "sensitivity", "specificity", "roc_auc")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Return numerator / denominator elementwise, NaN where the denominator is 0."""
    result = np.full(np.shape(denominator), np.nan)
    np.divide(numerator, denominator, out=result, where=denominator > 0)
    return result


def weighted_roc_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Return the `(B,)` ROC-AUC of `scores` (N,) for the bool targets `positive` (N,) under `(B, N)` weights.

    It is the weighted Mann-Whitney statistic: the chance that a positive outscores a negative, with
    ties counted as one half, which equals the trapezoidal area under the ROC curve. NaN where a
    replicate has no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    sorted_weights = weights[:, order]
    is_positive = positive[order]
    positive_by_score = np.add.reduceat(sorted_weights * is_positive, starts, axis=1)
    negative_by_score = np.add.reduceat(sorted_weights * ~is_positive, starts, axis=1)

    positive_total = positive_by_score.sum(axis=1)
    negative_total = negative_by_score.sum(axis=1)
    # Positive weight strictly above each distinct score value (scores ascend along axis 1).
    positive_above = positive_total[:, None] - np.cumsum(positive_by_score, axis=1)
    concordant = (negative_by_score * (positive_above + 0.5 * positive_by_score)).sum(axis=1)
    return _ratio(concordant, positive_total * negative_total)


def _one_vs_rest_scores(
    class_scores: np.ndarray, predicted: np.ndarray, actual: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Return `(B,)` precision, sensitivity, specificity and ROC-AUC of one class against the rest."""
    true_positives = weights @ (predicted & actual)
    false_positives = weights @ (predicted & ~actual)
    false_negatives = weights @ (~predicted & actual)
    true_negatives = weights @ (~predicted & ~actual)
    return {
        "precision": _ratio(true_positives, true_positives + false_positives),
        "sensitivity": _ratio(true_positives, true_positives + false_negatives),
        "specificity": _ratio(true_negatives, true_negatives + false_positives),
        "roc_auc": weighted_roc_auc(class_scores, actual, weights),
    }


def _nanmean_rows(values: list[np.ndarray]) -> np.ndarray:
    """Average `(B,)` arrays elementwise, skipping NaN; NaN where every array is NaN."""
    stacked = np.stack(values)
    finite = np.isfinite(stacked)
    return _ratio(np.where(finite, stacked, 0.0).sum(axis=0), finite.sum(axis=0))


def weighted_scores(
    probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray, pos_label: int
) -> dict[str, np.ndarray]:
    """Return each metric in `METRIC_NAMES` as a `(B,)` array, one value per row of `weights`.

    Args:
        probabilities: `(N, C)` class probabilities; the predicted class is their argmax.
        labels: `(N,)` true class ids.
        weights: `(B, N)` non-negative sample weights (bootstrap counts), or `(N,)` for one evaluation.
        pos_label: positive class for two classes; ignored for more.
    """
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    predictions = probabilities.argmax(axis=1)
    num_classes = probabilities.shape[1]
    accuracy = _ratio(weights @ (predictions == labels), weights.sum(axis=1))

    if num_classes == 2:
        scores = _one_vs_rest_scores(
            probabilities[:, pos_label], predictions == pos_label, labels == pos_label, weights
        )
        return {"accuracy": accuracy, **scores}

    per_class = [
        _one_vs_rest_scores(probabilities[:, label], predictions == label, labels == label, weights)
        for label in range(num_classes)
    ]
    scores = {name: _nanmean_rows([entry[name] for entry in per_class]) for name in per_class[0]}
    # Like the evaluate metric, macro ROC-AUC needs at least two classes among the weighted samples.
    classes_present = np.stack([weights @ (labels == label) > 0 for label in range(num_classes)]).sum(axis=0)
    scores["roc_auc"] = np.where(classes_present >= 2, scores["roc_auc"], np.nan)
    return {"accuracy": accuracy, **scores}


def cluster_bootstrap_weights(groups: Sequence[str], num_resamples: int, seed: int) -> np.ndarray:
    """Return `(num_resamples, N)` sample weights of a bootstrap that resamples groups (patients), not rows.

    Each replicate draws G groups with replacement from the G distinct values of `groups`, and every
    sample gets the number of times its group was drawn, so all samples of a group share one weight.
    """
    unique_groups, group_of_sample = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    num_groups = len(unique_groups)
    draws = np.random.default_rng(seed).integers(0, num_groups, size=(num_resamples, num_groups))
    offsets = (np.arange(num_resamples) * num_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=num_resamples * num_groups)
    return counts.reshape(num_resamples, num_groups)[:, group_of_sample]


def percentile_interval(values: np.ndarray, confidence_level: float) -> list[float] | None:
    """Return the percentile interval `[low, high]` of the finite bootstrap values, or None if none is finite.

    NOTE: replicates where a metric is undefined (for example ROC-AUC with a single class drawn) are
    dropped, which narrows the interval slightly when they are frequent.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = (1.0 - confidence_level) / 2.0
    return [float(np.quantile(finite, tail)), float(np.quantile(finite, 1.0 - tail))]


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (ddof=1) of the finite values; NaN when undefined."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    mean = float(finite.mean()) if finite.size else float("nan")
    sd = float(finite.std(ddof=1)) if finite.size >= 2 else float("nan")
    return mean, sd
