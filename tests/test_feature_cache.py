"""Tests of the on-disk image feature cache (feature_cache_rmt.py) and of its use in train_rmt.py."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from datasets_scripts.synthetic import make_synthetic_dataset
from feature_cache_rmt import ImageFeatureCache, image_content_digest
from modeling_rmt import RMTModel
from processing_rmt import RMTImageProcessor, RMTProcessor
from tests.conftest import REPO_ROOT
from tests.test_train import run_command, train_command
from tests.tiny import IMAGE_SIZE, random_batch, tiny_config, tiny_model

MODALITY_ROWS = ((1, 1), (1, 0), (0, 1))
HEAD_OUTPUTS = ("logits", "image_logits", "text_logits", "multimodal_logits")


def write_xray(path: Path, seed: int, shape: tuple[int, int] = (40, 48)) -> Path:
    """Write an 8-bit grayscale PNG of random content and return its path."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def new_cache(folder: Path, model=None, processor=None) -> ImageFeatureCache:
    return ImageFeatureCache(folder, model or tiny_model(), processor or RMTImageProcessor(size=IMAGE_SIZE))


@pytest.fixture(scope="module")
def xray_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("xrays")
    return [write_xray(folder / f"xray-{seed}.png", seed) for seed in range(4)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory, model, xray_files) -> ImageFeatureCache:
    cache = new_cache(tmp_path_factory.mktemp("cache"), model)
    cache.fill(xray_files, batch_size=3, show_progress=False)
    return cache


def outputs_from_pixels_and_features(model, cache: ImageFeatureCache, images: list, modality_mask, seed: int):
    """Run the model on the same rows twice: with processed pixels, and with features read from the cache."""
    batch = random_batch(len(images), 7, seed=seed, modality_mask=modality_mask)
    del batch["pixel_values"]
    image_rows = [row for row, image in enumerate(images) if image is not None]
    pixel_values = torch.zeros(len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
    image_features = torch.zeros(len(images), *cache.feature_shape)
    if image_rows:
        present = [images[row] for row in image_rows]
        pixel_values[image_rows] = cache.image_processor.preprocess(present)["pixel_values"]
        image_features[image_rows] = cache.load(present)
    with torch.no_grad():
        return model(**batch, pixel_values=pixel_values), model(**batch, image_features=image_features)


@settings(max_examples=12, deadline=None)
@given(rows=st.lists(st.sampled_from(MODALITY_ROWS), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_cached_logits_match_pixel_logits(model, filled_cache, xray_files, rows, seed):
    images = [xray_files[(row + seed) % len(xray_files)] if image else None for row, (image, _) in enumerate(rows)]
    from_pixels, from_features = outputs_from_pixels_and_features(model, filled_cache, images, torch.tensor(rows), seed)
    for name in HEAD_OUTPUTS:
        difference = (from_pixels[name] - from_features[name]).abs().max().item()
        assert difference <= 1e-5, f"{name} differ by {difference}"


def test_load_returns_float32_features_in_order(filled_cache, xray_files):
    features = filled_cache.load([xray_files[2], xray_files[0], xray_files[2]])
    assert features.dtype == torch.float32
    assert tuple(features.shape) == (3, *filled_cache.feature_shape)
    assert torch.equal(features[0], features[2])
    assert not torch.equal(features[0], features[1])


def test_fill_computes_duplicates_once(tmp_path, xray_files):
    copy = tmp_path / "copy-of-xray-0.png"
    shutil.copyfile(xray_files[0], copy)
    cache = new_cache(tmp_path / "cache")
    images = [xray_files[0], xray_files[1], xray_files[0], copy]
    assert cache.fill(images, show_progress=False) == 2
    assert cache.fill(images, show_progress=False) == 0
    assert copy in cache


@settings(max_examples=10, deadline=None)
@given(picks=st.lists(st.integers(0, 3), max_size=8))
def test_fill_counts_distinct_contents(model, picks):
    arrays = [np.full((20, 24), value, dtype=np.uint8) for value in (0, 60, 120, 250)]
    images = [arrays[pick] for pick in picks]
    with tempfile.TemporaryDirectory() as folder:
        cache = new_cache(Path(folder), model)
        assert cache.fill(images, show_progress=False) == len(set(picks))
        assert cache.fill(images, show_progress=False) == 0
        assert tuple(cache.load(images).shape) == (len(picks), *cache.feature_shape)


def test_rewritten_file_is_a_miss(tmp_path, model):
    path = write_xray(tmp_path / "xray.png", seed=1)
    cache = new_cache(tmp_path / "cache", model)
    cache.fill([path], show_progress=False)
    before = cache.load([path])

    write_xray(path, seed=2)
    assert path not in cache
    assert cache.fill([path], show_progress=False) == 1
    assert not torch.equal(cache.load([path]), before)


@pytest.mark.parametrize(
    "setting,value",
    [
        ("size", {"height": 48, "width": 48}),
        ("image_mean", [0.5, 0.5, 0.5]),
        ("image_std", [0.3, 0.3, 0.3]),
        ("resample", PIL.Image.Resampling.NEAREST),
    ],
)
def test_pixel_setting_change_is_a_miss(tmp_path, model, xray_files, setting, value):
    processor = RMTImageProcessor(size=IMAGE_SIZE)
    cache = new_cache(tmp_path, model, processor)
    cache.fill(xray_files[:1], show_progress=False)
    setattr(processor, setting, value)
    assert xray_files[0] not in cache
    assert cache.fill(xray_files[:1], show_progress=False) == 1


@pytest.mark.parametrize(
    "setting,value",
    [("do_augment", True), ("rotation_degrees", 30.0), ("crop_scale", [0.5, 1.0]), ("contrast_jitter", 0.5)],
)
def test_augmentation_setting_change_is_a_hit(tmp_path, model, xray_files, setting, value):
    processor = RMTImageProcessor(size=IMAGE_SIZE)
    cache = new_cache(tmp_path, model, processor)
    cache.fill(xray_files[:1], show_progress=False)
    setattr(processor, setting, value)
    assert xray_files[0] in cache


def test_saved_processor_shares_namespace(tmp_path, model):
    processor = RMTImageProcessor(size=IMAGE_SIZE)
    processor.save_pretrained(tmp_path / "processor")
    reloaded = RMTImageProcessor.from_pretrained(tmp_path / "processor")
    assert new_cache(tmp_path, model, reloaded).namespace_dir == new_cache(tmp_path, model, processor).namespace_dir


def image_encoder(model):
    return model.rmt.embeddings.image_encoder


@pytest.mark.parametrize("tensor_name", ["conv1.0.weight", "bn1.running_mean", "bn1.num_batches_tracked"])
def test_backbone_change_is_a_miss(tmp_path, xray_files, tensor_name):
    model = tiny_model()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    with torch.no_grad():
        image_encoder(model).backbone.state_dict(keep_vars=True)[tensor_name].add_(1)
    assert xray_files[0] not in cache
    assert cache.fill(xray_files[:1], show_progress=False) == 1


def test_batch_norm_statistics_update_is_a_miss(tmp_path, xray_files):
    model = tiny_model()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    with torch.no_grad():
        model.train()(**random_batch(4, 6, seed=0))
    assert xray_files[0] not in cache


def test_fill_detects_change_through_data(tmp_path, xray_files):
    model = tiny_model()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    with torch.no_grad():
        image_encoder(model).backbone.conv1[0].weight.data.mul_(2)
    assert cache.fill(xray_files[:1], show_progress=False) == 1


def test_loaded_weights_change_namespace(tmp_path, xray_files):
    model = tiny_model(seed=0)
    cache = new_cache(tmp_path, model)
    first = cache.namespace_dir
    original = {name: tensor.clone() for name, tensor in image_encoder(model).backbone.state_dict().items()}

    image_encoder(model).backbone.load_state_dict(image_encoder(tiny_model(seed=1)).backbone.state_dict())
    assert cache.namespace_dir != first
    image_encoder(model).backbone.load_state_dict(original)
    assert cache.namespace_dir == first


def test_projection_change_is_a_hit(tmp_path, xray_files):
    model = tiny_model()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    with torch.no_grad():
        image_encoder(model).projection.weight.add_(1)
    assert xray_files[0] in cache


def test_image_model_name_is_in_namespace(tmp_path):
    resnet = new_cache(tmp_path, tiny_model(image_model_name="resnet10t"))
    other = new_cache(tmp_path, tiny_model(image_model_name="resnet14t"))
    assert resnet.namespace()["image_model_name"] == "resnet10t"
    assert resnet.namespace_dir != other.namespace_dir


def test_deleted_cache_folder_is_recomputed(tmp_path, model, xray_files):
    cache = new_cache(tmp_path / "cache", model)
    cache.fill(xray_files, show_progress=False)
    before = cache.load(xray_files)

    shutil.rmtree(tmp_path / "cache")
    assert xray_files[0] not in cache
    with pytest.raises(KeyError):
        cache.load(xray_files)
    assert cache.fill(xray_files, show_progress=False) == len(xray_files)
    assert torch.equal(cache.load(xray_files), before)


def test_deleted_entry_is_recomputed(tmp_path, model, xray_files):
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files, show_progress=False)
    entries = sorted(cache.namespace_dir.glob("*.safetensors"))
    assert len(entries) == len(xray_files)

    entries[0].unlink()
    assert cache.fill(xray_files, show_progress=False) == 1


def test_corrupt_entry_is_recomputed(tmp_path, model, xray_files):
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    entry = next(cache.namespace_dir.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-8])

    assert xray_files[0] not in cache
    assert cache.fill(xray_files[:1], show_progress=False) == 1
    assert xray_files[0] in cache


def test_fill_leaves_no_temporary_files(tmp_path, model, xray_files):
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files, batch_size=2, show_progress=False)
    names = sorted(path.name for path in cache.namespace_dir.iterdir())
    assert "namespace.json" in names
    assert [name for name in names if name.startswith(".")] == []
    record = json.loads((cache.namespace_dir / "namespace.json").read_text())
    assert record["backbone_sha256"] == cache.backbone_digest()


def test_missing_entry_key_error_names_image(tmp_path, model, xray_files):
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    with pytest.raises(KeyError) as raised:
        cache.load([xray_files[0], xray_files[1], xray_files[2]])
    message = str(raised.value)
    assert repr(str(xray_files[1])) in message
    assert "and 1 more" in message
    assert "fill" in message


def test_missing_file_raises_value_error(tmp_path, model):
    missing = tmp_path / "nowhere.png"
    cache = new_cache(tmp_path / "cache", model)
    for call in (cache.fill, cache.load, lambda images: images[0] in cache):
        with pytest.raises(ValueError, match="nowhere.png' not found"):
            call([missing])


def test_unreadable_file_raises_value_error_on_fill(tmp_path, model):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cache = new_cache(tmp_path / "cache", model)
    with pytest.raises(ValueError, match=r"Image at index 1: .*broken.png"):
        cache.fill([np.zeros((20, 20), dtype=np.uint8), broken], show_progress=False)


@pytest.mark.parametrize(
    "image,error,message",
    [
        (None, ValueError, "Image at index 0 is None"),
        (np.full((8, 8), np.nan), ValueError, "NaN"),
        (np.zeros((8, 8, 2), dtype=np.uint8), ValueError, "shape"),
        (np.array([["a"]]), ValueError, "dtype"),
        (42, TypeError, "Unsupported image type int"),
    ],
)
def test_unusable_input_raises(tmp_path, model, image, error, message):
    cache = new_cache(tmp_path, model)
    with pytest.raises(error, match=message):
        cache.fill([image], show_progress=False)


def test_none_is_never_in_cache(filled_cache):
    assert None not in filled_cache


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32]),
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
    elements={"min_value": 0, "max_value": 200},
)


@settings(max_examples=25, deadline=None)
@given(array=ARRAYS)
def test_array_digest_follows_content(array):
    assert image_content_digest(array) == image_content_digest(array.copy())
    changed = array.copy()
    changed.flat[0] = 201
    assert image_content_digest(changed) != image_content_digest(array)


def test_array_digest_separates_dtype_and_shape():
    values = np.arange(12, dtype=np.uint8)
    assert image_content_digest(values.reshape(3, 4)) != image_content_digest(values.reshape(4, 3))
    assert image_content_digest(values.reshape(3, 4)) != image_content_digest(values.reshape(3, 4).astype(np.int8))


def test_palette_image_digest_includes_palette():
    indices = np.arange(16, dtype=np.uint8).reshape(4, 4)
    first = PIL.Image.fromarray(indices, mode="P")
    first.putpalette([value for index in range(256) for value in (index, index, index)])
    second = first.copy()
    second.putpalette([value for index in range(256) for value in (255 - index,) * 3])
    assert image_content_digest(first) != image_content_digest(second)


def test_fill_restores_model_mode(tmp_path, xray_files):
    model = tiny_model().train()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:2], show_progress=False)
    assert all(module.training for module in model.modules())

    model.eval()
    cache.fill(xray_files[2:], show_progress=False)
    assert not any(module.training for module in model.modules())


def test_fill_uses_eval_mode_batch_norm(tmp_path, xray_files):
    model = tiny_model().train()
    cache = new_cache(tmp_path, model)
    cache.fill(xray_files, show_progress=False)
    pixel_values = cache.image_processor.preprocess(xray_files)["pixel_values"]
    with torch.no_grad():
        expected = image_encoder(model.eval()).image_features(pixel_values)
    assert torch.allclose(cache.load(xray_files), expected, atol=1e-6)


def test_accepts_rmt_model_and_processor(tmp_path, xray_files, minilm_dir):
    torch.manual_seed(0)
    base_model = RMTModel(tiny_config())
    processor = RMTProcessor.from_text_model(minilm_dir, image_size=IMAGE_SIZE)
    cache = ImageFeatureCache(tmp_path, base_model, processor)
    assert cache.fill(xray_files[:1], show_progress=False) == 1
    assert cache.image_processor is processor.image_processor


def test_rejects_other_model_types(tmp_path):
    with pytest.raises(TypeError, match="RMTForMultimodalClassification or an RMTModel"):
        ImageFeatureCache(tmp_path, torch.nn.Linear(2, 2), RMTImageProcessor())


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in image_encoder(model).backbone.state_dict().items()}


@pytest.mark.parametrize("image_input", ["pixel_values", "image_features"])
def test_frozen_training_step_keeps_backbone(image_input):
    model = tiny_model(freeze_image_backbone=True).train()
    backbone_before = backbone_state(model)
    projection_before = image_encoder(model).projection.weight.detach().clone()
    batch = random_batch(4, 6, seed=0)
    if image_input == "image_features":
        with torch.no_grad():
            batch["image_features"] = image_encoder(model).image_features(batch.pop("pixel_values"))

    optimizer = torch.optim.SGD([parameter for parameter in model.parameters() if parameter.requires_grad], lr=0.1)
    model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()

    for name, tensor in image_encoder(model).backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), f"backbone {name} changed"
    assert not torch.equal(image_encoder(model).projection.weight, projection_before)


def collator_records(dataset_dir: Path, augment: bool, hidden_modality: str | None) -> list[dict]:
    """Return 8 training records as `with_view` gives them; hiding a modality keeps only samples with the other."""
    records = []
    for line in (dataset_dir / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        image = str(dataset_dir / record["image"]) if record["image"] else None
        text = record["text"] or None
        if (hidden_modality == "image" and text is None) or (hidden_modality == "text" and image is None):
            continue
        label = 0 if record["label"] == "mild" else 1
        records.append(
            {
                "id": record["id"],
                "label": label,
                "image": image,
                "text": text,
                "augment": augment,
                "hidden_modality": hidden_modality,
            }
        )
    return records[:8]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(data_dir, num_samples=60, image_size=32, seed=1)
    return data_dir


@pytest.mark.parametrize("hidden_modality", [None, "image", "text"])
def test_collator_reads_cache_without_augmentation(tmp_path, synthetic_dir, minilm_dir, hidden_modality):
    from train_rmt import RMTDataCollator

    processor = RMTProcessor.from_text_model(minilm_dir, image_size=IMAGE_SIZE)
    records = collator_records(synthetic_dir, augment=False, hidden_modality=hidden_modality)
    cache = ImageFeatureCache(tmp_path, tiny_model(), processor)
    cache.fill([record["image"] for record in records if record["image"]], show_progress=False)

    from_pixels = RMTDataCollator(processor, max_seq_length=32)(records)
    from_cache = RMTDataCollator(processor, max_seq_length=32, feature_cache=cache)(records)
    assert "pixel_values" not in from_cache
    assert set(from_cache) == set(from_pixels) - {"pixel_values"} | {"image_features"}
    for name in ("input_ids", "attention_mask", "modality_mask", "labels"):
        assert torch.equal(from_cache[name], from_pixels[name]), name
    absent = from_cache["modality_mask"][:, 0] == 0
    assert torch.count_nonzero(from_cache["image_features"][absent]) == 0


def test_collator_reads_pixels_when_augmented(tmp_path, synthetic_dir, minilm_dir):
    from train_rmt import RMTDataCollator

    processor = RMTProcessor.from_text_model(minilm_dir, image_size=IMAGE_SIZE)
    records = collator_records(synthetic_dir, augment=True, hidden_modality=None)
    cache = ImageFeatureCache(tmp_path, tiny_model(), processor)
    batch = RMTDataCollator(processor, max_seq_length=32, feature_cache=cache)(records)
    assert "pixel_values" in batch
    assert "image_features" not in batch


def evaluation_metrics(output_dir: Path) -> dict[str, float]:
    """Return the evaluation and calibration results of a train_rmt run, without its timings."""
    results = json.loads((output_dir / "all_results.json").read_text())
    return {
        key: value
        for key, value in results.items()
        if key.startswith(("validation_", "test_", "temperature_")) and not key.endswith(("_runtime", "_per_second"))
    }


def assert_same_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(actual) == sorted(expected)
    assert any(key.endswith("_roc_auc") for key in expected)
    assert any(key.startswith("temperature_") for key in expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-5), key


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory, synthetic_dir, minilm_dir) -> dict[str, tuple[Path, object]]:
    """Train with a frozen CNN and no augmentation, once from pixels and once with the feature cache."""
    root = tmp_path_factory.mktemp("frozen")
    frozen = (
        "--num_train_epochs", "2", "--save_strategy", "no", "--calibrate",
        "--freeze_image_backbone", "--augment", "false",
    )  # fmt: skip
    runs = {}
    for name, cache_args in (("pixels", ()), ("cache", ("--image_feature_cache", str(root / "cache")))):
        output_dir = root / name
        result = run_command(train_command(synthetic_dir, output_dir, minilm_dir, *frozen, *cache_args), root)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = (output_dir, result)
    return runs


def test_train_with_cache_matches_pixels(frozen_runs):
    pixels_dir, _ = frozen_runs["pixels"]
    cache_dir, _ = frozen_runs["cache"]
    assert_same_metrics(evaluation_metrics(cache_dir), evaluation_metrics(pixels_dir))


def test_train_with_cache_fills_every_split(frozen_runs, synthetic_dir):
    cache_dir, result = frozen_runs["cache"]
    images = {
        json.loads(line)["image"]
        for split in ("train", "validation", "test")
        for line in (synthetic_dir / f"{split}.jsonl").read_text().splitlines()
    } - {None}
    summary = f"{len(images)} images of the train, validation, test split(s), {len(images)} newly computed"
    assert summary in result.stdout
    entries = list((cache_dir.parent / "cache").glob("*/*.safetensors"))
    assert len(entries) == len(images)


def test_evaluation_cache_without_frozen_backbone(frozen_runs, synthetic_dir, tmp_path):
    pixels_dir, _ = frozen_runs["pixels"]
    output_dir = tmp_path / "evaluation"
    command = [
        sys.executable, str(REPO_ROOT / "train_rmt.py"),
        "--model_name_or_path", str(pixels_dir),
        "--validation_file", str(synthetic_dir / "validation.jsonl"),
        "--test_file", str(synthetic_dir / "test.jsonl"),
        "--max_seq_length", "32", "--per_device_eval_batch_size", "16",
        "--output_dir", str(output_dir), "--do_eval", "--do_predict", "--calibrate", "--report_to", "none",
        "--image_feature_cache", str(pixels_dir.parent / "cache"),
    ]  # fmt: skip
    result = run_command(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 newly computed" in result.stdout
    assert_same_metrics(evaluation_metrics(output_dir), evaluation_metrics(pixels_dir))


def test_train_rejects_cache_without_frozen_backbone(synthetic_dir, minilm_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    command = train_command(synthetic_dir, tmp_path / "out", minilm_dir, "--image_feature_cache", str(cache_dir))
    result = run_command(command, tmp_path)
    assert result.returncode != 0
    assert "--image_feature_cache needs --freeze_image_backbone when training" in result.stderr
    assert not cache_dir.exists()


def test_resumed_checkpoint_refills_cache(synthetic_dir, minilm_dir, tmp_path):
    output_dir = tmp_path / "model"
    frozen = ("--freeze_image_backbone", "--augment", "false", "--do_eval", "false", "--do_predict", "false")
    first = train_command(synthetic_dir, output_dir, minilm_dir, *frozen, "--max_steps", "2", "--save_steps", "2")
    result = run_command(first, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Another seed builds another random CNN, so the cache is first filled for weights that the resumed
    # checkpoint then replaces.
    resumed = train_command(
        synthetic_dir, output_dir, minilm_dir, *frozen, "--max_steps", "3", "--save_strategy", "no",
        "--image_feature_cache", str(tmp_path / "cache"),
    )  # fmt: skip
    resumed[resumed.index("--seed") + 1] = "1"
    result = run_command(resumed, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    namespaces = [path for path in (tmp_path / "cache").iterdir() if path.is_dir()]
    assert len(namespaces) == 2


def test_auto_processor_accepted(tmp_path, xray_files, minilm_dir):
    from transformers import AutoModelForSequenceClassification, AutoProcessor

    folder = tmp_path / "model"
    tiny_model(seed=1).save_pretrained(folder)
    RMTProcessor.from_text_model(minilm_dir, image_size=IMAGE_SIZE).save_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__ != RMTProcessor.__module__

    cache = ImageFeatureCache(tmp_path / "cache", model, processor)
    assert cache.fill(xray_files[:2], show_progress=False) == 2
    local = ImageFeatureCache(tmp_path / "cache", model, RMTProcessor.from_pretrained(folder))
    assert local.namespace_dir == cache.namespace_dir


def test_non_finite_entry_is_recomputed(tmp_path, model, xray_files):
    from safetensors.torch import load_file, save_file

    cache = new_cache(tmp_path, model)
    cache.fill(xray_files[:1], show_progress=False)
    entry = next(cache.namespace_dir.glob("*.safetensors"))
    tensors = load_file(entry)
    save_file({name: torch.full_like(tensor, float("nan")) for name, tensor in tensors.items()}, entry)

    assert xray_files[0] not in cache
    assert cache.fill(xray_files[:1], show_progress=False) == 1
    assert torch.isfinite(cache.load(xray_files[:1])).all()


def test_library_versions_in_namespace(tmp_path, model, monkeypatch):
    import timm

    cache = new_cache(tmp_path, model)
    before = cache.namespace_dir
    monkeypatch.setattr(timm, "__version__", "0.0.0")
    assert cache.namespace_dir != before


def test_cache_folder_that_is_a_file_raises(tmp_path, model):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="exists but is not a folder"):
        new_cache(path, model)


@pytest.mark.parametrize("method", ["fill", "load"])
def test_single_image_not_list_raises(filled_cache, xray_files, method):
    with pytest.raises(TypeError, match="Expected a list of images, got one"):
        getattr(filled_cache, method)(str(xray_files[0]))


def test_train_arguments_reject_file_as_cache(tmp_path):
    from train_rmt import DataArguments

    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="--image_feature_cache .* is not a folder"):
        DataArguments(train_file="train.jsonl", image_feature_cache=str(path))


@pytest.mark.parametrize("checkpoint_frozen, run_frozen", [(False, True), (True, False)])
def test_resume_freeze_mismatch_raises(tmp_path, checkpoint_frozen, run_frozen):
    from train_rmt import ModelArguments, check_resume_freeze

    (tmp_path / "config.json").write_text(json.dumps({"freeze_image_backbone": checkpoint_frozen}))
    with pytest.raises(ValueError, match=f"trained with freeze_image_backbone={checkpoint_frozen}"):
        check_resume_freeze(str(tmp_path), ModelArguments(freeze_image_backbone=run_frozen))
    check_resume_freeze(str(tmp_path), ModelArguments(freeze_image_backbone=checkpoint_frozen))


@pytest.mark.parametrize("do_predict, expected", [(True, ["validation", "test"]), (False, ["validation"])])
def test_test_split_needs_do_predict(tmp_path, do_predict, expected):
    import datasets
    from transformers import TrainingArguments

    from train_rmt import DataArguments, cached_splits

    splits = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"image": [None]}) for name in ("train", "validation", "test")}
    )
    training_args = TrainingArguments(output_dir=str(tmp_path), do_train=False, do_predict=do_predict, report_to="none")
    assert cached_splits(DataArguments(train_file="train.jsonl"), training_args, splits) == expected
