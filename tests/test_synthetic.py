"""Tests for the synthetic multimodal dataset generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_scripts.synthetic import (
    MISSING_IMAGE_RATE,
    MISSING_TEXT_RATE,
    SPLIT_FRACTIONS,
    main,
    make_synthetic_dataset,
)

SEVERE_MARKERS = ("dyspnea", "shortness of breath", "86%", "呼吸困难", "血氧饱和度下降", "气促")
RECORD_KEYS = {"id", "label", "image", "text", "patient_id"}

# The output folder, the paths returned by make_synthetic_dataset, and all records.
DefaultDataset = tuple[Path, dict[str, Path], list[dict]]


def read_records(paths: dict[str, Path]) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in paths[split].read_text(encoding="utf-8").splitlines()]
        for split in SPLIT_FRACTIONS
    }


def flatten(records: dict[str, list[dict]]) -> list[dict]:
    return [record for split_records in records.values() for record in split_records]


def severe_marker_rate(records: list[dict], label: str) -> float:
    notes = [record["text"] for record in records if record["label"] == label and record["text"]]
    return sum(any(marker in note for marker in SEVERE_MARKERS) for note in notes) / len(notes)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> DefaultDataset:
    """Generate the default dataset once: 240 samples of 96x96 pixels, seed 0."""
    output_dir = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic_dataset(output_dir)
    return output_dir, paths, flatten(read_records(paths))


def test_synthetic_returns_paths(default_dataset: DefaultDataset) -> None:
    output_dir, paths, _ = default_dataset
    assert set(paths) == {"train", "validation", "test", "images"}
    assert paths["images"] == output_dir / "images"
    assert all(paths[split].is_file() for split in SPLIT_FRACTIONS)


def test_synthetic_record_format(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["label"] in {"mild", "severe"}
        assert record["image"] is None or re.fullmatch(r"images/[\w-]+\.png", record["image"])
        assert record["text"] is None or isinstance(record["text"], str)
        assert isinstance(record["patient_id"], str)


def test_synthetic_ids_unique(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    assert len({record["id"] for record in records}) == 240


def test_synthetic_split_sizes(default_dataset: DefaultDataset) -> None:
    _, paths, _ = default_dataset
    sizes = {split: len(records) for split, records in read_records(paths).items()}
    assert sizes == {"train": 168, "validation": 48, "test": 24}


def test_synthetic_never_both_absent(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    assert not [record["id"] for record in records if record["image"] is None and not record["text"]]


def test_synthetic_absence_rates(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    without_image = sum(record["image"] is None for record in records) / len(records)
    without_text = sum(not record["text"] for record in records) / len(records)
    assert without_image == pytest.approx(MISSING_IMAGE_RATE, abs=0.01)
    assert without_text == pytest.approx(MISSING_TEXT_RATE, abs=0.01)


def test_synthetic_absent_text_forms(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    absent = [record["text"] for record in records if not record["text"]]
    assert None in absent
    assert "" in absent


def test_synthetic_labels_balanced(default_dataset: DefaultDataset) -> None:
    _, paths, records = default_dataset
    assert sum(record["label"] == "severe" for record in records) == 120
    for split, split_records in read_records(paths).items():
        severe_fraction = sum(record["label"] == "severe" for record in split_records) / len(split_records)
        assert severe_fraction == pytest.approx(0.5, abs=0.05), split


def test_synthetic_images_readable(default_dataset: DefaultDataset) -> None:
    output_dir, _, records = default_dataset
    for record in records:
        if record["image"] is None:
            continue
        with Image.open(output_dir / record["image"]) as image:
            assert image.format == "PNG"
            assert image.mode == "L"
            assert image.size == (96, 96)


def test_synthetic_no_unreferenced_images(default_dataset: DefaultDataset) -> None:
    output_dir, paths, records = default_dataset
    written = {path.relative_to(output_dir).as_posix() for path in paths["images"].iterdir()}
    assert written == {record["image"] for record in records if record["image"] is not None}


def test_synthetic_languages_mixed(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    notes = [record["text"] for record in records if record["text"]]
    chinese_fraction = sum(bool(re.search(r"[\u4e00-\u9fff]", note)) for note in notes) / len(notes)
    assert chinese_fraction == pytest.approx(0.5, abs=0.1)


def test_synthetic_text_informative(default_dataset: DefaultDataset) -> None:
    _, _, records = default_dataset
    assert severe_marker_rate(records, "severe") == pytest.approx(0.8, abs=0.1)
    assert severe_marker_rate(records, "mild") == pytest.approx(0.2, abs=0.1)


def test_synthetic_images_informative(default_dataset: DefaultDataset) -> None:
    output_dir, _, records = default_dataset
    brightness: dict[str, list[float]] = {"mild": [], "severe": []}
    for record in records:
        if record["image"] is not None:
            with Image.open(output_dir / record["image"]) as image:
                brightness[record["label"]].append(float(np.asarray(image).mean()))
    assert np.mean(brightness["severe"]) > np.mean(brightness["mild"]) + 1.0


def test_synthetic_deterministic(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", num_samples=30, image_size=32, seed=7)
    second = make_synthetic_dataset(tmp_path / "b", num_samples=30, image_size=32, seed=7)
    for split in SPLIT_FRACTIONS:
        assert first[split].read_bytes() == second[split].read_bytes(), split
    for image_path in first["images"].iterdir():
        assert image_path.read_bytes() == (second["images"] / image_path.name).read_bytes(), image_path.name


def test_synthetic_seed_changes_output(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path / "a", num_samples=30, image_size=32, seed=7)
    second = make_synthetic_dataset(tmp_path / "b", num_samples=30, image_size=32, seed=8)
    assert read_records(first) != read_records(second)


@pytest.mark.parametrize(("num_samples", "image_size"), [(0, 96), (10, 8)])
def test_synthetic_rejects_invalid_sizes(tmp_path: Path, num_samples: int, image_size: int) -> None:
    with pytest.raises(ValueError, match="must be at least"):
        make_synthetic_dataset(tmp_path, num_samples=num_samples, image_size=image_size)


def test_synthetic_cli_writes_files(tmp_path: Path) -> None:
    main(["--output_dir", str(tmp_path), "--num_samples", "20", "--image_size", "24", "--seed", "3"])
    records = flatten(read_records({split: tmp_path / f"{split}.jsonl" for split in SPLIT_FRACTIONS}))
    assert len(records) == 20
    with Image.open(tmp_path / next(record["image"] for record in records if record["image"])) as image:
        assert image.size == (24, 24)
