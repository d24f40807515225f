"""Fine-tuning a trained RMT on a new three-class label set with train_rmt.py --model_name_or_path."""

import json
import sys
from pathlib import Path

import pytest
import torch

from datasets_scripts.synthetic import make_synthetic_dataset
from modeling_rmt import RMTForMultimodalClassification
from pipeline_rmt import RMTPipeline
from processing_rmt import RMTProcessor
from tests.conftest import REPO_ROOT
from tests.test_train import TINY_ENCODER, run_command

NEW_LABELS = ("a", "b", "c")
STALE_TEMPERATURES = {"image": 2.0, "text": 3.0, "multimodal": 0.5}


def common_arguments(output_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--do_train",
        "--save_strategy", "no",
        "--max_seq_length", "32",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip


def write_three_class_data(folder: Path) -> None:
    """Write train and validation JSONL files labeled a, b, c that reuse synthetic X-rays.

    Every record has an image, so that every training batch contains at least two images. With fewer, the
    batch norm of a 32 px ResNet sees one value per channel and raises.
    """
    make_synthetic_dataset(folder, num_samples=40, image_size=32, seed=7)
    records = []
    for split in ("train", "validation", "test"):
        for line in (folder / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["image"] is not None:
                records.append(record)
    for index, record in enumerate(records):
        record["label"] = NEW_LABELS[index % 3]
        if index % 4 == 0:
            record["text"] = None
    splits = {"train": records[:18], "validation": records[18:27]}
    for split, rows in splits.items():
        (folder / f"ft_{split}.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, minilm_dir) -> Path:
    """Train a tiny two-label RMT for a few steps and mark its config as calibrated."""
    workdir = tmp_path_factory.mktemp("base")
    make_synthetic_dataset(workdir / "data", num_samples=60, image_size=32, seed=1)
    output_dir = workdir / "model"
    command = [
        sys.executable, str(REPO_ROOT / "train_rmt.py"),
        "--train_file", str(workdir / "data" / "train.jsonl"),
        "--text_model_name_or_path", str(minilm_dir),
        "--config_overrides", TINY_ENCODER,
        "--image_model_name", "resnet10t",
        "--image_pretrained", "false",
        "--image_size", "32",
        "--per_device_train_batch_size", "8",
        "--max_steps", "3",
        *common_arguments(output_dir),
    ]  # fmt: skip
    result = run_command(command, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["temperatures"] = STALE_TEMPERATURES
    config_path.write_text(json.dumps(config, indent=2))
    return output_dir


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory, base_model_dir) -> Path:
    workdir = tmp_path_factory.mktemp("finetune")
    write_three_class_data(workdir)
    output_dir = workdir / "model"
    command = [
        sys.executable, str(REPO_ROOT / "train_rmt.py"),
        "--model_name_or_path", str(base_model_dir),
        "--labels", *NEW_LABELS,
        "--train_file", str(workdir / "ft_train.jsonl"),
        "--validation_file", str(workdir / "ft_validation.jsonl"),
        "--do_eval",
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "6",
        "--per_device_eval_batch_size", "16",
        *common_arguments(output_dir),
    ]  # fmt: skip
    result = run_command(command, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


def test_finetune_replaces_label_set(finetuned_dir):
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    assert config["label2id"] == {"a": 0, "b": 1, "c": 2}


def test_finetune_resizes_every_head(finetuned_dir):
    model = RMTForMultimodalClassification.from_pretrained(finetuned_dir)
    for head in (model.image_classifier, model.text_classifier, model.multimodal_classifier):
        assert tuple(head[-1].weight.shape) == (3, model.config.hidden_size)


def test_finetune_keeps_pretrained_encoder(base_model_dir, finetuned_dir):
    # Rows of word embeddings for tokens that occur in no note get no gradient, and the default weight
    # decay is 0, so they must still equal the starting model's rows: the encoder was loaded, not rebuilt.
    base = RMTForMultimodalClassification.from_pretrained(base_model_dir)
    finetuned = RMTForMultimodalClassification.from_pretrained(finetuned_dir)
    unused_ids = torch.arange(29000, 29010)
    base_rows = base.rmt.get_input_embeddings().weight[unused_ids]
    finetuned_rows = finetuned.rmt.get_input_embeddings().weight[unused_ids]
    torch.testing.assert_close(finetuned_rows, base_rows, rtol=0, atol=0)


def test_finetune_resets_stale_temperatures(finetuned_dir):
    config = json.loads((finetuned_dir / "config.json").read_text())
    assert config["temperatures"] == {"image": 1.0, "text": 1.0, "multimodal": 1.0}


def test_finetune_evaluates_three_classes(finetuned_dir):
    results = json.loads((finetuned_dir / "all_results.json").read_text())
    assert results["validation_routed_samples"] == 9
    assert 0.0 <= results["validation_routed_accuracy"] <= 1.0
    assert 0.0 <= results["validation_image_accuracy"] <= 1.0


def test_finetuned_pipeline_returns_new_labels(finetuned_dir):
    model = RMTForMultimodalClassification.from_pretrained(finetuned_dir).eval()
    classifier = RMTPipeline(model=model, processor=RMTProcessor.from_pretrained(finetuned_dir), device="cpu")
    answer = classifier({"text": "Progressive dyspnea."})
    assert list(answer["probabilities"]) == list(NEW_LABELS)
    assert answer["label"] in NEW_LABELS
    assert answer["head"] == "text"


def test_finetuned_card_lists_new_labels(finetuned_dir):
    card = (finetuned_dir / "README.md").read_text()
    assert "`a`, `b`, `c`" in card
    assert "| train | 18 |" in card
