"""Generate a small synthetic chest X-ray + clinical note dataset in RMT's JSONL format.

The data is for smoke tests and demos: it runs in about a second and a model can learn it. Images are
8-bit grayscale PNGs that look roughly like a frontal chest X-ray: a bright body, two dark lung fields,
a brighter mediastinum and Gaussian noise. Severe samples have more and larger bright opacities in the
lungs. Notes come from English and Chinese templates (about half each), where severe notes mention
dyspnea or low oxygen saturation and mild notes mention a mild cough or low-grade fever.

Neither modality alone gives the label: each draws its picture or symptoms from the other label's
profile with probability `1 - INFORMATIVE_RATE`, independently of the other modality.
`MISSING_IMAGE_RATE` of the samples have `image: null` and `MISSING_TEXT_RATE` have text null or "",
never both. Splits are 7:2:1 and stratified by label; every sample is its own patient.

Usage:
    python datasets_scripts/synthetic.py --output_dir OUT [--num_samples 240] [--image_size 96] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

LABELS = ("mild", "severe")
SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.2, "test": 0.1}
INFORMATIVE_RATE = 0.8
MISSING_IMAGE_RATE = 0.15
MISSING_TEXT_RATE = 0.15
CHINESE_RATE = 0.5

# Opacity profile per label: number of blobs (inclusive range) and blob radius as a fraction of the side.
OPACITY_COUNT = {"mild": (0, 1), "severe": (3, 5)}
OPACITY_RADIUS = {"mild": (0.03, 0.05), "severe": (0.06, 0.10)}

# Lung fields as ellipses (center x, center y, half width, half height), in fractions of the side.
LUNG_ELLIPSES = ((0.32, 0.50, 0.14, 0.28), (0.68, 0.50, 0.14, 0.28))

SYMPTOMS = {
    ("en", "mild"): (
        "Mild cough for three days.",
        "Low-grade fever, 37.6 °C.",
        "Oxygen saturation 98% on room air.",
        "Sore throat and fatigue.",
    ),
    ("en", "severe"): (
        "Progressive dyspnea.",
        "Oxygen saturation dropped to 86% on room air.",
        "Respiratory rate 32 per minute with dyspnea at rest.",
        "High fever of 39.4 °C and shortness of breath.",
    ),
    ("zh", "mild"): (
        "轻微咳嗽三天。",
        "低热，体温37.6℃。",
        "未吸氧状态下血氧饱和度98%。",
        "咽痛，乏力。",
    ),
    ("zh", "severe"): (
        "进行性呼吸困难。",
        "血氧饱和度下降至86%。",
        "呼吸急促，静息时亦感呼吸困难。",
        "高热39.4℃，伴气促。",
    ),
}
INTRODUCTIONS = {
    "en": "A {age}-year-old {sex} presented to the emergency department.",
    "zh": "患者{sex}，{age}岁，因发热就诊。",
}
SEX_WORDS = {"en": ("man", "woman"), "zh": ("男性", "女性")}
NEUTRAL_SENTENCES = {
    "en": ("Chest radiograph obtained on admission.", "History of hypertension.", "No recent travel."),
    "zh": ("入院时行胸部X线检查。", "既往有高血压病史。", "近期无旅行史。"),
}


def draw_lung_background(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a noise-free float picture of a bright body, dark lungs and a brighter mediastinum."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    body = ((xs - 0.5) / 0.45) ** 2 + ((ys - 0.55) / 0.50) ** 2 <= 1.0
    picture = np.where(body, 0.62, 0.08)
    for center_x, center_y, half_width, half_height in LUNG_ELLIPSES:
        lung = ((xs - center_x) / half_width) ** 2 + ((ys - center_y) / half_height) ** 2 <= 1.0
        picture = np.where(lung, 0.22, picture)
    mediastinum = np.exp(-(((xs - 0.5) / 0.06) ** 2))
    picture = picture + 0.15 * mediastinum * body
    return picture * rng.uniform(0.9, 1.1)


def add_opacities(picture: np.ndarray, profile: str, rng: np.random.Generator) -> np.ndarray:
    """Return `picture` plus bright Gaussian blobs centered inside the lung fields.

    The number and size of the blobs follow the opacity profile of the label `profile`.
    """
    size = picture.shape[0]
    ys, xs = np.mgrid[0:size, 0:size] / size
    low, high = OPACITY_COUNT[profile]
    for _ in range(rng.integers(low, high + 1)):
        center_x, center_y, half_width, half_height = LUNG_ELLIPSES[rng.integers(len(LUNG_ELLIPSES))]
        # Uniform point in the ellipse: the square root of a uniform radius gives uniform area density.
        radius, angle = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        blob_x = center_x + radius * half_width * np.cos(angle)
        blob_y = center_y + radius * half_height * np.sin(angle)
        blob_radius = rng.uniform(*OPACITY_RADIUS[profile])
        blob = np.exp(-((xs - blob_x) ** 2 + (ys - blob_y) ** 2) / (2 * blob_radius**2))
        picture = picture + rng.uniform(0.3, 0.5) * blob
    return picture


def draw_chest_image(image_size: int, profile: str, rng: np.random.Generator) -> np.ndarray:
    """Return an 8-bit grayscale chest-X-ray-like picture with opacities of the given label profile."""
    picture = add_opacities(draw_lung_background(image_size, rng), profile, rng)
    picture = picture + rng.normal(0.0, 0.04, picture.shape)
    return (np.clip(picture, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_note(language: str, profile: str, rng: np.random.Generator) -> str:
    """Return a short note: an introduction, one or two symptoms of `profile`, maybe a neutral sentence."""
    sex = SEX_WORDS[language][rng.integers(2)]
    sentences = [INTRODUCTIONS[language].format(age=int(rng.integers(20, 90)), sex=sex)]
    symptoms = SYMPTOMS[(language, profile)]
    chosen = rng.choice(len(symptoms), size=int(rng.integers(1, 3)), replace=False)
    sentences.extend(symptoms[index] for index in chosen)
    if rng.uniform() < 0.5:
        neutral = NEUTRAL_SENTENCES[language]
        sentences.append(neutral[rng.integers(len(neutral))])
    return ("" if language == "zh" else " ").join(sentences)


def pick_profile(label: str, rng: np.random.Generator) -> str:
    """Return `label` with probability INFORMATIVE_RATE and the other label otherwise."""
    if rng.uniform() < INFORMATIVE_RATE:
        return label
    return LABELS[1 - LABELS.index(label)]


def assign_modality_patterns(num_samples: int, rng: np.random.Generator) -> list[str]:
    """Return a shuffled list of "image_text", "text_only" and "image_only" with the configured rates."""
    without_image = round(MISSING_IMAGE_RATE * num_samples)
    without_text = min(round(MISSING_TEXT_RATE * num_samples), num_samples - without_image)
    patterns = (
        ["text_only"] * without_image
        + ["image_only"] * without_text
        + ["image_text"] * (num_samples - without_image - without_text)
    )
    return [patterns[index] for index in rng.permutation(num_samples)]


def assign_splits(labels: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Return a split name per sample, 7:2:1 within each label (rounded)."""
    splits = [""] * len(labels)
    for label in LABELS:
        indices = [index for index, value in enumerate(labels) if value == label]
        indices = [indices[position] for position in rng.permutation(len(indices))]
        train_end = round(SPLIT_FRACTIONS["train"] * len(indices))
        validation_end = train_end + round(SPLIT_FRACTIONS["validation"] * len(indices))
        for position, index in enumerate(indices):
            if position < train_end:
                splits[index] = "train"
            elif position < validation_end:
                splits[index] = "validation"
            else:
                splits[index] = "test"
    return splits


def make_synthetic_dataset(
    output_dir: str | Path, num_samples: int = 240, image_size: int = 96, seed: int = 0
) -> dict[str, Path]:
    """Write the JSONL splits and the PNG images and return their paths.

    The returned keys are "train", "validation" and "test" (JSONL files) and "images" (the folder).
    The same arguments give byte-identical files.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    output_dir = Path(output_dir)
    image_dir = output_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    labels = [LABELS[index % 2] for index in rng.permutation(num_samples)]
    patterns = assign_modality_patterns(num_samples, rng)
    splits = assign_splits(labels, rng)

    records: dict[str, list[dict]] = {split: [] for split in SPLIT_FRACTIONS}
    for index in tqdm(range(num_samples), desc="Generating samples", unit="sample"):
        sample_id = f"synthetic-{index:05d}"
        label = labels[index]
        image = None
        if patterns[index] != "text_only":
            pixels = draw_chest_image(image_size, pick_profile(label, rng), rng)
            Image.fromarray(pixels).save(image_dir / f"{sample_id}.png")
            image = f"images/{sample_id}.png"
        language = "zh" if rng.uniform() < CHINESE_RATE else "en"
        note = write_note(language, pick_profile(label, rng), rng)
        if patterns[index] == "image_only":
            note = None if rng.uniform() < 0.5 else ""
        records[splits[index]].append(
            {"id": sample_id, "label": label, "image": image, "text": note, "patient_id": f"patient-{index:05d}"}
        )

    paths: dict[str, Path] = {"images": image_dir}
    for split, split_records in records.items():
        paths[split] = output_dir / f"{split}.jsonl"
        with open(paths[split], "w", encoding="utf-8") as handle:
            for record in split_records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        logger.info("Wrote %d samples to %s", len(split_records), paths[split])
    pattern_counts = {pattern: patterns.count(pattern) for pattern in ("image_text", "image_only", "text_only")}
    logger.info("Samples per modality pattern: %s", pattern_counts)
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for the JSONL splits and images/")
    parser.add_argument("--num_samples", type=int, default=240, help="number of samples (default: 240)")
    parser.add_argument("--image_size", type=int, default=96, help="image side in pixels (default: 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_synthetic_dataset(args.output_dir, args.num_samples, args.image_size, args.seed)


if __name__ == "__main__":
    main()
