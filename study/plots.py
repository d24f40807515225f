"""PNG plots of the study: accuracy against visibility for each sweep, and test ROC curves per input."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from study.analysis import (  # noqa: E402
    EvaluationSplit,
    assemble_probabilities,
    input_samples,
    model_reads_input,
)
from study.visibility import VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT  # noqa: E402

ROC_INPUTS = (VIEW_IMAGE, VIEW_TEXT, VIEW_BOTH)
# Distinct markers keep models with identical accuracies apart where their lines overlap.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")


def model_styles(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Return a color and a marker per model of the comparison, the same in every plot."""
    colors = plt.get_cmap("tab10").colors
    names = [name for name, run in runs.items() if run["group"] == "models"]
    return {
        name: {"color": colors[index % len(colors)], "marker": MARKERS[index % len(MARKERS)]}
        for index, name in enumerate(names)
    }


def plot_sweep(results: dict[str, Any], runs: dict[str, dict[str, Any]], modality: str, path: Path) -> bool:
    """Draw mean test accuracy (± sd over the seeds) against the visibility rate; return False if there is no data."""
    sweep = results["sweeps"][modality]
    if not sweep["runs"]:
        return False

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = model_styles(runs)
    for name, scores in sweep["runs"].items():
        run = runs[name]
        if run["group"] != "models":
            continue

        rates = [float(rate) for rate in scores]
        means = [scores[rate]["mean"]["accuracy"] for rate in scores]
        sds = [scores[rate]["sd"]["accuracy"] for rate in scores]
        sds = [0.0 if sd is None or np.isnan(sd) else sd for sd in sds]
        # Models that cannot read both modalities are dashed: some of their predictions are class frequencies.
        style = "-" if tuple(run["input_modalities"]) == ("image", "text") else "--"
        axes.errorbar(
            [100 * rate for rate in rates],
            means,
            yerr=sds,
            linestyle=style,
            capsize=3,
            **styles[name],
            label=run["label"],
        )

    other = "image" if modality == "text" else "text"
    axes.set_xlabel(f"{modality} visible (% of the {sweep['eligible_samples']} complete test samples)")
    axes.set_ylabel("test accuracy (mean ± sd over seeds)")
    axes.set_title(f"Accuracy as the {modality} goes missing (every {other} present)")
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True


def plot_roc_curves(
    results: dict[str, Any],
    records: dict[str, dict[str, Any]],
    runs: dict[str, dict[str, Any]],
    test: EvaluationSplit,
    pos_label: int,
    path: Path,
) -> None:
    """Draw the test ROC curves of the positive class, one panel per input, one curve per model that reads it."""
    figure, panels = plt.subplots(1, len(ROC_INPUTS), figsize=(15, 5), sharey=True)
    styles = model_styles(runs)
    for axes, input_name in zip(panels, ROC_INPUTS):
        indices, views = input_samples(test, input_name)
        positive = test.labels[indices] == pos_label
        for name, record in records.items():
            if runs[name]["group"] != "models" or not model_reads_input(record, input_name):
                continue
            if not indices or positive.all() or not positive.any():
                continue
            probabilities, _ = assemble_probabilities(record, "test", indices, views)
            false_positive_rate, true_positive_rate, _ = roc_curve(positive, probabilities[:, pos_label])
            auc = results["performance"][name][input_name]["metrics"]["roc_auc"]
            axes.plot(
                false_positive_rate,
                true_positive_rate,
                color=styles[name]["color"],
                label=f"{runs[name]['label']} ({auc:.2f})",
            )
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set_title(f"{input_name} input ({len(indices)} samples)")
        axes.set_xlabel("false positive rate (1 - specificity)")
        axes.set_aspect("equal")
        axes.grid(alpha=0.3)
        axes.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            fontsize="x-small",
            title="model (ROC-AUC)",
            title_fontsize="x-small",
        )
    panels[0].set_ylabel("true positive rate (sensitivity)")
    figure.suptitle("Test ROC curves of the positive class")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
