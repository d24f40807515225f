"""Markdown tables of the study: performance by input and model, task weights, the two robustness sweeps, runs."""

import math
from collections.abc import Sequence
from typing import Any

from study.analysis import INPUTS, RECORDED
from study.statistics import METRIC_NAMES

METRIC_TITLES = {
    "accuracy": "accuracy",
    "precision": "precision",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "roc_auc": "ROC-AUC",
}
SWEEP_TITLES = {"text": "Ablation under text absence", "image": "Ablation under image absence"}
SWEEP_METRICS = ("accuracy", "roc_auc")


def format_value(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_interval(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f" ({interval[0]:.2f}–{interval[1]:.2f})"


def format_share(share: float) -> str:
    return f"{100 * share:.0f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: int = 1) -> str:
    """Return a Markdown table whose first `text_columns` columns are left-aligned and the rest right-aligned."""
    alignment = ["---" if index < text_columns else "---:" for index in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(alignment) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def performance_table(results: dict[str, Any], runs: dict[str, dict[str, Any]], group: str = "models") -> str:
    """Return the test metrics of each model per input, with bootstrap intervals in brackets."""
    header = ["input", "model", "samples", "coverage"] + [METRIC_TITLES[name] for name in METRIC_NAMES]
    rows = []
    for input_name in INPUTS:
        for name, run in runs.items():
            entry = results["performance"].get(name, {}).get(input_name)
            if run["group"] != group or entry is None:
                continue
            cells = [
                format_value(entry["metrics"][metric]) + format_interval(entry.get("intervals", {}).get(metric))
                for metric in METRIC_NAMES
            ]
            rows.append([input_name, run["label"], entry["samples"], format_share(entry["coverage"]), *cells])
    return markdown_table(header, rows, text_columns=2)


def task_weight_table(results: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    """Return accuracy and ROC-AUC per input of the RMT runs that differ only in their task weights."""
    inputs = [name for name in INPUTS if name != RECORDED] + [RECORDED]
    header = ["run", "weights (image / text / multimodal)"]
    header += [f"{input_name} {METRIC_TITLES[metric]}" for input_name in inputs for metric in SWEEP_METRICS]
    rows = []
    for name, run in runs.items():
        if name != "rmt" and run["group"] != "task_weights":
            continue
        performance = results["performance"].get(name)
        if performance is None:
            continue
        weights = " / ".join(f"{weight:g}" for weight in run["task_weights"])
        cells = []
        for input_name in inputs:
            entry = performance.get(input_name)
            for metric in SWEEP_METRICS:
                cells.append(format_value(entry["metrics"][metric]) if entry else "n/a")
        rows.append([run["label"], weights, *cells])
    return markdown_table(header, rows, text_columns=2)


def sweep_table(results: dict[str, Any], runs: dict[str, dict[str, Any]], modality: str, metric: str) -> str:
    """Return mean ± sd over the repeats, with the bootstrap interval, per model and visibility rate."""
    sweep = results["sweeps"][modality]
    rates = list(next(iter(sweep["runs"].values()), {}).keys())
    header = ["model"] + [f"{float(rate) * 100:g} % {modality} visible" for rate in rates] + ["coverage"]
    rows = []
    for name, run in runs.items():
        scores = sweep["runs"].get(name)
        if run["group"] != "models" or scores is None:
            continue
        cells = []
        for rate in rates:
            summary = scores[rate]
            mean, sd = summary["mean"][metric], summary["sd"][metric]
            sd_text = "" if sd is None or math.isnan(sd) else f" ± {sd:.3f}"
            cells.append(format_value(mean) + sd_text + format_interval(summary["interval"][metric]))
        shares = [scores[rate]["coverage"] for rate in rates]
        coverage = "100 %" if all(share == 1.0 for share in shares) else " / ".join(format_share(s) for s in shares)
        rows.append([run["label"], *cells, coverage])
    return markdown_table(header, rows)


def validation_table(results: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    header = ["model", "samples", "coverage"] + [METRIC_TITLES[name] for name in METRIC_NAMES]
    rows = []
    for name, run in runs.items():
        entry = results["validation"].get(name, {}).get(RECORDED)
        if entry is None:
            continue
        cells = [format_value(entry["metrics"][metric]) for metric in METRIC_NAMES]
        rows.append([run["label"], entry["samples"], format_share(entry["coverage"]), *cells])
    return markdown_table(header, rows)


def runs_table(runs: dict[str, dict[str, Any]]) -> str:
    header = ["run", "model", "status", "error", "training samples", "seconds"]
    rows = []
    for name, run in runs.items():
        train = run.get("train") or {}
        error = (run.get("error") or "").replace("|", "\\|").replace("\n", " ")
        samples, seconds = train.get("samples", ""), train.get("seconds", "")
        rows.append([f"`{name}`", run["label"], run["status"], error, samples, seconds])
    return markdown_table(header, rows, text_columns=4)


def render_report(results: dict[str, Any]) -> str:
    """Return the whole Markdown report of a study's `results.json` content."""
    study = results["study"]
    runs = results["runs"]
    test = study["data"]["test"]
    level = f"{study['confidence_level']:.0%}"
    sections = [
        "# RMT study results",
        f"Preset `{study['preset']}`. Test split: {test['samples']} samples from {test['groups']} "
        f"{study['resampling_unit']}s ({test['patterns_text']}). Positive label: `{study['positive_label']}`. "
        f"Brackets give {level} bootstrap intervals from {study['bootstrap_samples']} replicates that resample "
        f"{study['resampling_unit']}s. A sample a model cannot read gets the training class frequencies as its "
        "probabilities. `coverage` is the share of samples the model read itself.",
        "## Performance by input and model",
        "`image` hides the text of every sample with an X-ray, `text` hides the X-ray of every sample with text, "
        "`image+text` takes the complete samples, `as recorded` every sample with the modalities it has.",
        performance_table(results, runs),
        "## Task weights",
        "RMT trained with different weights of the image, text and multimodal losses (test split).",
        task_weight_table(results, runs),
    ]
    for modality in ("text", "image"):
        sweep = results["sweeps"][modality]
        other = "image" if modality == "text" else "text"
        sections.append(f"## {SWEEP_TITLES[modality]}")
        sections.append(
            f"Only the {sweep['eligible_samples']} test samples with both modalities enter. Every {other} stays "
            f"present and the {modality} stays visible for round-half-up(rate × {sweep['eligible_samples']}) of them, "
            f"chosen by seed. Every model gets the same masks. Mean ± sd over {study['num_repeats']} seeds, with the "
            f"{level} bootstrap interval of the mean in brackets."
        )
        if not sweep["runs"]:
            sections.append("No test sample has both modalities, so this sweep is empty.")
            continue
        for metric in SWEEP_METRICS:
            sections.append(f"### {METRIC_TITLES[metric]}")
            sections.append(sweep_table(results, runs, modality, metric))
    if results["validation"]:
        sections += ["## Validation split, as recorded", validation_table(results, runs)]
    sections += ["## Runs", runs_table(runs)]
    return "\n\n".join(sections) + "\n"
