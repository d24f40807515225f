"""The image-text-classification pipeline: inputs, routing to heads, temperatures, fresh-process loading."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline_rmt import (
    CUSTOM_PIPELINES,
    PIPELINE_TASK,
    RMTPipeline,
    routed_head,
    normalize_input,
    pair_images_and_text,
)
from tests.checkpoints import save_tiny_checkpoint, tiny_classifier, tiny_processor, write_synthetic_xray

NOTE = "Progressive dyspnea, oxygen saturation 86% on room air."
ANSWER_KEYS = {"label", "score", "probabilities", "head"}


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> Path:
    return write_synthetic_xray(tmp_path_factory.mktemp("xray") / "xray.png")


@pytest.fixture(scope="module")
def classifier(minilm_dir) -> RMTPipeline:
    return RMTPipeline(model=tiny_classifier(), processor=tiny_processor(minilm_dir), device="cpu")


def test_normalize_input_blank_text_is_absent():
    assert normalize_input({"image": "a.png", "text": "   "}) == {"image": "a.png", "text": None}


@pytest.mark.parametrize(
    "item,error,message",
    [
        ({"image": None, "text": " "}, ValueError, "neither an image nor a non-blank text"),
        ({"img": "a.png"}, ValueError, r"unknown keys \['img'\]"),
        ("a.png", TypeError, "bare string"),
        ({"text": 3}, TypeError, "text has type int"),
        (42, TypeError, "has type int"),
    ],
)
def test_normalize_input_rejects_bad_item(item, error, message):
    with pytest.raises(error, match=message):
        normalize_input(item, index=2)


def test_pair_images_and_text_batches_lists():
    pairs = pair_images_and_text(["a.png", None], [None, "cough"])
    assert pairs == [{"image": "a.png", "text": None}, {"image": None, "text": "cough"}]


def test_pair_images_and_text_fills_omitted_side():
    assert pair_images_and_text(None, ["x", "y"]) == [{"image": None, "text": "x"}, {"image": None, "text": "y"}]


def test_pair_images_and_text_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="images has 2 entries but text has 1"):
        pair_images_and_text(["a.png", "b.png"], ["x"])


@pytest.mark.parametrize(
    "mask,use_multitask,head",
    [
        ((1, 0), True, "image"),
        ((0, 1), True, "text"),
        ((1, 1), True, "multimodal"),
        ((1, 0), False, "multimodal"),
        ((0, 1), False, "multimodal"),
    ],
)
def test_routed_head_follows_modality_mask(mask, use_multitask, head):
    assert routed_head(torch.tensor(mask), use_multitask) == head


def test_pipeline_answers_with_matching_head(classifier, xray):
    assert classifier({"image": xray})["head"] == "image"
    assert classifier({"text": NOTE})["head"] == "text"
    assert classifier({"image": xray, "text": NOTE})["head"] == "multimodal"


def test_pipeline_answer_has_every_label(classifier, xray):
    answer = classifier({"image": xray, "text": NOTE})
    assert set(answer) == ANSWER_KEYS
    assert list(answer["probabilities"]) == ["mild", "severe"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert answer["score"] == max(answer["probabilities"].values())
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)


def test_pipeline_matches_model_logits(classifier, xray):
    answer = classifier({"image": xray, "text": NOTE})
    batch = classifier.processor(images=[xray], text=[NOTE], max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**batch).logits[0]
    expected = torch.softmax(logits, dim=-1).tolist()
    assert list(answer["probabilities"].values()) == pytest.approx(expected, abs=1e-5)


def test_pipeline_keyword_batch_matches_dicts(classifier, xray):
    by_keywords = classifier(images=[xray, None, xray], text=[None, NOTE, NOTE])
    by_dicts = classifier([{"image": xray}, {"text": NOTE}, {"image": xray, "text": NOTE}])
    assert [answer["head"] for answer in by_keywords] == ["image", "text", "multimodal"]
    for keyword_answer, dict_answer in zip(by_keywords, by_dicts, strict=True):
        assert keyword_answer["probabilities"] == pytest.approx(dict_answer["probabilities"], abs=1e-6)


def test_pipeline_batch_size_gives_same_answers(classifier, xray):
    inputs = [{"image": xray}, {"text": NOTE}, {"image": xray, "text": "mild cough"}]
    one_at_a_time = classifier(inputs, batch_size=1)
    batched = classifier(inputs, batch_size=3)
    for single, grouped in zip(one_at_a_time, batched, strict=True):
        assert grouped["head"] == single["head"]
        assert grouped["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_pipeline_accepts_image_objects(classifier, xray):
    import numpy as np
    import PIL.Image

    from_path = classifier({"image": xray})
    with PIL.Image.open(xray) as image:
        from_pil = classifier(image)
        from_array = classifier({"image": np.asarray(image)})
    assert from_pil["probabilities"] == pytest.approx(from_path["probabilities"], abs=1e-6)
    assert from_array["probabilities"] == pytest.approx(from_path["probabilities"], abs=1e-6)


def test_pipeline_reads_dicom_path(classifier, tmp_path):
    pytest.importorskip("pydicom")
    from tests.test_dicom import STORED_VALUES, make_dataset, write_dicom

    path = write_dicom(tmp_path / "study.dcm", make_dataset(STORED_VALUES, WindowCenter=2000, WindowWidth=2000))
    assert classifier({"image": str(path), "text": NOTE})["head"] == "multimodal"


def test_pipeline_applies_head_temperature(minilm_dir):
    model = tiny_classifier(temperatures={"text": 3.0})
    classifier = RMTPipeline(model=model, processor=tiny_processor(minilm_dir), device="cpu")
    answer = classifier({"text": NOTE})

    batch = classifier.processor(text=[NOTE], max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0]
    expected = torch.softmax(logits / 3.0, dim=-1).tolist()
    assert list(answer["probabilities"].values()) == pytest.approx(expected, abs=1e-5)


INPUT_MODALITIES = {"image": ("image",), "text": ("text",), "image+text": ("image", "text")}
MODEL_VARIANTS = {
    "per_task": {},
    "fused": {"attention_strategy": "fused"},
    "no_mask_attention": {"use_mask_attention": False},
    "no_multitask": {"use_multitask": False},
}
HEAD_TEMPERATURES = {"image": 2.0, "text": 3.0, "multimodal": 0.5}


def pipeline_input(modalities: str, xray: Path) -> dict:
    values = {"image": xray, "text": NOTE}
    return {modality: values[modality] for modality in INPUT_MODALITIES[modalities]}


def full_forward_result(model, processor, item: dict) -> dict:
    """Compute the expected pipeline result from a forward pass that computes every head."""
    batch = processor(images=[item.get("image")], text=[item.get("text")], max_length=64, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**batch)
    assert outputs.image_logits is not None
    head = routed_head(batch["modality_mask"][0], model.config.use_multitask)
    probabilities = torch.softmax(outputs.logits[0] / model.config.temperatures[head], dim=-1).tolist()
    return {"head": head, "probabilities": dict(zip(["mild", "severe"], probabilities))}


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
@pytest.mark.parametrize("modalities", list(INPUT_MODALITIES))
def test_pipeline_matches_full_forward(minilm_dir, xray, variant, modalities):
    model = tiny_classifier(temperatures=HEAD_TEMPERATURES, **MODEL_VARIANTS[variant])
    processor = tiny_processor(minilm_dir)
    item = pipeline_input(modalities, xray)

    result = RMTPipeline(model=model, processor=processor, device="cpu")(item)
    expected = full_forward_result(model, processor, item)

    assert result["head"] == expected["head"]
    assert result["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert result["label"] == max(expected["probabilities"], key=expected["probabilities"].get)


def count_encoder_calls(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = []
    handle = model.rmt.encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


def test_full_forward_runs_three_passes(classifier, xray):
    batch = classifier.processor(images=[xray], text=[NOTE], max_length=64, return_tensors="pt")
    calls, handle = count_encoder_calls(classifier.model)
    try:
        with torch.no_grad():
            classifier.model(**batch)
    finally:
        handle.remove()
    assert len(calls) == 3


@pytest.mark.parametrize("modalities", list(INPUT_MODALITIES))
def test_pipeline_runs_encoder_once(classifier, xray, modalities):
    assert classifier.model.config.attention_strategy == "per_task"
    calls, handle = count_encoder_calls(classifier.model)
    try:
        classifier(pipeline_input(modalities, xray))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_pipeline_rejects_inputs_and_keywords_together(classifier, xray):
    with pytest.raises(ValueError, match="not both"):
        classifier({"image": xray}, text=NOTE)


def test_pipeline_error_names_bad_input(classifier, xray):
    with pytest.raises(ValueError, match="Input 1 has neither"):
        classifier([{"image": xray}, {"text": ""}])


def test_save_pretrained_writes_custom_pipeline(tmp_path, minilm_dir):
    folder = save_tiny_checkpoint(tmp_path / "model", minilm_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert (folder / "pipeline_rmt.py").is_file()


def test_processor_loads_without_prompt(tmp_path, minilm_dir, monkeypatch):
    from processing_rmt import RMTProcessor

    folder = save_tiny_checkpoint(tmp_path / "model", minilm_dir)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")

    processor = RMTProcessor.from_pretrained(folder)
    assert prompts == []
    assert processor.tokenizer.tokenize("cough") == ["cough"]


FRESH_PROCESS_PIPELINE = textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    folder, image, note, task = sys.argv[1:5]
    classifier = pipeline(task, model=folder, trust_remote_code=True, device="cpu")
    inferred = pipeline(model=folder, trust_remote_code=True, device="cpu")
    answers = {
        "image": classifier({"image": image}),
        "text": classifier({"text": note}),
        "complete": classifier({"image": image, "text": note}),
        "batch": classifier(images=[image, None, image], text=[None, note, note], batch_size=2),
        "inferred_task": inferred.task,
        "class": type(classifier).__name__,
    }
    print(json.dumps(answers))
    """
)


def test_pipeline_loads_in_fresh_process(tmp_path, minilm_dir, xray):
    folder = save_tiny_checkpoint(tmp_path / "model", minilm_dir)
    script = tmp_path / "classify.py"
    script.write_text(FRESH_PROCESS_PIPELINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(xray), NOTE, PIPELINE_TASK],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])

    assert answers["class"] == "RMTPipeline"
    assert answers["inferred_task"] == PIPELINE_TASK
    assert answers["image"]["head"] == "image"
    assert answers["text"]["head"] == "text"
    assert answers["complete"]["head"] == "multimodal"
    assert [answer["head"] for answer in answers["batch"]] == ["image", "text", "multimodal"]
    assert set(answers["complete"]) == ANSWER_KEYS
    assert answers["batch"][2]["probabilities"] == pytest.approx(answers["complete"]["probabilities"], abs=1e-5)
