"""Temperature scaling per head, the expected calibration error, and the temperatures in RMTConfig."""

import json

import numpy as np
import pytest
import torch

from calibration_rmt import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrate_head,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reset_temperatures,
    softmax_with_temperature,
)
from configuration_rmt import RMTConfig
from pipeline_rmt import RMTPipeline
from tests.checkpoints import tiny_classifier, tiny_processor
from tests.tiny import TINY_TEXT_CONFIG

OVERCONFIDENCE = 10.0


def synthetic_logits(samples: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (N, 3) logits that are about calibrated at T = 1, and their (N,) labels."""
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 3, samples)
    logits = generator.normal(0.0, 1.0, (samples, 3))
    logits[np.arange(samples), labels] += 1.5
    return logits, labels


def test_ece_of_constant_confidence():
    # Ten samples at confidence 0.9 with half of them right: |0.5 - 0.9| = 0.4.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)


def test_ece_zero_when_confidence_matches_accuracy():
    probabilities = np.tile([0.75, 0.25], (8, 1))
    labels = np.array([0, 0, 0, 1, 0, 0, 0, 1])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)


def test_ece_weights_bins_by_samples():
    # Bin of 0.95 (two samples, both right) and bin of 0.55 (two samples, one right).
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.55, 0.45]])
    labels = np.array([0, 0, 0, 1])
    expected = 0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.55)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)


def test_ece_bin_edges_are_right_closed():
    # A confidence of exactly 2/3 = 10/15 belongs to the bin (9/15, 10/15], together with 0.62.
    probabilities = np.array([[2 / 3, 1 / 3], [0.62, 0.38]])
    labels = np.array([0, 1])
    expected = abs(0.5 - (2 / 3 + 0.62) / 2)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)


def test_ece_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="Expected \\(N, C\\) probabilities"):
        expected_calibration_error(np.ones((3, 2)) / 2, np.zeros(4, dtype=int))


def test_fit_recovers_scale_of_overconfident_logits():
    logits, labels = synthetic_logits()
    calibrated_temperature = fit_temperature(logits, labels)
    overconfident_temperature = fit_temperature(logits * OVERCONFIDENCE, labels)
    assert overconfident_temperature == pytest.approx(OVERCONFIDENCE * calibrated_temperature, rel=1e-3)


def test_calibration_lowers_ece_of_overconfident_logits():
    logits, labels = synthetic_logits()
    fit = calibrate_head("image", logits * OVERCONFIDENCE, labels)
    assert fit.temperature > 5.0
    assert fit.ece_before > 0.1
    assert fit.ece_after < fit.ece_before / 4
    assert fit.nll_after < fit.nll_before


def test_calibration_sharpens_underconfident_logits():
    logits, labels = synthetic_logits()
    fit = calibrate_head("text", logits / 4, labels)
    assert fit.temperature < 0.5
    assert fit.ece_after < fit.ece_before


def test_fit_sharpens_separable_data_within_bounds():
    # Every sample is right, so the NLL falls toward 0 as T -> 0 until its gradient vanishes.
    labels = np.array([0, 1] * 20)
    logits = np.stack([1.0 - labels, labels.astype(float)], axis=1) * 3.0
    temperature = fit_temperature(logits, labels)
    assert temperature >= MIN_TEMPERATURE
    assert temperature < 0.5


def test_fit_flattens_random_logits_within_bounds():
    # Logits unrelated to the labels are best at T -> infinity, where every probability is 1/2.
    generator = np.random.default_rng(1)
    logits = generator.normal(0.0, 5.0, (400, 2))
    labels = generator.integers(0, 2, 400)
    temperature = fit_temperature(logits, labels)
    assert temperature <= MAX_TEMPERATURE
    assert temperature > 5.0


def test_temperature_keeps_predicted_labels():
    logits, _ = synthetic_logits(samples=50)
    before = softmax_with_temperature(logits, 1.0).argmax(axis=1)
    after = softmax_with_temperature(logits, 7.5).argmax(axis=1)
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize(
    "logits,labels,message",
    [
        (np.zeros((4,)), np.zeros(4, dtype=int), "shape \\(samples, classes\\)"),
        (np.zeros((4, 2)), np.zeros(3, dtype=int), "labels must have shape \\(4,\\)"),
        (np.zeros((2, 2)), np.array([0, 2]), "class ids in \\[0, 2\\)"),
        (np.full((2, 2), np.nan), np.array([0, 1]), "NaN or infinite"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "at least one sample"),
    ],
)
def test_fit_rejects_bad_inputs(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


def test_nll_matches_torch_cross_entropy():
    logits, labels = synthetic_logits(samples=100)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits / 2.0), torch.tensor(labels))
    assert negative_log_likelihood(logits, labels, 2.0) == pytest.approx(float(expected))


def test_config_temperatures_default_to_one():
    config = RMTConfig(text_config=dict(TINY_TEXT_CONFIG))
    assert config.temperatures == {"image": 1.0, "text": 1.0, "multimodal": 1.0}


def test_config_temperatures_fill_missing_heads():
    config = RMTConfig(text_config=dict(TINY_TEXT_CONFIG), temperatures={"text": 2})
    assert config.temperatures == {"image": 1.0, "text": 2.0, "multimodal": 1.0}


@pytest.mark.parametrize(
    "temperatures,message",
    [
        ({"routed": 2.0}, "unknown heads \\['routed'\\]"),
        ({"image": 0.0}, "positive and finite"),
        ({"text": float("inf")}, "positive and finite"),
    ],
)
def test_config_rejects_bad_temperatures(temperatures, message):
    with pytest.raises(ValueError, match=message):
        RMTConfig(text_config=dict(TINY_TEXT_CONFIG), temperatures=temperatures)


def test_config_temperatures_survive_save(tmp_path):
    RMTConfig(text_config=dict(TINY_TEXT_CONFIG), temperatures={"image": 3.5}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["temperatures"]["image"] == 3.5
    assert RMTConfig.from_pretrained(tmp_path).temperatures["image"] == 3.5


def test_reset_temperatures_returns_previous():
    config = RMTConfig(text_config=dict(TINY_TEXT_CONFIG), temperatures={"multimodal": 4.0})
    previous = reset_temperatures(config)
    assert previous["multimodal"] == 4.0
    assert config.temperatures == {"image": 1.0, "text": 1.0, "multimodal": 1.0}


HEAD_VIEWS = {"image": (True, False), "text": (False, True), "multimodal": (True, True)}


def head_logits(model, processor, records, head: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the logits and labels of the records that have `head`'s modalities, with the other one hidden."""
    use_image, use_text = HEAD_VIEWS[head]
    rows = [r for r in records if (r["image"] is not None or not use_image) and (r["text"] or not use_text)]
    batch = processor(
        images=[r["image"] if use_image else None for r in rows],
        text=[r["text"] if use_text else None for r in rows],
        max_length=64,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    labels = np.array([0 if r["label"] == "mild" else 1 for r in rows])
    return logits, labels


@pytest.fixture(scope="module")
def overconfident_setup(tmp_path_factory, minilm_dir):
    """A tiny random RMT whose three heads are overconfident, and synthetic records with absolute paths."""
    from datasets_scripts.synthetic import make_synthetic_dataset

    data_dir = tmp_path_factory.mktemp("calibration")
    make_synthetic_dataset(data_dir, num_samples=90, image_size=32, seed=4)
    records = []
    for split in ("train", "validation", "test"):
        for line in (data_dir / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["image"] = str(data_dir / record["image"]) if record["image"] else None
            records.append(record)

    # The initializer (std 0.02) gives logits near 0. Unit-scale head weights give logits of order 1, as a
    # trained head has, and the factor 10 on top makes every head overconfident for a random model.
    model = tiny_classifier(seed=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for head in (model.image_classifier, model.text_classifier, model.multimodal_classifier):
            linear = head[-1]
            unit_scale = torch.randn(linear.weight.shape, generator=generator) / linear.in_features**0.5
            linear.weight.copy_(unit_scale * OVERCONFIDENCE)
            linear.bias.zero_()
    return model, tiny_processor(minilm_dir), records


@pytest.mark.parametrize("head", ["image", "text", "multimodal"])
def test_calibration_lowers_ece_of_overconfident_model(overconfident_setup, head):
    model, processor, records = overconfident_setup
    logits, labels = head_logits(model, processor, records, head)
    fit = calibrate_head(head, logits, labels)
    assert fit.ece_before > 0.2, f"the scaled model should be overconfident, ECE {fit.ece_before:.3f}"
    assert fit.temperature > 1.0
    assert fit.ece_after < fit.ece_before


def test_pipeline_uses_fitted_temperature(overconfident_setup):
    model, processor, records = overconfident_setup
    logits, labels = head_logits(model, processor, records, "text")
    temperature = calibrate_head("text", logits, labels).temperature
    note = next(r["text"] for r in records if r["text"])

    uncalibrated = RMTPipeline(model=model, processor=processor, device="cpu")({"text": note})
    model.config.temperatures = {"image": 1.0, "text": temperature, "multimodal": 1.0}
    try:
        calibrated = RMTPipeline(model=model, processor=processor, device="cpu")({"text": note})
    finally:
        model.config.temperatures = {"image": 1.0, "text": 1.0, "multimodal": 1.0}
    assert calibrated["label"] == uncalibrated["label"]
    assert calibrated["score"] < uncalibrated["score"]
