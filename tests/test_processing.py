"""Tests for processing_rmt: the chest X-ray image processor and the image + text processor."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertTokenizer

from processing_rmt import RMTImageProcessor, RMTProcessor

IMAGE_SIZE = 32
CHINESE_NOTE = "患者咳嗽三天，伴发热，血氧饱和度下降。"
ENGLISH_NOTE = "Cough for three days with fever and falling oxygen saturation."

# Each row is (image present, text present). Rows with neither are invalid input, so none is drawn.
ROW_PATTERNS = st.lists(
    st.sampled_from([(True, False), (False, True), (True, True)]), min_size=1, max_size=5
)


def make_image(seed: int, height: int = 40, width: int = 36) -> np.ndarray:
    """Return a random (height, width) uint8 image that uses the full 0..255 range."""
    image = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    image[0, 0] = 0
    image[0, 1] = 255
    return image


@pytest.fixture(scope="module")
def image_processor() -> RMTImageProcessor:
    return RMTImageProcessor(size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def english_processor(minilm_dir: Path) -> RMTProcessor:
    return RMTProcessor.from_text_model(minilm_dir, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def chinese_processor(chinese_vocab_file: Path) -> RMTProcessor:
    return RMTProcessor.from_text_model(chinese_vocab_file, image_size=IMAGE_SIZE)


# Image processor


def test_image_processor_output_shape(image_processor):
    pixel_values = image_processor([make_image(0), make_image(1)])["pixel_values"]

    assert pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert pixel_values.dtype == torch.float32


def test_image_processor_channels_are_replicated(image_processor):
    pixel_values = image_processor(make_image(0))["pixel_values"][0]
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    unnormalized = pixel_values * std + mean

    assert torch.allclose(unnormalized[0], unnormalized[1], atol=1e-6)
    assert torch.allclose(unnormalized[0], unnormalized[2], atol=1e-6)
    assert unnormalized.min() >= -1e-6
    assert unnormalized.max() <= 1 + 1e-6


def test_image_processor_equalizes_histogram():
    # Output size equal to the input size makes the resize an identity, so only equalization acts.
    same_size_processor = RMTImageProcessor(size=(40, 36))
    dark_image = (make_image(0) // 8).astype(np.uint8)
    pixel_values = same_size_processor(dark_image)["pixel_values"][0, 0]
    unnormalized = pixel_values * same_size_processor.image_std[0] + same_size_processor.image_mean[0]

    assert unnormalized.max() > 0.95
    assert unnormalized.min() < 0.05


def test_image_processor_numpy_output(image_processor):
    pixel_values = image_processor(make_image(0), return_tensors="np")["pixel_values"]

    assert isinstance(pixel_values, np.ndarray)
    assert pixel_values.dtype == np.float32


@pytest.mark.parametrize("input_kind", ["pil", "path", "str_path", "rgb_array", "rgb_pil", "hw1_array"])
def test_image_processor_input_kinds_agree(image_processor, tmp_path, input_kind):
    gray = make_image(3)
    rgb = np.stack([gray, gray, gray], axis=-1)
    png_path = tmp_path / "image.png"
    PIL.Image.fromarray(gray).save(png_path)
    inputs = {
        "pil": PIL.Image.fromarray(gray),
        "path": png_path,
        "str_path": str(png_path),
        "rgb_array": rgb,
        "rgb_pil": PIL.Image.fromarray(rgb),
        "hw1_array": gray[..., None],
    }
    expected = image_processor(gray)["pixel_values"]

    assert torch.equal(image_processor(inputs[input_kind])["pixel_values"], expected)


def test_image_processor_16_bit_array_rescaled(image_processor):
    image_8_bit = make_image(4)
    image_12_bit = image_8_bit.astype(np.uint16) * 16

    assert torch.equal(image_processor(image_12_bit)["pixel_values"], image_processor(image_8_bit)["pixel_values"])


def test_image_processor_16_bit_png_matches_array(image_processor, tmp_path):
    image_16_bit = make_image(5).astype(np.uint16) * 257
    png_path = tmp_path / "image16.png"
    PIL.Image.fromarray(image_16_bit).save(png_path)

    assert torch.equal(image_processor(png_path)["pixel_values"], image_processor(image_16_bit)["pixel_values"])


def test_image_processor_float_array_rescaled(image_processor):
    image = make_image(6)
    float_image = image.astype(np.float32) / 255.0 * 3.0 - 1.0

    assert torch.equal(image_processor(float_image)["pixel_values"], image_processor(image)["pixel_values"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.integers(1, 2), offset=st.integers(0, 55))
def test_equalization_invariant_to_monotonic_rescale(image_processor, seed, scale, offset):
    # Values 0..100 mapped by scale * v + offset stay within uint8 and keep their order, so the
    # histogram keeps its shape and equalization must give the same output.
    image = np.random.default_rng(seed).integers(0, 101, (40, 36), dtype=np.uint8)
    rescaled = (image.astype(np.int64) * scale + offset).astype(np.uint8)

    assert torch.equal(image_processor(rescaled)["pixel_values"], image_processor(image)["pixel_values"])


def test_augmentation_off_is_deterministic(image_processor):
    image = make_image(7)

    assert torch.equal(image_processor(image)["pixel_values"], image_processor(image)["pixel_values"])


def test_augmentation_on_changes_output(image_processor):
    image = make_image(7)
    torch.manual_seed(0)
    augmented = image_processor(image, do_augment=True)["pixel_values"]

    assert augmented.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.equal(augmented, image_processor(image)["pixel_values"])


def test_augmentation_repeatable_with_seed(image_processor):
    image = make_image(7)
    torch.manual_seed(1)
    first = image_processor(image, do_augment=True)["pixel_values"]
    torch.manual_seed(1)
    second = image_processor(image, do_augment=True)["pixel_values"]

    assert torch.equal(first, second)


def test_augmentation_default_from_attribute():
    augmenting_processor = RMTImageProcessor(size=IMAGE_SIZE, do_augment=True)
    image = make_image(8)
    plain = RMTImageProcessor(size=IMAGE_SIZE)(image)["pixel_values"]
    torch.manual_seed(2)

    assert not torch.equal(augmenting_processor(image)["pixel_values"], plain)
    assert torch.equal(augmenting_processor(image, do_augment=False)["pixel_values"], plain)


def test_image_processor_missing_file(image_processor, tmp_path):
    missing = tmp_path / "missing.png"

    with pytest.raises(ValueError, match="not found") as error:
        image_processor(missing)
    assert str(missing) in str(error.value)


def test_image_processor_unreadable_file(image_processor, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")

    with pytest.raises(ValueError, match="not in an image format") as error:
        image_processor([make_image(0), not_an_image])
    assert str(not_an_image) in str(error.value)
    assert "index 1" in str(error.value)


def test_image_processor_truncated_file(image_processor, tmp_path):
    png_path = tmp_path / "truncated.png"
    PIL.Image.fromarray(make_image(0, 200, 200)).save(png_path)
    png_path.write_bytes(png_path.read_bytes()[:200])

    with pytest.raises(ValueError, match="could not be read") as error:
        image_processor(png_path)
    assert str(png_path) in str(error.value)


@pytest.mark.parametrize("bad_input", [5, b"bytes", torch.zeros(8, 8)])
def test_image_processor_unsupported_type(image_processor, bad_input):
    with pytest.raises(TypeError, match=type(bad_input).__name__):
        image_processor(bad_input)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 5, 6), dtype=np.uint8), "shape"),
        (np.zeros((2, 4, 5, 3), dtype=np.uint8), "shape"),
        (np.zeros((4, 5), dtype=bool), "dtype"),
        (np.full((4, 5), np.nan), "NaN"),
    ],
)
def test_image_processor_invalid_array(image_processor, array, message):
    with pytest.raises(ValueError, match=message):
        image_processor(array)


def test_image_processor_empty_list(image_processor):
    with pytest.raises(ValueError, match="empty"):
        image_processor([])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": {"shortest_edge": 224}},
        {"image_mean": [0.5]},
        {"image_std": [0.2, 0.0, 0.2]},
        {"crop_scale": (0.0, 1.0)},
        {"contrast_jitter": 1.5},
        {"rotation_degrees": -1},
    ],
)
def test_image_processor_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        RMTImageProcessor(**kwargs)


def test_image_processor_rectangular_size():
    pixel_values = RMTImageProcessor(size=(24, 40))(make_image(0))["pixel_values"]

    assert pixel_values.shape == (1, 3, 24, 40)


def test_image_processor_save_load_round_trip(tmp_path):
    original = RMTImageProcessor(size=48, rotation_degrees=5, contrast_jitter=0.1)
    original.save_pretrained(tmp_path)
    loaded = RMTImageProcessor.from_pretrained(tmp_path)

    assert (tmp_path / "preprocessor_config.json").is_file()
    assert loaded.to_dict() == original.to_dict()
    assert torch.equal(loaded(make_image(0))["pixel_values"], original(make_image(0))["pixel_values"])


# Processor: modality patterns and batching


@settings(max_examples=20, deadline=None)
@given(patterns=ROW_PATTERNS)
def test_processor_modality_mask_every_pattern(english_processor, patterns):
    images = [make_image(row) if has_image else None for row, (has_image, _) in enumerate(patterns)]
    texts = [ENGLISH_NOTE if has_text else None for _, has_text in patterns]
    batch = english_processor(images=images, text=texts)

    assert batch["modality_mask"].tolist() == [[int(has_image), int(has_text)] for has_image, has_text in patterns]
    assert batch["modality_mask"].dtype == torch.long
    for row, (has_image, _) in enumerate(patterns):
        if not has_image:
            assert torch.count_nonzero(batch["pixel_values"][row]) == 0


@settings(max_examples=20, deadline=None)
@given(patterns=ROW_PATTERNS, seeds=st.lists(st.integers(0, 1000), min_size=5, max_size=5))
def test_processor_rows_independent(english_processor, patterns, seeds):
    images = [make_image(seeds[row]) if has_image else None for row, (has_image, _) in enumerate(patterns)]
    texts = [ENGLISH_NOTE if has_text else None for _, has_text in patterns]
    batch = english_processor(images=images, text=texts)

    for row, image in enumerate(images):
        if image is not None:
            alone = english_processor(images=image)["pixel_values"][0]
            assert torch.equal(batch["pixel_values"][row], alone)


def test_processor_output_keys(english_processor):
    batch = english_processor(images=[make_image(0)], text=[ENGLISH_NOTE])

    assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values", "modality_mask"}
    assert set(batch.keys()) == set(english_processor.model_input_names)


def test_processor_shapes(english_processor):
    batch = english_processor(images=[make_image(0), None, make_image(1)], text=[None, ENGLISH_NOTE, "fever"])

    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 3
    assert batch["modality_mask"].shape == (3, 2)


def test_processor_single_items(english_processor):
    batch = english_processor(images=make_image(0), text=ENGLISH_NOTE)

    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["modality_mask"].tolist() == [[1, 1]]


def test_processor_images_omitted(english_processor):
    batch = english_processor(text=[ENGLISH_NOTE, "fever"])

    assert batch["modality_mask"].tolist() == [[0, 1], [0, 1]]
    assert torch.count_nonzero(batch["pixel_values"]) == 0
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_processor_text_omitted(english_processor):
    tokenizer = english_processor.tokenizer
    batch = english_processor(images=[make_image(0), make_image(1)])

    assert batch["modality_mask"].tolist() == [[1, 0], [1, 0]]
    assert batch["input_ids"].tolist() == [[tokenizer.cls_token_id, tokenizer.sep_token_id]] * 2


@pytest.mark.parametrize("blank_text", ["", "   ", "\n\t"])
def test_processor_blank_text_is_absent(english_processor, blank_text):
    tokenizer = english_processor.tokenizer
    batch = english_processor(images=[make_image(0)], text=[blank_text])

    assert batch["modality_mask"].tolist() == [[1, 0]]
    assert batch["input_ids"].tolist() == [[tokenizer.cls_token_id, tokenizer.sep_token_id]]


def test_processor_max_length_truncates(english_processor):
    batch = english_processor(text=[ENGLISH_NOTE], max_length=6)

    assert batch["input_ids"].shape == (1, 6)


def test_processor_numpy_output(english_processor):
    batch = english_processor(images=[make_image(0)], text=[ENGLISH_NOTE], return_tensors="np")

    assert isinstance(batch["pixel_values"], np.ndarray)
    assert isinstance(batch["modality_mask"], np.ndarray)
    assert isinstance(batch["input_ids"], np.ndarray)


def test_processor_do_augment(english_processor):
    image = make_image(9)
    plain = english_processor(images=[image])["pixel_values"]
    torch.manual_seed(3)
    augmented = english_processor(images=[image], do_augment=True)["pixel_values"]

    assert not torch.equal(augmented, plain)


# Processor: invalid input


def test_processor_rows_without_input(english_processor):
    with pytest.raises(ValueError, match=r"Rows \[1, 3\]"):
        english_processor(images=[make_image(0), None, None, None], text=[None, " ", ENGLISH_NOTE, None])


def test_processor_length_mismatch(english_processor):
    with pytest.raises(ValueError, match="images has 2 rows but text has 3"):
        english_processor(images=[make_image(0), None], text=["a", "b", "c"])


def test_processor_nothing_given(english_processor):
    with pytest.raises(ValueError, match="neither was given"):
        english_processor()


def test_processor_empty_batch(english_processor):
    with pytest.raises(ValueError, match="empty batch"):
        english_processor(images=[], text=[])


def test_processor_text_wrong_type(english_processor):
    with pytest.raises(TypeError, match="row 1"):
        english_processor(text=["fever", 42])


def test_processor_bad_image_names_row_and_path(english_processor, tmp_path):
    missing = tmp_path / "missing.png"

    with pytest.raises(ValueError, match="row 2") as error:
        english_processor(images=[make_image(0), None, missing], text=[None, "fever", None])
    assert str(missing) in str(error.value)


# Tokenization


def test_chinese_note_uses_real_vocabulary(chinese_processor, chinese_vocab_file):
    vocabulary = chinese_vocab_file.read_text(encoding="utf-8").splitlines()
    batch = chinese_processor(text=[CHINESE_NOTE])
    tokens = [vocabulary[token_id] for token_id in batch["input_ids"][0].tolist()]

    assert tokens[0] == "[CLS]"
    assert tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens
    assert tokens[1:4] == ["患", "者", "咳"]
    assert len(tokens) == len(CHINESE_NOTE) + 2


def test_chinese_tokenizer_from_vocab_folder(chinese_vocab_file):
    processor = RMTProcessor.from_text_model(chinese_vocab_file.parent, image_size=IMAGE_SIZE)
    input_ids = processor(text=CHINESE_NOTE)["input_ids"][0].tolist()

    assert processor.tokenizer.unk_token_id not in input_ids
    assert input_ids[0] == 101


def test_chinese_tokenizer_built_directly(chinese_vocab_file, image_processor):
    # transformers 5 builds BertTokenizer from `vocab=`. With `vocab_file=` alone it gets a 5-token vocabulary.
    processor = RMTProcessor(image_processor=image_processor, tokenizer=BertTokenizer(vocab=str(chinese_vocab_file)))
    input_ids = processor(text=CHINESE_NOTE)["input_ids"][0].tolist()

    assert processor.tokenizer.unk_token_id not in input_ids


def test_english_note_uses_minilm_vocabulary(english_processor, minilm_dir):
    vocabulary = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    batch = english_processor(text=[ENGLISH_NOTE])
    tokens = [vocabulary[token_id] for token_id in batch["input_ids"][0].tolist()]

    assert tokens[:3] == ["[CLS]", "cough", "for"]
    assert tokens[-1] == "[SEP]"
    assert "[UNK]" not in tokens


def test_mixed_language_batch(chinese_processor):
    batch = chinese_processor(images=[None, make_image(0)], text=[CHINESE_NOTE, "咳嗽"])

    assert batch["modality_mask"].tolist() == [[0, 1], [1, 1]]
    assert batch["attention_mask"][1].sum() == 4


# Saving and loading


def test_processor_save_load_round_trip(english_processor, tmp_path):
    images = [make_image(0), None, make_image(1)]
    texts = [None, ENGLISH_NOTE, "fever"]
    english_processor.save_pretrained(tmp_path)
    loaded = RMTProcessor.from_pretrained(tmp_path)
    expected = english_processor(images=images, text=texts)
    actual = loaded(images=images, text=texts)

    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_processor_from_pretrained_overrides_size(english_processor, tmp_path):
    english_processor.save_pretrained(tmp_path)
    loaded = RMTProcessor.from_pretrained(tmp_path, size=16)

    assert loaded.image_processor.size == {"height": 16, "width": 16}


def test_saved_folder_has_code_and_auto_map(english_processor, tmp_path):
    english_processor.save_pretrained(tmp_path)
    processor_config = json.loads((tmp_path / "processor_config.json").read_text())

    assert (tmp_path / "processing_rmt.py").is_file()
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_rmt.RMTProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == "processing_rmt.RMTImageProcessor"


def test_auto_processor_fresh_process(english_processor, tmp_path):
    saved_dir = tmp_path / "saved"
    images = [make_image(0), None]
    texts = [None, ENGLISH_NOTE]
    english_processor.save_pretrained(saved_dir)
    np.save(tmp_path / "image.npy", images[0])
    torch.save(dict(english_processor(images=images, text=texts)), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import numpy as np
        import torch
        from transformers import AutoImageProcessor, AutoProcessor

        processor = AutoProcessor.from_pretrained({str(saved_dir)!r}, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained({str(saved_dir)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "RMTProcessor", type(processor)
        assert type(image_processor).__name__ == "RMTImageProcessor", type(image_processor)
        image = np.load({str(tmp_path / "image.npy")!r})
        batch = processor(images=[image, None], text={texts!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key
        print("loaded", type(processor).__module__)
        """
    )
    # A fresh working directory keeps the repository's processing_rmt.py off sys.path, so the class
    # must come from the saved folder.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr
    assert "transformers_modules" in result.stdout


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0, 3)])
def test_empty_array_image_raises(image_processor, shape):
    with pytest.raises(ValueError, match="empty"):
        image_processor(np.zeros(shape, dtype=np.uint8))


def test_bare_vocabulary_tokenizer_truncates_to_512(chinese_vocab_file):
    processor = RMTProcessor.from_text_model(chinese_vocab_file, image_size=32)
    batch = processor(text=["咳嗽" * 2000])
    assert batch["input_ids"].shape == (1, 512)


def test_processor_without_pixel_values_marks_images_present(minilm_dir, tmp_path):
    from PIL import Image

    path = tmp_path / "xray.png"
    Image.fromarray(np.full((40, 40), 128, dtype=np.uint8)).save(path)
    processor = RMTProcessor.from_text_model(minilm_dir, image_size=32)
    images, texts = [str(path), None, str(path)], ["cough", "fever", None]
    full = processor(images=images, text=texts)
    without_pixels = processor(images=images, text=texts, return_pixel_values=False)
    assert "pixel_values" not in without_pixels
    for name in ("input_ids", "attention_mask", "modality_mask"):
        assert torch.equal(without_pixels[name], full[name]), name
