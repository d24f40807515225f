"""Tests for the local evaluate metric metrics/rmt_classification."""

import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "rmt_classification"

# Binary case with TP = 3, FN = 1, FP = 2, TN = 4 for positive class 1.
BINARY_REFERENCES = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
BINARY_PREDICTIONS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
# Positive-class probabilities: 22 of the 24 (positive, negative) pairs are ranked correctly.
BINARY_SCORES = [0.9, 0.8, 0.7, 0.3, 0.6, 0.55, 0.2, 0.1, 0.1, 0.05]

# Three classes. Per class (TP, FP, FN, TN): 0 -> (1, 1, 1, 3), 1 -> (2, 1, 0, 3), 2 -> (1, 0, 1, 4).
MULTICLASS_REFERENCES = [0, 0, 1, 1, 2, 2]
MULTICLASS_PREDICTIONS = [0, 1, 1, 1, 2, 0]
MULTICLASS_SCORES = [
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.7, 0.1],
    [0.1, 0.1, 0.8],
    [0.5, 0.1, 0.4],
]


@pytest.fixture(scope="module")
def metric() -> evaluate.Metric:
    return evaluate.load(str(METRIC_DIR))


def test_load_from_script_path():
    loaded = evaluate.load(str(METRIC_DIR / "rmt_classification.py"))

    assert loaded.name == "rmt_classification"


def test_binary_hand_computed(metric):
    result = metric.compute(
        predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES, prediction_scores=BINARY_SCORES
    )

    assert result["accuracy"] == pytest.approx(7 / 10)
    assert result["precision"] == pytest.approx(3 / 5)
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert result["specificity"] == pytest.approx(4 / 6)
    assert result["roc_auc"] == pytest.approx(22 / 24)
    assert result["num_samples"] == 10


def test_binary_pos_label_zero(metric):
    class_zero_scores = [1 - score for score in BINARY_SCORES]
    result = metric.compute(
        predictions=BINARY_PREDICTIONS,
        references=BINARY_REFERENCES,
        prediction_scores=class_zero_scores,
        pos_label=0,
    )

    assert result["precision"] == pytest.approx(4 / 5)
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["specificity"] == pytest.approx(3 / 4)
    assert result["roc_auc"] == pytest.approx(22 / 24)


def test_binary_probability_vectors_match_scalars(metric):
    vectors = [[1 - score, score] for score in BINARY_SCORES]
    from_vectors = metric.compute(
        predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES, prediction_scores=vectors
    )
    from_scalars = metric.compute(
        predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES, prediction_scores=BINARY_SCORES
    )

    assert from_vectors == from_scalars


def test_binary_perfect_predictions(metric):
    references = [0, 1, 1, 0, 1]
    result = metric.compute(
        predictions=references, references=references, prediction_scores=[0.1, 0.9, 0.8, 0.2, 0.7]
    )

    for name in ("accuracy", "precision", "sensitivity", "specificity", "roc_auc"):
        assert result[name] == 1.0, name


def test_single_class_roc_auc_nan(metric):
    result = metric.compute(predictions=[1, 1, 0], references=[1, 1, 1], prediction_scores=[0.9, 0.8, 0.4])

    assert math.isnan(result["roc_auc"])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["sensitivity"] == pytest.approx(2 / 3)


def test_single_class_specificity_nan(metric):
    result = metric.compute(predictions=[1, 1], references=[1, 1], prediction_scores=[0.9, 0.8])

    assert math.isnan(result["specificity"])


def test_no_positive_predictions_precision(metric):
    inputs = {"predictions": [0, 0, 0], "references": [1, 0, 0], "prediction_scores": [0.4, 0.3, 0.2]}

    assert math.isnan(metric.compute(**inputs)["precision"])
    assert metric.compute(**inputs, zero_division=0.0)["precision"] == 0.0


def test_zero_samples_raises(metric):
    with pytest.raises(ValueError, match="zero samples"):
        metric.compute(predictions=[], references=[], prediction_scores=[])


def test_multiclass_hand_computed(metric):
    result = metric.compute(
        predictions=MULTICLASS_PREDICTIONS, references=MULTICLASS_REFERENCES, prediction_scores=MULTICLASS_SCORES
    )

    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["sensitivity"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert result["specificity"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3)
    assert result["num_samples"] == 6


def test_multiclass_roc_auc_matches_sklearn(metric):
    result = metric.compute(
        predictions=MULTICLASS_PREDICTIONS, references=MULTICLASS_REFERENCES, prediction_scores=MULTICLASS_SCORES
    )
    expected = roc_auc_score(MULTICLASS_REFERENCES, MULTICLASS_SCORES, multi_class="ovr", average="macro")

    assert result["roc_auc"] == pytest.approx(expected)


def test_multiclass_absent_class_skipped_in_roc_auc(metric):
    references = [0, 0, 1, 1]
    scores = [[0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]]
    result = metric.compute(predictions=[0, 0, 1, 1], references=references, prediction_scores=scores)
    class_zero = roc_auc_score([1, 1, 0, 0], [row[0] for row in scores])
    class_one = roc_auc_score([0, 0, 1, 1], [row[1] for row in scores])

    assert result["roc_auc"] == pytest.approx((class_zero + class_one) / 2)


def test_multiclass_perfect_predictions(metric):
    references = [0, 1, 2, 2, 1, 0]
    scores = np.eye(3)[references].tolist()
    result = metric.compute(predictions=references, references=references, prediction_scores=scores)

    for name in ("accuracy", "precision", "sensitivity", "specificity", "roc_auc"):
        assert result[name] == 1.0, name


def test_class_id_out_of_range(metric):
    with pytest.raises(ValueError, match="outside"):
        metric.compute(predictions=[0, 3], references=[0, 1], prediction_scores=[[0.5, 0.5], [0.5, 0.5]], num_classes=2)


def test_scores_width_mismatch(metric):
    with pytest.raises(ValueError, match="3 classes"):
        metric.compute(predictions=[0, 1], references=[0, 1], prediction_scores=[[0.5, 0.5], [0.5, 0.5]], num_classes=3)


def test_scalar_scores_with_three_classes(metric):
    with pytest.raises(ValueError, match="only defined for 2 classes"):
        metric.compute(predictions=[0, 2], references=[0, 1], prediction_scores=[0.2, 0.7])


def test_add_batch_accumulates(metric):
    metric.add_batch(
        predictions=BINARY_PREDICTIONS[:4], references=BINARY_REFERENCES[:4], prediction_scores=BINARY_SCORES[:4]
    )
    metric.add_batch(
        predictions=BINARY_PREDICTIONS[4:], references=BINARY_REFERENCES[4:], prediction_scores=BINARY_SCORES[4:]
    )
    accumulated = metric.compute()
    at_once = metric.compute(
        predictions=BINARY_PREDICTIONS, references=BINARY_REFERENCES, prediction_scores=BINARY_SCORES
    )

    assert accumulated == at_once


@settings(max_examples=20, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=4, max_size=30).filter(
        lambda pairs: {reference for reference, _ in pairs} == {0, 1}
    )
)
def test_specificity_is_sensitivity_of_negative_class(metric, pairs):
    references = [reference for reference, _ in pairs]
    predictions = [prediction for _, prediction in pairs]
    scores = [float(prediction) for prediction in predictions]
    positive = metric.compute(predictions=predictions, references=references, prediction_scores=scores)
    negative = metric.compute(
        predictions=predictions,
        references=references,
        prediction_scores=[1 - score for score in scores],
        pos_label=0,
    )

    assert positive["specificity"] == pytest.approx(negative["sensitivity"])
    assert positive["roc_auc"] == pytest.approx(negative["roc_auc"])
