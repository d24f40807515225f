"""Tests for the study runner: visibility masks, bootstrap, baselines, resume and failure handling."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PredictionOutput

from datasets_scripts.synthetic import make_synthetic_dataset
from model_card_rmt import load_study_results
from study.analysis import (
    EvaluationSettings,
    EvaluationSplit,
    assemble_probabilities,
    sweep_masks,
)
from study.runs import (
    MODEL_RUNS,
    heads_match_unimodal_views,
    natural_view,
    predict_each_view,
    predict_neural_views,
    requested_views,
    rmt_head_logits,
)
from study.statistics import METRIC_NAMES, cluster_bootstrap_weights, weighted_scores
from study.visibility import (
    MODALITIES,
    VIEW_BOTH,
    VIEW_IMAGE,
    VIEW_TEXT,
    sweep_views,
    visibility_mask,
    visible_count,
)
from tests.checkpoints import tiny_classifier, tiny_processor
from tests.conftest import REPO_ROOT
from tests.tiny import random_batch, tiny_model
from train_rmt import DataArguments, RMTDataCollator, load_splits

METRIC_DIR = REPO_ROOT / "metrics" / "rmt_classification"
TEXT_READING_BASELINES = ("bert", "tfidf_random_forest", "tfidf_gradient_boosting")
EXTRA_WEIGHTS = "0.5,0.25,0.25"
EXPECTED_RUNS = (*MODEL_RUNS, "rmt_weights_image_heavy", "rmt_weights_0.5_0.25_0.25")


def study_command(data_dir: Path, output_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "study_rmt.py"),
        "--train_file", str(data_dir / "train.jsonl"),
        "--validation_file", str(data_dir / "validation.jsonl"),
        "--test_file", str(data_dir / "test.jsonl"),
        "--preset", "tiny",
        "--text_model_name_or_path", str(tokenizer_dir),
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("study-data")
    make_synthetic_dataset(data_dir, num_samples=80, image_size=32, seed=1)
    return data_dir


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, synthetic_dir, minilm_dir):
    """Run every model of the tiny preset once through the command line; return (output folder, results)."""
    output_dir = tmp_path_factory.mktemp("study") / "out"
    command = study_command(synthetic_dir, output_dir, minilm_dir, "--task_weights", EXTRA_WEIGHTS)
    result = run_command(command, output_dir.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return output_dir, json.loads((output_dir / "results.json").read_text())


def study_arguments(synthetic_dir: Path, output_dir: Path, minilm_dir: Path, *extra: str) -> list[str]:
    """The arguments of `study_command` without the interpreter and script, for an in-process `main`."""
    return study_command(synthetic_dir, output_dir, minilm_dir, *extra)[2:]


# Visibility masks


@pytest.mark.parametrize(
    "rate,num_samples,expected",
    [(0.1, 26, 3), (0.3, 26, 8), (0.5, 26, 13), (0.5, 5, 3), (0.25, 2, 1), (0.0, 7, 0), (1.0, 7, 7)],
)
def test_visible_count_rounds_half_up(rate, num_samples, expected):
    assert visible_count(rate, num_samples) == expected


@settings(max_examples=200, deadline=None)
@given(
    num_samples=st.integers(0, 400),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    modality=st.sampled_from(["text", "image"]),
)
def test_visibility_mask_hits_rate_exactly(num_samples, rate, seed, modality):
    mask = visibility_mask(num_samples, rate, seed, modality)

    assert mask.shape == (num_samples,)
    assert mask.sum() == math.floor(rate * num_samples + 0.5)


def test_visibility_mask_depends_only_on_arguments():
    first = visibility_mask(50, 0.3, seed=7, modality="text")
    again = visibility_mask(50, 0.3, seed=7, modality="text")
    other_seed = visibility_mask(50, 0.3, seed=8, modality="text")

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)


def test_visibility_masks_nested_across_rates():
    masks = [visibility_mask(40, rate, seed=3, modality="image") for rate in (0.1, 0.3, 0.5, 0.7, 0.9)]

    for smaller, larger in zip(masks, masks[1:]):
        assert np.all(larger[smaller])


def test_visibility_mask_rejects_bad_rate():
    with pytest.raises(ValueError, match="Visibility rate must lie in"):
        visibility_mask(10, 1.5, seed=0, modality="text")


def test_sweep_masks_identical_across_models(tiny_study, synthetic_dir):
    output_dir, results = tiny_study
    records = {name: load_record(output_dir, name) for name in ("rmt", "cnn", *TEXT_READING_BASELINES)}
    test = read_test_split(synthetic_dir)
    eligible = test.complete_samples
    evaluation = evaluation_settings(results)

    masks = sweep_masks(len(eligible), evaluation, "text")
    for rate, rate_masks in masks.items():
        recorded_ids = results["sweeps"]["text"]["visible_ids"][f"{rate:g}"]
        for mask, ids in zip(rate_masks, recorded_ids, strict=True):
            assert [test.ids[index] for index, visible in zip(eligible, mask) if visible] == ids
            for name in TEXT_READING_BASELINES:
                _, covered = assemble_probabilities(records[name], "test", eligible, sweep_views(mask, "text"))
                assert np.array_equal(covered, mask), f"{name} at rate {rate}"
            _, cnn_covered = assemble_probabilities(records["cnn"], "test", eligible, sweep_views(mask, "text"))
            assert cnn_covered.all()


def test_sweep_coverage_matches_rounding(tiny_study):
    _, results = tiny_study
    sweep = results["sweeps"]["text"]
    eligible = sweep["eligible_samples"]

    for name in TEXT_READING_BASELINES:
        for rate, summary in sweep["runs"][name].items():
            assert summary["coverage"] == visible_count(float(rate), eligible) / eligible, f"{name} {rate}"


# Bootstrap and weighted metrics


@settings(max_examples=100, deadline=None)
@given(
    patients=st.lists(st.integers(0, 12), min_size=1, max_size=60),
    num_resamples=st.integers(1, 30),
    seed=st.integers(0, 2**31),
)
def test_bootstrap_resamples_patients_not_rows(patients, num_resamples, seed):
    groups = [f"patient-{patient}" for patient in patients]
    weights = cluster_bootstrap_weights(groups, num_resamples, seed)
    distinct = sorted(set(groups))
    first_row_of = {group: groups.index(group) for group in distinct}

    assert weights.shape == (num_resamples, len(groups))
    assert (weights >= 0).all()
    for index, group in enumerate(groups):
        assert np.array_equal(weights[:, index], weights[:, first_row_of[group]])
    draws_per_replicate = weights[:, [first_row_of[group] for group in distinct]].sum(axis=1)
    assert (draws_per_replicate == len(distinct)).all()


def test_bootstrap_keeps_large_patient_whole():
    groups = ["big"] * 20 + [f"single-{index}" for index in range(5)]
    weights = cluster_bootstrap_weights(groups, 200, seed=0)

    assert (weights[:, :20] == weights[:, :1]).all()
    assert (weights[:, 0] == 0).any()
    assert (weights[:, 0] > 0).any()


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_DIR))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_weighted_scores_match_evaluate_metric(metric, num_classes):
    generator = np.random.default_rng(num_classes)
    for _ in range(10):
        probabilities = np.round(generator.dirichlet(np.ones(num_classes), size=40), 1) + 1e-3
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = generator.integers(0, num_classes, size=40)
        expected = metric.compute(
            predictions=probabilities.argmax(1), references=labels, prediction_scores=probabilities, pos_label=1
        )
        scores = weighted_scores(probabilities, labels, np.ones(40), pos_label=1)
        for name in METRIC_NAMES:
            assert scores[name][0] == pytest.approx(expected[name], nan_ok=True), name


def test_weighted_scores_equal_repeated_rows(metric):
    generator = np.random.default_rng(5)
    probabilities = generator.dirichlet(np.ones(2), size=30)
    labels = generator.integers(0, 2, size=30)
    counts = generator.integers(0, 4, size=30)
    repeated = np.repeat(np.arange(30), counts)
    expected = metric.compute(
        predictions=probabilities[repeated].argmax(1),
        references=labels[repeated],
        prediction_scores=probabilities[repeated],
        pos_label=1,
    )

    scores = weighted_scores(probabilities, labels, counts[None, :], pos_label=1)

    for name in METRIC_NAMES:
        assert scores[name][0] == pytest.approx(expected[name], nan_ok=True), name


# View predictions


def trim_to_length(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """Return `rows` of a batch with the text padding cut to the longest of them, as a smaller batch would have."""
    subset = {key: value[rows] for key, value in batch.items()}
    length = int(subset["attention_mask"].sum(dim=1).max())
    subset["input_ids"] = subset["input_ids"][:, :length]
    subset["attention_mask"] = subset["attention_mask"][:, :length]
    return subset


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_strategy": "fused"},
        {"use_mask_attention": False},
        {"use_mask_attention": False, "use_multitask": False},
    ],
)
def test_view_predictions_match_mixed_batch(overrides):
    modality_mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0]])
    batch = random_batch(6, text_length=12, seed=3, modality_mask=modality_mask)
    model = tiny_model(seed=1, **overrides)

    with torch.no_grad():
        mixed = model(**batch).logits
        for row in range(6):
            alone = model(**trim_to_length(batch, [row])).logits
            assert torch.allclose(alone[0], mixed[row], atol=1e-5), f"row {row}"


LABEL2ID = {"mild": 0, "severe": 1}
PER_VIEW_VARIANTS = {
    "no_mask_attention": {"use_mask_attention": False},
    "no_multitask": {"use_multitask": False},
    "mmbt": {"use_mask_attention": False, "use_multitask": False},
}


@pytest.fixture(scope="module")
def validation_split(synthetic_dir) -> datasets.Dataset:
    """The synthetic validation split, which has complete, image-only and text-only samples."""
    path = str(synthetic_dir / "validation.jsonl")
    return load_splits({"validation": path}, LABEL2ID, DataArguments(validation_file=path))["validation"]


def prediction_trainer(model: torch.nn.Module, minilm_dir: Path, output_dir: Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_eval_batch_size=3,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, data_collator=RMTDataCollator(tiny_processor(minilm_dir), max_seq_length=64))


def record_predict_calls(trainer: Trainer, monkeypatch) -> list[tuple[str, int]]:
    """Record `(metric_key_prefix, number of samples)` of every later `trainer.predict` call."""
    calls = []
    predict = trainer.predict

    def recording_predict(dataset, metric_key_prefix="test", **kwargs):
        calls.append((metric_key_prefix, len(dataset)))
        return predict(dataset, metric_key_prefix=metric_key_prefix, **kwargs)

    monkeypatch.setattr(trainer, "predict", recording_predict)
    return calls


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.as_tensor(logits).softmax(dim=-1).numpy()


@pytest.mark.parametrize("every_view", [True, False], ids=["every_view", "recorded_view"])
@pytest.mark.parametrize("strategy", ["per_task", "fused"])
def test_rmt_views_from_heads_match_each_view(validation_split, minilm_dir, tmp_path, strategy, every_view):
    trainer = prediction_trainer(tiny_classifier(seed=2, attention_strategy=strategy), minilm_dir, tmp_path)
    requests = requested_views(validation_split, MODALITIES, every_view)
    assert heads_match_unimodal_views(trainer.model)

    from_heads = predict_neural_views(trainer, validation_split, requests)
    each_view = predict_each_view(trainer, validation_split, requests)

    assert set(from_heads) == set(requests)
    for view, indices in requests.items():
        assert from_heads[view].shape == (len(indices), 2), view
        assert np.allclose(from_heads[view], softmax(each_view[view]), atol=1e-5), view


def test_rmt_predicts_complete_samples_once(validation_split, minilm_dir, tmp_path, monkeypatch):
    trainer = prediction_trainer(tiny_classifier(), minilm_dir, tmp_path)
    requests = requested_views(validation_split, MODALITIES, every_view=True)
    recorded = Counter(natural_view(record) for record in validation_split)
    calls = record_predict_calls(trainer, monkeypatch)

    predict_neural_views(trainer, validation_split, requests)

    assert len(requests[VIEW_IMAGE]) == recorded[VIEW_BOTH] + recorded[VIEW_IMAGE]
    assert calls == [
        ("view_image+text", recorded[VIEW_BOTH]),
        ("view_image", recorded[VIEW_IMAGE]),
        ("view_text", recorded[VIEW_TEXT]),
    ]


@pytest.mark.parametrize("variant", list(PER_VIEW_VARIANTS))
def test_rmt_ablations_predict_each_view(validation_split, minilm_dir, tmp_path, monkeypatch, variant):
    trainer = prediction_trainer(tiny_classifier(**PER_VIEW_VARIANTS[variant]), minilm_dir, tmp_path)
    requests = requested_views(validation_split, MODALITIES, every_view=True)
    calls = record_predict_calls(trainer, monkeypatch)

    predict_neural_views(trainer, validation_split, requests)

    assert calls == [(f"view_{view}", len(indices)) for view, indices in requests.items()]


def test_rmt_head_logits_rejects_routed_logits_alone():
    prediction = PredictionOutput(predictions=np.zeros((4, 2)), label_ids=None, metrics=None)

    with pytest.raises(ValueError, match="Expected RMT predictions with the fields"):
        rmt_head_logits(prediction)


# The study on tiny synthetic data


def load_record(output_dir: Path, name: str) -> dict:
    return json.loads((output_dir / "runs" / name / "predictions.json").read_text())


def read_test_split(data_dir: Path) -> EvaluationSplit:
    from study.runs import natural_view

    records = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    labels = np.asarray([["mild", "severe"].index(record["label"]) for record in records])
    views = [natural_view({"image": r["image"], "text": r["text"] or None}) for r in records]
    return EvaluationSplit([r["id"] for r in records], labels, views, [r["patient_id"] for r in records])


def evaluation_settings(results: dict) -> EvaluationSettings:
    study = results["study"]
    return EvaluationSettings(
        visibility_rates=tuple(study["arguments"]["visibility_rates"]),
        num_repeats=study["num_repeats"],
        bootstrap_samples=study["bootstrap_samples"],
        confidence_level=study["confidence_level"],
        seed=study["arguments"]["seed"],
        pos_label=1,
        num_labels=2,
    )


@pytest.mark.parametrize("name", EXPECTED_RUNS)
def test_every_run_trains_and_predicts(tiny_study, name):
    output_dir, results = tiny_study
    record = load_record(output_dir, name)
    modalities = set(record["spec"]["input_modalities"])

    assert results["runs"][name]["status"] == "trained"
    views = record["splits"]["test"]["views"]
    expected_views = {"image+text", "image", "text"} if modalities == {"image", "text"} else modalities
    assert set(views) == expected_views
    for view, column in views.items():
        rows = [row for row in column if row is not None]
        assert rows, f"no {view} prediction"
        assert np.allclose(np.sum(rows, axis=1), 1.0, atol=1e-5)
    assert "as recorded" in results["performance"][name]


def test_unimodal_runs_read_only_their_modality(tiny_study):
    _, results = tiny_study

    assert set(results["performance"]["cnn"]) == {"image", "as recorded"}
    for name in TEXT_READING_BASELINES:
        assert set(results["performance"][name]) == {"text", "as recorded"}
    assert set(results["performance"]["rmt"]) == {"image", "text", "image+text", "as recorded"}


def test_study_writes_tables_and_plots(tiny_study):
    output_dir, _ = tiny_study
    report = (output_dir / "results.md").read_text()

    for heading in (
        "## Performance by input and model",
        "## Task weights",
        "## Ablation under text absence",
        "## Ablation under image absence",
        "## Runs",
    ):
        assert heading in report
    for name in ("accuracy_text_visibility.png", "accuracy_image_visibility.png", "roc_curves.png"):
        with Image.open(output_dir / name) as image:
            assert image.format == "PNG"
    for name in EXPECTED_RUNS:
        assert (output_dir / "runs" / name / "run_config.json").is_file()


def test_results_json_loads_as_model_card_study(tiny_study):
    output_dir, _ = tiny_study
    study = load_study_results(output_dir / "results.json")

    assert "test_routed_accuracy" in study["intervals"]
    assert study["robustness"]


def test_resume_skips_finished_runs(tiny_study, synthetic_dir, minilm_dir):
    from study_rmt import main

    output_dir, _ = tiny_study
    prediction_files = [output_dir / "runs" / name / "predictions.json" for name in EXPECTED_RUNS]
    modified = [path.stat().st_mtime_ns for path in prediction_files]

    results = main(study_arguments(synthetic_dir, output_dir, minilm_dir, "--task_weights", EXTRA_WEIGHTS))

    assert {run["status"] for run in results["runs"].values()} == {"reused"}
    assert [path.stat().st_mtime_ns for path in prediction_files] == modified


def test_resume_rejects_changed_settings(tiny_study, synthetic_dir, minilm_dir):
    from study_rmt import main

    output_dir, _ = tiny_study
    with pytest.raises(ValueError, match="was made with other settings"):
        main(study_arguments(synthetic_dir, output_dir, minilm_dir, "--models", "cnn", "--image_size", "48"))


def test_broken_run_reported_while_others_finish(synthetic_dir, minilm_dir, tmp_path):
    output_dir = tmp_path / "broken"
    command = study_command(
        synthetic_dir, output_dir, minilm_dir,
        "--models", "cnn", "bert", "tfidf_random_forest", "--task_weight_grid", "none",
        "--image_model_name", "no_such_cnn",
    )  # fmt: skip

    result = run_command(command, tmp_path)

    assert result.returncode == 1
    results = json.loads((output_dir / "results.json").read_text())
    assert results["runs"]["cnn"]["status"] == "failed"
    assert "no_such_cnn" in results["runs"]["cnn"]["error"]
    assert results["runs"]["bert"]["status"] == "trained"
    assert results["runs"]["tfidf_random_forest"]["status"] == "trained"
    assert (output_dir / "runs" / "cnn" / "error.txt").is_file()
    assert "no_such_cnn" in (output_dir / "results.md").read_text()
    assert "1 run(s) failed: cnn" in result.stdout


def test_task_weights_option_rejects_bad_triple(synthetic_dir, minilm_dir, tmp_path):
    from study_rmt import main

    with pytest.raises(ValueError, match="three non-negative numbers"):
        main(study_arguments(synthetic_dir, tmp_path, minilm_dir, "--task_weights", "0.5,0.5"))
