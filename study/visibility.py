"""Seeded visibility masks for the robustness sweeps, and the view each model gets under a mask.

A sweep removes one modality from part of the test samples that have both. For visibility rate `r`
over `n` such samples, exactly `round_half_up(r * n) = floor(r * n + 0.5)` samples keep the modality.
Which ones depends only on the seed, the swept modality and the order of the eligible sample ids, never
on the model, so every model is scored on the same masks. For one seed the visible sets are nested:
the samples visible at 30 % are also visible at 50 %.
"""

import math
from collections.abc import Sequence

import numpy as np

MODALITIES = ("image", "text")
# Views name the modalities a model is shown for a sample.
VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT = "image+text", "image", "text"
VIEWS = (VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT)
# Separate random streams per swept modality, so the text and image sweeps of one seed are independent.
_MODALITY_STREAM = {"text": 0, "image": 1}


def visible_count(rate: float, num_samples: int) -> int:
    """Return how many of `num_samples` keep the modality at visibility `rate`: floor(rate * n + 0.5)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"Visibility rate must lie in [0, 1], got {rate}.")
    return math.floor(rate * num_samples + 0.5)


def visibility_mask(num_samples: int, rate: float, seed: int, modality: str) -> np.ndarray:
    """Return a `(num_samples,)` bool mask, True where the swept `modality` stays visible.

    The mask depends only on its arguments. It takes the first `visible_count(rate, n)` positions of a
    permutation drawn from `numpy.random.default_rng([seed, stream of modality])`.
    """
    if modality not in _MODALITY_STREAM:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    order = np.random.default_rng([seed, _MODALITY_STREAM[modality]]).permutation(num_samples)
    mask = np.zeros(num_samples, dtype=bool)
    mask[order[: visible_count(rate, num_samples)]] = True
    return mask


def sample_view(image_visible: bool, text_visible: bool) -> str:
    """Return the view of a sample from the modalities it shows; at least one must be visible."""
    if image_visible and text_visible:
        return VIEW_BOTH
    if image_visible:
        return VIEW_IMAGE
    if text_visible:
        return VIEW_TEXT
    raise ValueError("A sample needs at least one visible modality.")


def sweep_views(mask: np.ndarray, modality: str) -> list[str]:
    """Return the view of each eligible sample when `modality` is visible only where `mask` is True."""
    if modality == "text":
        return [sample_view(True, bool(visible)) for visible in mask]
    if modality == "image":
        return [sample_view(bool(visible), True) for visible in mask]
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")


def usable_view(view: str, input_modalities: Sequence[str]) -> str | None:
    """Return the part of `view` that a model reading `input_modalities` can use, or None if it can use none.

    An image-only CNN shown image and text uses the image view. A text model shown only an image gets
    None: it cannot read that sample.
    """
    shown = {VIEW_BOTH: ("image", "text"), VIEW_IMAGE: ("image",), VIEW_TEXT: ("text",)}[view]
    used = tuple(modality for modality in MODALITIES if modality in shown and modality in input_modalities)
    if not used:
        return None
    return sample_view("image" in used, "text" in used)
