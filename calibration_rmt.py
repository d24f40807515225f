"""Temperature scaling of RMT's three heads and the expected calibration error (ECE).

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides the logits
of a trained classifier by one scalar T > 0 that minimizes the negative log-likelihood (NLL) on held-out
data. T > 1 softens overconfident probabilities, T < 1 sharpens underconfident ones, and the predicted
label never changes. RMT gets one temperature per head (image, text, multimodal), because each head
classifies different samples (image only, text only, both) and can be miscalibrated in its own way. The temperatures live in
`RMTConfig.temperatures` and the `image-text-classification` pipeline applies them.

ECE follows the same paper: samples are grouped into equal-width bins of confidence (the top-class
probability), and ECE is the sample-weighted mean of |accuracy - mean confidence| over the bins.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

HEADS = ("image", "text", "multimodal")
ECE_BINS = 15

# Clip range of the fitted T. On data that a head separates perfectly the NLL keeps falling as T -> 0,
# so the fit needs a floor. NOTE: both bounds are a chosen margin around 1, not derived from data.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


@dataclass
class HeadCalibration:
    """Fitted temperature of one head and its calibration on the data it was fitted on."""

    head: str
    temperature: float
    samples: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float


def _check_logits_and_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(N, C)` float64 logits and `(N,)` int64 labels as tensors, or raise ValueError naming the problem."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (samples, classes) with at least 2 classes, got {logits.shape}.")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match the logits, got {labels.shape}.")
    if logits.shape[0] == 0:
        raise ValueError("Calibration needs at least one sample, got none.")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values.")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"labels must be class ids in [0, {logits.shape[1]}), got values from {labels.min()} to {labels.max()}."
        )
    return torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.int64)


def softmax_with_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Return `softmax(logits / temperature)` of `(N, C)` logits as `(N, C)` float64 probabilities."""
    scaled = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return torch.softmax(scaled, dim=-1).numpy()


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS) -> float:
    """Return the ECE of `(N, C)` class probabilities against `(N,)` class ids, with `num_bins` equal-width bins.

    Bin b contains the samples whose confidence lies in (b / num_bins, (b + 1) / num_bins]. Empty bins add nothing.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0] or probabilities.shape[0] == 0:
        raise ValueError(
            f"Expected (N, C) probabilities and (N,) labels with N > 0, got {probabilities.shape} and {labels.shape}."
        )
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels

    # np.ceil maps (b / n, (b + 1) / n] to bin b. The clip keeps a confidence of exactly 0 in bin 0.
    bins = np.clip(np.ceil(confidences * num_bins).astype(int) - 1, 0, num_bins - 1)
    error = 0.0
    for index in range(num_bins):
        in_bin = bins == index
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidences[in_bin].mean())
            error += in_bin.mean() * gap
    return float(error)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Return the mean cross-entropy of `softmax(logits / temperature)` against the labels."""
    logits_tensor, labels_tensor = _check_logits_and_labels(logits, labels)
    return float(torch.nn.functional.cross_entropy(logits_tensor / temperature, labels_tensor))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iterations: int = 200) -> float:
    """Fit the temperature that minimizes the NLL of `(N, C)` logits against `(N,)` labels.

    The search runs over log T with L-BFGS and a strong Wolfe line search, starting from T = 1, and the
    result is clipped to [MIN_TEMPERATURE, MAX_TEMPERATURE].
    """
    logits_tensor, labels_tensor = _check_logits_and_labels(logits, labels)
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_temperature], lr=1.0, max_iter=max_iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_tensor / log_temperature.exp(), labels_tensor)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_temperature.detach().exp())
    if not math.isfinite(temperature):
        raise ValueError("Temperature fit diverged: the NLL has no finite minimum on these logits.")
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def calibrate_head(head: str, logits: np.ndarray, labels: np.ndarray) -> HeadCalibration:
    """Fit the temperature of one head on `(N, C)` logits and `(N,)` labels, with ECE and NLL before and after."""
    temperature = fit_temperature(logits, labels)
    return HeadCalibration(
        head=head,
        temperature=temperature,
        samples=len(labels),
        ece_before=expected_calibration_error(softmax_with_temperature(logits, 1.0), labels),
        ece_after=expected_calibration_error(softmax_with_temperature(logits, temperature), labels),
        nll_before=negative_log_likelihood(logits, labels),
        nll_after=negative_log_likelihood(logits, labels, temperature),
    )


def format_calibration_table(rows: list[dict[str, float | str]]) -> str:
    """Format rows with keys split, head, samples, temperature, ece_before and ece_after as a text table."""
    lines = [f"{'split':<12}{'head':<12}{'samples':>8}{'T':>8}{'ECE before':>12}{'ECE after':>12}"]
    for row in rows:
        lines.append(
            f"{row['split']:<12}{row['head']:<12}{row['samples']:>8}{row['temperature']:>8.3f}"
            f"{row['ece_before']:>12.4f}{row['ece_after']:>12.4f}"
        )
    return "\n".join(lines)


def reset_temperatures(config) -> dict[str, float]:
    """Set every temperature of an RMT config back to 1.0 and return the previous ones.

    Temperatures fitted for one set of weights do not hold after those weights change, so training
    resets them and `--calibrate` fits new ones.
    """
    previous = dict(getattr(config, "temperatures", None) or {})
    config.temperatures = {head: 1.0 for head in HEADS}
    return previous


__all__ = [
    "ECE_BINS",
    "HEADS",
    "HeadCalibration",
    "calibrate_head",
    "expected_calibration_error",
    "fit_temperature",
    "format_calibration_table",
    "negative_log_likelihood",
    "reset_temperatures",
    "softmax_with_temperature",
]
