"""Classification metric for RMT: accuracy, precision, sensitivity, specificity and ROC-AUC.

The numbers come from scikit-learn. Sensitivity is recall of the positive class. Specificity is
recall of the negative class, TN / (TN + FP). For more than two classes every score except accuracy
is a macro average over the classes taken one-vs-rest.

evaluate 0.4.6 loads it offline from this folder's path (absolute, or relative to the repository root):

    import evaluate
    metric = evaluate.load("metrics/rmt_classification")
"""

import math

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score, roc_auc_score

_DESCRIPTION = """
Accuracy, precision, sensitivity (recall), specificity and ROC-AUC for a classifier, plus the
number of samples. With two classes the scores are taken for the class `pos_label`. With more
classes precision, sensitivity, specificity and ROC-AUC are macro averages of the one-vs-rest
scores of every class.

A ratio whose denominator is zero (for example precision when no sample is predicted positive) is
`zero_division`, NaN by default. A macro average skips NaN classes and is NaN only when every class
is NaN. ROC-AUC is NaN when the references contain a single class, because the ROC curve needs
positive and negative samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class id of each sample.
    references (`list[int]`): true class id of each sample.
    prediction_scores (`list[list[float]]` or `list[float]`): for each sample either the vector of
        class probabilities (shape (N, C)) or, with two classes only, the probability of class
        `pos_label` (shape (N,)). Any score that ranks samples works, since ROC-AUC only uses the order.
    pos_label (`int`, defaults to 1): class counted as positive when there are two classes. It is
        ignored for more than two classes.
    num_classes (`int`, *optional*): number of classes C. By default it is the width of
        `prediction_scores` (2 when the scores are one probability per sample), at least the largest
        class id plus one.
    zero_division (`float`, defaults to NaN): value of a ratio whose denominator is zero, passed to
        scikit-learn. Use 0.0 to count such classes as failures in the macro averages.

Returns:
    accuracy (`float`): fraction of samples with prediction equal to reference.
    precision (`float`): TP / (TP + FP).
    sensitivity (`float`): TP / (TP + FN), also called recall.
    specificity (`float`): TN / (TN + FP).
    roc_auc (`float`): area under the ROC curve, one-vs-rest for more than two classes. NaN when the
        references contain fewer than two classes.
    num_samples (`int`): number of samples scored.

Raises:
    ValueError: no samples, class ids outside [0, num_classes), or scores whose width does not match
        num_classes.

Examples:
    >>> metric = evaluate.load("metrics/rmt_classification")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0],
    ...                prediction_scores=[0.2, 0.9, 0.6, 0.1])
    {'accuracy': 0.75, 'precision': 0.5, 'sensitivity': 1.0, 'specificity': 0.666..., 'roc_auc': 1.0, 'num_samples': 4}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O.
          and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A.
          and Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def _infer_num_classes(predictions: np.ndarray, references: np.ndarray, scores: np.ndarray) -> int:
    """Return C: the width of (N, C) scores, 2 for (N,) scores, and at least the largest class id + 1."""
    score_classes = scores.shape[1] if scores.ndim == 2 else 2
    largest_label = int(max(predictions.max(), references.max()))
    return max(score_classes, largest_label + 1)


def _check_inputs(predictions: np.ndarray, references: np.ndarray, scores: np.ndarray, num_classes: int) -> None:
    """Raise ValueError unless ids lie in [0, num_classes) and the scores fit num_classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    for name, labels in (("predictions", predictions), ("references", references)):
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.size:
            raise ValueError(
                f"{name} contain class ids {sorted(set(outside.tolist()))} outside [0, {num_classes}). "
                "Pass num_classes if the model has more classes."
            )
    if scores.ndim == 1 and num_classes != 2:
        raise ValueError(
            f"prediction_scores has one score per sample, which is only defined for 2 classes, but there are "
            f"{num_classes} classes. Pass one probability vector of length {num_classes} per sample."
        )
    if scores.ndim == 2 and scores.shape[1] != num_classes:
        raise ValueError(
            f"prediction_scores rows have {scores.shape[1]} entries but there are {num_classes} classes."
        )


def _specificity(references: np.ndarray, predictions: np.ndarray, label: int, zero_division: float) -> float:
    """Return TN / (TN + FP) for class `label` against all other classes, or zero_division if TN + FP = 0."""
    is_label_true = references == label
    is_label_predicted = predictions == label
    true_negatives, false_positives, _, _ = confusion_matrix(
        is_label_true, is_label_predicted, labels=[False, True]
    ).ravel()
    negatives = true_negatives + false_positives
    if negatives == 0:
        return float(zero_division)
    return float(true_negatives / negatives)


def _roc_auc_one_vs_rest(references: np.ndarray, scores: np.ndarray, label: int) -> float:
    """Return ROC-AUC of class `label` against the rest, NaN when the references lack either side.

    `scores` has shape (N,) and contains the score of class `label` for each sample.
    """
    is_label_true = references == label
    if is_label_true.all() or not is_label_true.any():
        return math.nan
    return float(roc_auc_score(is_label_true, scores))


def _nanmean(values: list[float]) -> float:
    """Return the mean of the non-NaN values, or NaN if all are NaN (without numpy's warning)."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def _binary_scores(
    predictions: np.ndarray, references: np.ndarray, scores: np.ndarray, pos_label: int, zero_division: float
) -> dict[str, float]:
    """Score two classes with `pos_label` as the positive one. `scores` is (N,) or (N, 2)."""
    positive_scores = scores[:, pos_label] if scores.ndim == 2 else scores
    return {
        "precision": float(
            precision_score(references, predictions, pos_label=pos_label, average="binary", zero_division=zero_division)
        ),
        "sensitivity": float(
            recall_score(references, predictions, pos_label=pos_label, average="binary", zero_division=zero_division)
        ),
        "specificity": _specificity(references, predictions, pos_label, zero_division),
        "roc_auc": _roc_auc_one_vs_rest(references, positive_scores, pos_label),
    }


def _macro_scores(
    predictions: np.ndarray, references: np.ndarray, scores: np.ndarray, num_classes: int, zero_division: float
) -> dict[str, float]:
    """Macro-average one-vs-rest scores over classes 0..num_classes-1. `scores` is (N, num_classes).

    ROC-AUC averages the classes that occur in the references but not in all of them. With every
    class present this equals `roc_auc_score(..., multi_class="ovr", average="macro")`.
    """
    labels = list(range(num_classes))
    present_labels = set(references.tolist())
    if len(present_labels) < 2:
        roc_auc = math.nan
    else:
        roc_auc = _nanmean([_roc_auc_one_vs_rest(references, scores[:, label], label) for label in labels])
    return {
        "precision": float(
            precision_score(references, predictions, labels=labels, average="macro", zero_division=zero_division)
        ),
        "sensitivity": float(
            recall_score(references, predictions, labels=labels, average="macro", zero_division=zero_division)
        ),
        "specificity": _nanmean([_specificity(references, predictions, label, zero_division) for label in labels]),
        "roc_auc": roc_auc,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RmtClassification(evaluate.Metric):
    """Accuracy, precision, sensitivity, specificity and ROC-AUC of class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        int_label = datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # evaluate tries the schemas in order: a probability vector per sample, then one probability.
            features=[
                datasets.Features(
                    {
                        "predictions": int_label,
                        "references": int_label,
                        "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": int_label,
                        "references": int_label,
                        "prediction_scores": datasets.Value("float64"),
                    }
                ),
            ],
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch, raising ValueError for an empty one.

        evaluate 0.4.6 picks the input schema from the first sample and fails with IndexError on an
        empty batch, so the empty case is caught here with a clear message.
        """
        if predictions is not None and len(predictions) == 0:
            raise ValueError(
                "rmt_classification received zero samples: predictions, references and prediction_scores are empty."
            )
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        prediction_scores: list[list[float]] | list[float],
        pos_label: int = 1,
        num_classes: int | None = None,
        zero_division: float = math.nan,
    ) -> dict[str, float | int]:
        """Compute the scores described in the module docstring for N samples."""
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        scores = np.asarray(prediction_scores, dtype=np.float64)
        if predictions.size == 0:
            raise ValueError("rmt_classification received zero samples.")

        if num_classes is None:
            num_classes = _infer_num_classes(predictions, references, scores)
        _check_inputs(predictions, references, scores, num_classes)

        if num_classes == 2:
            if pos_label not in (0, 1):
                raise ValueError(f"pos_label must be 0 or 1 for two classes, got {pos_label}.")
            class_scores = _binary_scores(predictions, references, scores, pos_label, zero_division)
        else:
            class_scores = _macro_scores(predictions, references, scores, num_classes, zero_division)

        return {
            "accuracy": float(accuracy_score(references, predictions)),
            **class_scores,
            "num_samples": int(predictions.size),
        }
