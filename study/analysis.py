"""Scores of the finished runs: performance per input, robustness sweeps, bootstrap intervals.

Everything here works on the stored view predictions of each run (see study/runs.py), so it is cheap
and is recomputed on every invocation of the study, also when every run is reused.

A sample that a model cannot read (a text model shown only an X-ray, or an X-ray model shown only
text) gets the training split's class frequencies as its probabilities, so it is predicted as the most
frequent class. Such samples stay in every metric, and the model's coverage, the share of samples it
read itself, is reported beside it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from study.statistics import (
    METRIC_NAMES,
    cluster_bootstrap_weights,
    mean_and_sd,
    percentile_interval,
    weighted_scores,
)
from study.visibility import (
    VIEW_BOTH,
    VIEW_IMAGE,
    VIEW_TEXT,
    sweep_views,
    usable_view,
    visibility_mask,
)

# Test inputs of the performance table: the view each sample is shown, and which samples qualify.
RECORDED = "as recorded"
INPUTS = (VIEW_IMAGE, VIEW_TEXT, VIEW_BOTH, RECORDED)
SWEPT_MODALITIES = ("text", "image")
# Recorded modalities a sample needs to enter each input other than `as recorded`.
QUALIFYING_RECORDED_VIEWS = {
    VIEW_IMAGE: (VIEW_IMAGE, VIEW_BOTH),
    VIEW_TEXT: (VIEW_TEXT, VIEW_BOTH),
    VIEW_BOTH: (VIEW_BOTH,),
}


@dataclass
class EvaluationSettings:
    """Scoring settings of the test split."""

    visibility_rates: tuple[float, ...]
    num_repeats: int
    bootstrap_samples: int
    confidence_level: float
    seed: int
    pos_label: int
    num_labels: int


@dataclass
class EvaluationSplit:
    """Labels, recorded modalities and resampling groups of one split."""

    ids: list[str]
    labels: np.ndarray
    recorded_views: list[str]
    groups: list[str]

    @property
    def complete_samples(self) -> list[int]:
        """Indices of the samples that have both an image and text: the ones the sweeps use."""
        return [index for index, view in enumerate(self.recorded_views) if view == VIEW_BOTH]


def input_samples(split: EvaluationSplit, input_name: str) -> tuple[list[int], list[str]]:
    """Return the sample indices of a test input and the view each one is shown.

    `image` takes every sample with an X-ray and hides its text, `text` every sample with text and
    hides its X-ray, `image+text` the complete samples, and `as recorded` every sample as it was recorded.
    """
    if input_name == RECORDED:
        return list(range(len(split.ids))), list(split.recorded_views)
    qualifying = QUALIFYING_RECORDED_VIEWS[input_name]
    indices = [index for index, view in enumerate(split.recorded_views) if view in qualifying]
    return indices, [input_name] * len(indices)


def assemble_probabilities(
    record: dict[str, Any], split: str, indices: Sequence[int], views: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(n, C)` probabilities of the run for samples `indices` shown `views`, and which ones it read itself.

    Raises KeyError when the run has no stored prediction for a view it can use, which means its
    predictions were made for another split file.
    """
    input_modalities = tuple(record["spec"]["input_modalities"])
    stored = record["splits"][split]["views"]
    prior = np.asarray(record["prior"], dtype=np.float64)
    probabilities = np.tile(prior, (len(indices), 1))
    covered = np.zeros(len(indices), dtype=bool)
    for row, (index, view) in enumerate(zip(indices, views)):
        used = usable_view(view, input_modalities)
        if used is None:
            continue
        column = stored.get(used)
        values = column[index] if column is not None else None
        if values is None:
            raise KeyError(
                f"Run {record['spec']['name']} has no {split} prediction for sample {index} in view {used!r}. "
                "Its predictions were made for another split file: delete its runs/ folder to redo it."
            )
        probabilities[row] = values
        covered[row] = True
    return probabilities, covered


def model_reads_input(record: dict[str, Any], input_name: str) -> bool:
    """Return True when the model uses every modality of the input (always True for `as recorded`)."""
    return input_name == RECORDED or usable_view(input_name, tuple(record["spec"]["input_modalities"])) == input_name


def point_scores(metric, probabilities: np.ndarray, labels: np.ndarray, pos_label: int) -> dict[str, float]:
    """Score with the project's evaluate metric (`metrics/rmt_classification`)."""
    scores = metric.compute(
        predictions=probabilities.argmax(axis=1),
        references=labels,
        prediction_scores=probabilities,
        pos_label=pos_label,
    )
    return {name: float(scores[name]) for name in METRIC_NAMES}


def intervals_from_replicates(
    replicates: dict[str, np.ndarray], confidence_level: float
) -> dict[str, list[float] | None]:
    return {name: percentile_interval(values, confidence_level) for name, values in replicates.items()}


def score_inputs(
    record: dict[str, Any],
    split: EvaluationSplit,
    split_name: str,
    settings: EvaluationSettings,
    metric,
    bootstrap_weights: np.ndarray | None,
    inputs: Sequence[str] = INPUTS,
) -> dict[str, dict[str, Any]]:
    """Score one run on each input it reads; intervals only when `bootstrap_weights` (B, N) are given."""
    results = {}
    for input_name in inputs:
        if not model_reads_input(record, input_name):
            continue
        indices, views = input_samples(split, input_name)
        if not indices:
            continue
        probabilities, covered = assemble_probabilities(record, split_name, indices, views)
        labels = split.labels[indices]
        entry = {
            "samples": len(indices),
            "coverage": float(covered.mean()),
            "metrics": point_scores(metric, probabilities, labels, settings.pos_label),
        }
        if bootstrap_weights is not None:
            replicates = weighted_scores(probabilities, labels, bootstrap_weights[:, indices], settings.pos_label)
            entry["intervals"] = intervals_from_replicates(replicates, settings.confidence_level)
        results[input_name] = entry
    return results


def sweep_masks(num_samples: int, settings: EvaluationSettings, modality: str) -> dict[float, list[np.ndarray]]:
    """Return `{rate: [mask of each repeat]}`; repeat r uses seed `settings.seed + r` for every model."""
    return {
        rate: [
            visibility_mask(num_samples, rate, settings.seed + repeat, modality)
            for repeat in range(settings.num_repeats)
        ]
        for rate in settings.visibility_rates
    }


def score_sweep(
    record: dict[str, Any],
    split: EvaluationSplit,
    masks: dict[float, list[np.ndarray]],
    modality: str,
    settings: EvaluationSettings,
    bootstrap_weights: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Score one run on one sweep: mean and sd over the repeats, and a bootstrap interval of their mean.

    Each bootstrap replicate reweights the same patients in every repeat, and the interval is taken
    over the replicates' mean across repeats.
    """
    eligible = split.complete_samples
    labels = split.labels[eligible]
    weights = bootstrap_weights[:, eligible]
    results = {}
    for rate, rate_masks in masks.items():
        per_repeat = {name: [] for name in METRIC_NAMES}
        replicate_sums = {name: np.zeros(weights.shape[0]) for name in METRIC_NAMES}
        replicate_counts = {name: np.zeros(weights.shape[0]) for name in METRIC_NAMES}
        coverages = []
        for mask in rate_masks:
            probabilities, covered = assemble_probabilities(record, "test", eligible, sweep_views(mask, modality))
            coverages.append(float(covered.mean()))
            scores = weighted_scores(probabilities, labels, np.ones(len(eligible)), settings.pos_label)
            replicates = weighted_scores(probabilities, labels, weights, settings.pos_label)
            for name in METRIC_NAMES:
                per_repeat[name].append(float(scores[name][0]))
                finite = np.isfinite(replicates[name])
                replicate_sums[name] += np.where(finite, replicates[name], 0.0)
                replicate_counts[name] += finite

        summary = {"mean": {}, "sd": {}, "interval": {}, "per_repeat": per_repeat}
        for name in METRIC_NAMES:
            summary["mean"][name], summary["sd"][name] = mean_and_sd(per_repeat[name])
            replicate_means = np.full(weights.shape[0], np.nan)
            counts = replicate_counts[name]
            np.divide(replicate_sums[name], counts, out=replicate_means, where=counts > 0)
            summary["interval"][name] = percentile_interval(replicate_means, settings.confidence_level)
        summary["coverage"] = float(np.mean(coverages))
        results[f"{rate:g}"] = summary
    return results


def analyze(
    records: dict[str, dict[str, Any]],
    splits: dict[str, EvaluationSplit],
    settings: EvaluationSettings,
    metric,
) -> dict[str, Any]:
    """Return performance, validation, sweep and mask results for every finished run."""
    test = splits["test"]
    bootstrap_weights = cluster_bootstrap_weights(test.groups, settings.bootstrap_samples, settings.seed)
    eligible = test.complete_samples
    results: dict[str, Any] = {"performance": {}, "validation": {}, "sweeps": {}}

    for name, record in records.items():
        results["performance"][name] = score_inputs(record, test, "test", settings, metric, bootstrap_weights)
        if "validation" in splits and "validation" in record["splits"]:
            results["validation"][name] = score_inputs(
                record, splits["validation"], "validation", settings, metric, None, inputs=(RECORDED,)
            )

    for modality in SWEPT_MODALITIES:
        sweep: dict[str, Any] = {"eligible_samples": len(eligible), "visible_ids": {}, "runs": {}}
        if not eligible:
            results["sweeps"][modality] = sweep
            continue
        masks = sweep_masks(len(eligible), settings, modality)
        for rate, rate_masks in masks.items():
            sweep["visible_ids"][f"{rate:g}"] = [
                [test.ids[index] for index, visible in zip(eligible, mask) if visible] for mask in rate_masks
            ]
        for name, record in records.items():
            sweep["runs"][name] = score_sweep(record, test, masks, modality, settings, bootstrap_weights)
        results["sweeps"][modality] = sweep
    return results
