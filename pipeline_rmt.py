"""Inference pipeline for RMT: a chest X-ray, a clinical note or both in, a severity label out.

    from transformers import pipeline

    classifier = pipeline("image-text-classification", model="path/to/rmt", trust_remote_code=True)
    classifier({"image": "patient.dcm", "text": "Fever and cough for three days."})
    classifier(images=["a.png", None], text=[None, "Dyspnea, SpO2 88%."])

Each result is `{"label", "score", "probabilities", "head"}`. `head` names the RMT head whose logits
were used: "image" for an X-ray alone, "text" for a note alone, "multimodal" for both (always "multimodal"
when the model was trained with `use_multitask=False`). Probabilities are `softmax(logits / T)`, with
`T` the temperature of that head in `config.temperatures` (1.0 unless the model was calibrated).

This file is carried with checkpoints to the Hugging Face Hub: `modeling_rmt.py` imports it, so
`save_pretrained` copies it beside the model and writes `custom_pipelines` into `config.json`.
It imports only public libraries.
"""

import os
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import AutoModelForSequenceClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

PIPELINE_TASK = "image-text-classification"

# The `custom_pipelines` entry of config.json. `pipeline()` resolves "impl" inside the checkpoint folder
# and looks up each "pt" name on the `transformers` module.
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": "pipeline_rmt.RMTPipeline",
        "pt": ["AutoModelForSequenceClassification"],
        "type": "multimodal",
    }
}

INPUT_KEYS = ("image", "text")
IMAGE_PRESENT, TEXT_PRESENT = 0, 1

# Objects taken as an image-only input when passed without a dict. Paths are not among them, because a
# bare string could be either an image path or a note.
_IMAGE_OBJECT_TYPES = (PIL.Image.Image, np.ndarray)


def _is_image_object(value: Any) -> bool:
    """Return True for a PIL image, a numpy array or a pydicom Dataset."""
    if isinstance(value, _IMAGE_OBJECT_TYPES):
        return True
    return type(value).__module__.startswith("pydicom") and type(value).__name__ in ("Dataset", "FileDataset")


def _is_text_present(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def normalize_input(item: Any, index: int | None = None) -> dict[str, Any]:
    """Turn one pipeline input into `{"image": image or None, "text": str or None}`.

    Accepts a dict with the keys "image" and/or "text", or an image object (PIL image, numpy array,
    pydicom Dataset) for an image-only input. Blank text counts as absent.

    Raises:
        ValueError: unknown dict keys, or neither an image nor a non-blank text.
        TypeError: a bare string or path (ambiguous between an image path and a note), a text that is
            not a string, or any other type.
    """
    where = "Input" if index is None else f"Input {index}"
    if _is_image_object(item):
        item = {"image": item}
    if isinstance(item, (str, os.PathLike)):
        raise TypeError(
            f"{where} is a bare string or path, which could be an image path or a note. "
            'Pass {"image": path} or {"text": note}, or call the pipeline with images=... and/or text=....'
        )
    if not isinstance(item, dict):
        raise TypeError(
            f"{where} has type {type(item).__name__}. Expected a dict with 'image' and/or 'text', "
            "or an image (PIL image, numpy array, pydicom Dataset)."
        )

    unknown = sorted(set(item) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}. The accepted keys are {list(INPUT_KEYS)}.")
    image = item.get("image")
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"{where}: text has type {type(text).__name__}. Expected str or None.")
    if image is None and not _is_text_present(text):
        raise ValueError(f"{where} has neither an image nor a non-blank text. Give at least one of them.")
    return {"image": image, "text": text if _is_text_present(text) else None}


def pair_images_and_text(images: Any, text: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """Zip the `images=` and `text=` arguments into one input dict, or a list of them for lists.

    A list or tuple on either side means a batch; the other side is then a list of the same length or
    omitted (None). Raises ValueError for lengths that differ, or when both are omitted.
    """
    if images is None and text is None:
        raise ValueError("The pipeline needs inputs, images=..., text=... or both images and text.")
    images_is_batch = isinstance(images, (list, tuple))
    text_is_batch = isinstance(text, (list, tuple))
    if not images_is_batch and not text_is_batch:
        return {"image": images, "text": text}

    if images is None:
        images = [None] * len(text)
    if text is None:
        text = [None] * len(images)
    if not (isinstance(images, (list, tuple)) and isinstance(text, (list, tuple))):
        raise ValueError(
            "Pass images and text both as lists (one entry per input, None where absent) or both as single values."
        )
    if len(images) != len(text):
        raise ValueError(
            f"images has {len(images)} entries but text has {len(text)}. Pass one entry per input, "
            "with None where a modality is absent."
        )
    return [{"image": image, "text": note} for image, note in zip(images, text)]


def routed_head(modality_mask: torch.Tensor, use_multitask: bool) -> str:
    """Return the head whose logits the model routes to a sample with this `(2,)` modality mask.

    The mask columns are (image present, text present), and the rule is the one of `route_logits` in
    modeling_rmt.py.
    """
    if not use_multitask:
        return "multimodal"
    has_image = bool(modality_mask[IMAGE_PRESENT])
    has_text = bool(modality_mask[TEXT_PRESENT])
    if has_image and has_text:
        return "multimodal"
    return "image" if has_image else "text"


class RMTPipeline(Pipeline):
    """Pipeline for `RMTForMultimodalClassification`: severity from a chest X-ray and/or a clinical note.

    Inputs: one dict `{"image": ..., "text": ...}` (either key may be missing or None), an image object,
    a list of those, or the keywords `images=` and `text=` (single values or equal-length lists).
    Images are file paths (PNG, JPEG, 16-bit PNG, DICOM), PIL images, numpy arrays or pydicom Datasets.

    Call arguments:
        max_length (`int`, *optional*): maximum note length in tokens, CLS and SEP included. Defaults
            to the smaller of the tokenizer's `model_max_length` and the encoder's position count.
        batch_size (`int`, *optional*): samples per forward pass, as in every transformers pipeline.

    Returns, per input, a dict with
        - label (`str`): the most probable label;
        - score (`float`): its probability;
        - probabilities (`dict[str, float]`): the probability of every label, in class-id order;
        - head (`str`): "image", "text" or "multimodal", the head whose logits were used.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __call__(self, inputs: Any = None, *, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        """Classify one input or a list of inputs; see the class docstring for the accepted forms."""
        if inputs is None:
            inputs = pair_images_and_text(images, text)
        elif images is not None or text is not None:
            raise ValueError("Pass either the inputs argument or images=/text=, not both.")

        if isinstance(inputs, tuple):
            inputs = list(inputs)
        if isinstance(inputs, list):
            if not inputs:
                raise ValueError("The pipeline received an empty list of inputs.")
            inputs = [normalize_input(item, index) for index, item in enumerate(inputs)]
        elif isinstance(inputs, dict) or _is_image_object(inputs) or isinstance(inputs, (str, os.PathLike)):
            inputs = normalize_input(inputs)
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, max_length: int | None = None) -> tuple[dict, dict, dict]:
        preprocess_params = {}
        if max_length is not None:
            preprocess_params["max_length"] = max_length
        return preprocess_params, {}, {}

    def _default_max_length(self) -> int:
        """Return the longest note the encoder can place: its position count caps the text side."""
        positions = self.model.config.text_config.max_position_embeddings
        return min(self.processor.tokenizer.model_max_length, positions)

    def preprocess(self, inputs: Any, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Turn one input into model inputs with a batch dimension of 1."""
        item = normalize_input(inputs)
        return dict(
            self.processor(
                images=[item["image"]],
                text=[item["text"]],
                padding=True,
                truncation=True,
                max_length=max_length or self._default_max_length(),
                return_tensors="pt",
            )
        )

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the model; return the routed `logits` (B, num_labels) and the `modality_mask` (B, 2).

        `postprocess` reads only the routed logits, so the model computes each sample's routed head alone
        (`routed_only=True`). With per-task mask attention, a complete sample then skips the image-side
        and text-side encoder passes.
        """
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(self.model.dtype)
        outputs = self.model(**model_inputs, routed_only=True)
        return {"logits": outputs.logits, "modality_mask": model_inputs["modality_mask"]}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Turn the logits of one sample into its label, probabilities and the name of the head used."""
        config = self.model.config
        head = routed_head(model_outputs["modality_mask"][0], getattr(config, "use_multitask", True))
        temperature = (getattr(config, "temperatures", None) or {}).get(head, 1.0)
        probabilities = torch.softmax(model_outputs["logits"][0].float() / temperature, dim=-1)

        best = int(probabilities.argmax())
        return {
            "label": config.id2label[best],
            "score": float(probabilities[best]),
            "probabilities": {config.id2label[index]: float(p) for index, p in enumerate(probabilities)},
            "head": head,
        }


def _register() -> None:
    """Add the task to transformers' registry once per process, for `pipeline()` without `custom_pipelines`."""
    if PIPELINE_TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK,
        pipeline_class=RMTPipeline,
        pt_model=AutoModelForSequenceClassification,
        type="multimodal",
    )


_register()

__all__ = ["CUSTOM_PIPELINES", "PIPELINE_TASK", "RMTPipeline", "routed_head", "normalize_input"]
