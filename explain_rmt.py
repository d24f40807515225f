#!/usr/bin/env python
"""Explanations of RMT predictions: Grad-CAM over the X-ray, attention maps and text token attributions.

- Grad-CAM: the gradient of one head's logit with respect to the output of the CNN's last stage, averaged
  over space, weights that stage's channels. The ReLU of the weighted sum, upsampled to the X-ray, is the
  heatmap. It is computed for the image head (the X-ray alone) and for the multimodal head (X-ray and
  text), whose gradient reaches the CNN through the image embeddings and the encoder.
- Attention map: the attention weights of one layer and head of the joint (multimodal) encoder pass, with
  every query and key labeled as the multimodal CLS, the image CLS, an image embedding or a text token.
  It needs the eager attention, which these functions switch on for the call and then restore.
- Text attribution: gradient x input on the word embeddings, summed over the embedding dimension, for the
  text head on the text alone. A positive score pushes the explained label's logit up.

    python explain_rmt.py --model outputs/rmt --image xray.png --text "Dyspnea, SpO2 86%." \\
        --output_dir explanations --layer -1 --head 0

writes gradcam_image.png, gradcam_multimodal.png, attention_layer{L}_head{H}.png and text_attribution.png
(each when its inputs are given) and prints a JSON summary with the token scores.

The functions expect the model in eval mode, as `from_pretrained` returns it, so that dropout does not
change the maps. These maps show what moved a score in this model. They are not clinical evidence.
"""

import argparse
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from torch import nn

from modeling_rmt import RMTForMultimodalClassification
from processing_rmt import ImageInput, RMTProcessor, load_grayscale_image

logger = logging.getLogger(__name__)

GRAD_CAM_HEADS = ("image", "multimodal")
# Fonts tried after DejaVu Sans for characters it lacks (Chinese notes). Only installed ones are used.
FALLBACK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei", "Source Han Sans SC", "SimHei")


def _font_families() -> list[str]:
    """Return DejaVu Sans followed by the installed fallback fonts, for matplotlib's per-glyph fallback."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    fallbacks = [name for name in FALLBACK_FONTS if name in installed]
    if not fallbacks:
        logger.debug("No CJK font is installed, so Chinese tokens are drawn as empty boxes.")
    return ["DejaVu Sans", *fallbacks]


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _resolve_target(model: RMTForMultimodalClassification, logits: torch.Tensor, target: int | str | None) -> int:
    """Return the class id to explain: the predicted one, a given id, or the id of a given label."""
    if target is None:
        return int(logits.argmax())
    if isinstance(target, str):
        if target not in model.config.label2id:
            raise ValueError(f"Target label {target!r} is not one of the model's labels {list(model.config.label2id)}.")
        return int(model.config.label2id[target])
    if not 0 <= target < model.config.num_labels:
        raise ValueError(f"Target class id {target} is outside [0, {model.config.num_labels}).")
    return int(target)


def _probability(model: RMTForMultimodalClassification, logits: torch.Tensor, head: str, class_id: int) -> float:
    """Return the probability of `class_id` as the pipeline reports it, with the head's temperature."""
    temperature = (getattr(model.config, "temperatures", None) or {}).get(head, 1.0)
    return float(torch.softmax(logits.detach().float() / temperature, dim=-1)[class_id])


def last_conv_stage(model: RMTForMultimodalClassification) -> nn.Module:
    """Return the last feature stage of the timm backbone (e.g. `layer4` of a ResNet), Grad-CAM's target layer."""
    backbone = model.rmt.embeddings.image_encoder.backbone
    feature_info = getattr(backbone, "feature_info", None)
    if not feature_info:
        raise ValueError(f"Backbone {type(backbone).__name__} has no timm feature_info, so its last stage is unknown.")
    return backbone.get_submodule(feature_info[-1]["module"])


@dataclass
class GradCAM:
    """Grad-CAM of one head for one X-ray.

    `heatmap` is (H, W) in [0, 1] at the size of `image`, the grayscale X-ray as loaded. Its detail is that
    of the last stage, upsampled: 1/32 of the model's image size for timm ResNets, so 7 x 7 cells at 224 px.
    All zeros means that no region raised the explained logit.
    """

    head: str
    label: str
    probability: float
    heatmap: np.ndarray
    image: PIL.Image.Image


def _model_inputs(processor: RMTProcessor, image: ImageInput | None, text: str | None) -> dict[str, torch.Tensor]:
    return dict(processor(images=[image], text=[text], return_tensors="pt"))


def grad_cam(
    model: RMTForMultimodalClassification,
    processor: RMTProcessor,
    image: ImageInput,
    text: str | None = None,
    head: str = "image",
    target: int | str | None = None,
) -> GradCAM:
    """Compute the Grad-CAM heatmap of the image head (text ignored) or the multimodal head (text required).

    Args:
        image: path (PNG, JPEG, DICOM), PIL image, array or pydicom Dataset.
        text: the clinical note, required for `head="multimodal"`.
        head: "image" or "multimodal".
        target: class id or label to explain. Defaults to the head's predicted class.

    Raises:
        ValueError: unknown head, a multimodal head without text, or an unknown target.
    """
    if head not in GRAD_CAM_HEADS:
        raise ValueError(f"Grad-CAM head must be one of {GRAD_CAM_HEADS}, got {head!r}.")
    if head == "multimodal" and not (text and text.strip()):
        raise ValueError("Grad-CAM of the multimodal head needs a non-blank text beside the image.")
    inputs = _model_inputs(processor, image, text if head == "multimodal" else None)

    captured: dict[str, torch.Tensor] = {}

    def keep_activation(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.register_hook(lambda grad: captured.__setitem__("gradient", grad))
        captured["activation"] = output

    hook = last_conv_stage(model).register_forward_hook(keep_activation)
    try:
        with torch.enable_grad():
            outputs = model(**inputs)
            logits = (outputs.image_logits if head == "image" else outputs.multimodal_logits)[0]
            class_id = _resolve_target(model, logits, target)
            model.zero_grad(set_to_none=True)
            logits[class_id].backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)

    activation = captured["activation"].detach()[0]  # (channels, h, w)
    channel_weights = captured["gradient"].detach()[0].mean(dim=(1, 2))  # (channels,)
    cam = torch.relu((channel_weights[:, None, None] * activation).sum(dim=0))
    grayscale = load_grayscale_image(image)
    return GradCAM(
        head=head,
        label=model.config.id2label[class_id],
        probability=_probability(model, logits, head, class_id),
        heatmap=_upsample_and_normalize(cam, grayscale.size),
        image=grayscale,
    )


def _upsample_and_normalize(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resize an (h, w) map to PIL `size` (W, H) bilinearly and scale it to [0, 1]. An all-zero map stays zero."""
    width, height = size
    resized = nn.functional.interpolate(cam[None, None].float(), size=(height, width), mode="bilinear")[0, 0]
    peak = float(resized.max())
    if peak <= 0:
        return np.zeros((height, width), dtype=np.float32)
    return (resized / peak).clamp(0, 1).numpy().astype(np.float32)


def save_grad_cam(result: GradCAM, path: str | Path, alpha: float = 0.45) -> Path:
    """Save the X-ray beside the X-ray overlaid with the heatmap ("jet": red is high) as a PNG."""
    path = Path(path)
    pixels = np.asarray(result.image)
    figure = _new_figure(9, 4.8)
    left, right = figure.subplots(1, 2)
    left.imshow(pixels, cmap="gray")
    left.set_title("X-ray")
    right.imshow(pixels, cmap="gray")
    overlay = right.imshow(result.heatmap, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    no_evidence = " (all zero: no region raised the logit)" if not result.heatmap.any() else ""
    right.set_title(f"Grad-CAM, {result.head} head{no_evidence}")
    for axes in (left, right):
        axes.set_axis_off()
    figure.colorbar(overlay, ax=right, fraction=0.046, label="relative contribution")
    figure.suptitle(f"{result.label} ({result.probability:.0%})")
    figure.savefig(path)
    return path


@contextmanager
def eager_attention(model: RMTForMultimodalClassification) -> Iterator[None]:
    """Switch the model to the eager attention, which returns attention weights, and restore it afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class AttentionMap:
    """Attention weights of one layer and head of the joint pass.

    `weights` is (L, L), rows are queries and columns keys, over the joint sequence. `tokens` names every
    position and `segments` gives the part it belongs to: "multimodal CLS", "image" or "text".
    `key_visible` marks the keys that the modality mask left visible.
    """

    layer: int
    head: int
    weights: np.ndarray
    tokens: list[str]
    segments: list[str]
    key_visible: list[bool]


def joint_sequence_tokens(
    model: RMTForMultimodalClassification, processor: RMTProcessor, input_ids: torch.Tensor
) -> tuple[list[str], list[str]]:
    """Return a label and a segment name for each position of the joint sequence of one sample.

    The layout is the one documented in modeling_rmt.py: multimodal CLS, image CLS, N image embeddings,
    then the text tokens, whose first one is the text CLS.
    """
    num_image_embeddings = model.config.num_image_embeddings
    text_tokens = processor.tokenizer.convert_ids_to_tokens(input_ids.tolist())
    tokens = ["[MM-CLS]", "[IMG-CLS]", *(f"[IMG-{index}]" for index in range(1, num_image_embeddings + 1))]
    tokens += text_tokens
    segments = ["multimodal CLS"] + ["image"] * (1 + num_image_embeddings) + ["text"] * len(text_tokens)
    return tokens, segments


def attention_map(
    model: RMTForMultimodalClassification,
    processor: RMTProcessor,
    image: ImageInput | None = None,
    text: str | None = None,
    layer: int = -1,
    head: int = 0,
) -> AttentionMap:
    """Return the attention weights of `layer` (negative counts from the last) and `head` for one sample.

    Raises:
        ValueError: a layer or head outside the encoder's range, or neither image nor text.
    """
    num_layers = model.config.text_config.num_hidden_layers
    num_heads = model.config.text_config.num_attention_heads
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"Layer {layer} is outside the encoder's {num_layers} layers (use 0..{num_layers - 1} or -1).")
    if not 0 <= head < num_heads:
        raise ValueError(f"Head {head} is outside the encoder's {num_heads} attention heads (use 0..{num_heads - 1}).")
    inputs = _model_inputs(processor, image, text)

    with eager_attention(model), torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    if not outputs.attentions:
        raise RuntimeError("The model returned no attention weights although the eager attention is set.")

    weights = outputs.attentions[layer][0, head].float().numpy()
    tokens, segments = joint_sequence_tokens(model, processor, inputs["input_ids"][0])
    image_present, text_present = inputs["modality_mask"][0].bool().tolist()
    text_mask = inputs["attention_mask"][0].bool().tolist()
    key_visible = [True] + [image_present] * (1 + model.config.num_image_embeddings)
    key_visible += [text_present and visible for visible in text_mask]
    return AttentionMap(layer % num_layers, head, weights, tokens, segments, key_visible)


def save_attention_map(result: AttentionMap, path: str | Path) -> Path:
    """Save the attention matrix as a heatmap PNG with every query and key labeled and the parts separated."""
    path = Path(path)
    length = len(result.tokens)
    side = min(max(6.0, 0.22 * length + 2.5), 30.0)
    figure = _new_figure(side + 1.5, side)
    axes = figure.subplots()
    image = axes.imshow(result.weights, cmap="viridis", vmin=0.0, vmax=max(float(result.weights.max()), 1e-6))

    labels = [token if visible else f"({token})" for token, visible in zip(result.tokens, result.key_visible)]
    font_size = max(4.0, min(9.0, 400.0 / length))
    axes.set_xticks(range(length), labels, rotation=90, fontsize=font_size, family=_font_families())
    axes.set_yticks(range(length), result.tokens, fontsize=font_size, family=_font_families())
    colors = {"multimodal CLS": "tab:purple", "image": "tab:red", "text": "tab:blue"}
    for tick_labels in (axes.get_xticklabels(), axes.get_yticklabels()):
        for tick_label, segment in zip(tick_labels, result.segments):
            tick_label.set_color(colors[segment])
    for boundary in _segment_boundaries(result.segments):
        axes.axhline(boundary - 0.5, color="white", linewidth=0.8)
        axes.axvline(boundary - 0.5, color="white", linewidth=0.8)

    axes.set_xlabel("key (purple: multimodal CLS, red: image side, blue: text side; masked keys in parentheses)")
    axes.set_ylabel("query")
    axes.set_title(f"Joint-pass attention, layer {result.layer}, head {result.head}")
    figure.colorbar(image, ax=axes, fraction=0.046, label="attention weight")
    figure.savefig(path)
    return path


def _segment_boundaries(segments: list[str]) -> list[int]:
    return [index for index in range(1, len(segments)) if segments[index] != segments[index - 1]]


@dataclass
class TextAttribution:
    """Gradient x input score of each text token for the text head's logit of `label`.

    Special tokens ([CLS], [SEP], padding) are left out. WordPiece pieces keep their "##" prefix.
    """

    label: str
    probability: float
    tokens: list[str]
    scores: list[float]

    def pairs(self) -> list[tuple[str, float]]:
        """Return (token, score) in text order."""
        return list(zip(self.tokens, self.scores))


def text_attribution(
    model: RMTForMultimodalClassification,
    processor: RMTProcessor,
    text: str,
    target: int | str | None = None,
) -> TextAttribution:
    """Score each token of `text` by gradient x input on its word embedding, for the text head alone.

    Raises:
        ValueError: blank text or an unknown target.
    """
    if not (text and text.strip()):
        raise ValueError("Text attribution needs a non-blank text.")
    inputs = _model_inputs(processor, None, text)
    captured: dict[str, torch.Tensor] = {}

    def keep_embeddings(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["embeddings"] = output

    hook = model.rmt.get_input_embeddings().register_forward_hook(keep_embeddings)
    try:
        with torch.enable_grad():
            logits = model(**inputs).text_logits[0]
            class_id = _resolve_target(model, logits, target)
            model.zero_grad(set_to_none=True)
            logits[class_id].backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)

    embeddings = captured["embeddings"]
    scores = (embeddings.grad * embeddings).sum(dim=-1)[0].detach()
    input_ids = inputs["input_ids"][0].tolist()
    special = processor.tokenizer.get_special_tokens_mask(input_ids, already_has_special_tokens=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(input_ids)
    kept = [index for index, is_special in enumerate(special) if not is_special]
    return TextAttribution(
        label=model.config.id2label[class_id],
        probability=_probability(model, logits, "text", class_id),
        tokens=[tokens[index] for index in kept],
        scores=[float(scores[index]) for index in kept],
    )


def save_text_attribution(result: TextAttribution, path: str | Path) -> Path:
    """Save a horizontal bar chart of the token scores in text order (red: toward the label, blue: against)."""
    path = Path(path)
    count = len(result.tokens)
    figure = _new_figure(7.5, min(max(2.5, 0.28 * count + 1.2), 40.0))
    axes = figure.subplots()
    positions = np.arange(count)
    colors = ["tab:red" if score > 0 else "tab:blue" for score in result.scores]
    axes.barh(positions, result.scores, color=colors)
    axes.set_yticks(positions, result.tokens, family=_font_families())
    axes.invert_yaxis()
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel(f"gradient x input toward '{result.label}'")
    axes.set_title(f"Text head: {result.label} ({result.probability:.0%})")
    figure.savefig(path)
    return path


def explain(
    model: RMTForMultimodalClassification,
    processor: RMTProcessor,
    output_dir: str | Path,
    image: ImageInput | None = None,
    text: str | None = None,
    layer: int = -1,
    head: int = 0,
    target: int | str | None = None,
) -> dict[str, Any]:
    """Write every explanation that the given inputs allow into `output_dir` and return a summary.

    The summary maps each explanation to its PNG path and the label and probability it explains, and
    contains the (token, score) pairs of the text attribution.
    """
    has_text = bool(text and text.strip())
    if image is None and not has_text:
        raise ValueError("explain needs an image, a non-blank text or both.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    summary: dict[str, Any] = {}

    if image is not None:
        heads = ["image", "multimodal"] if has_text else ["image"]
        for cam_head in heads:
            cam = grad_cam(model, processor, image, text, head=cam_head, target=target)
            path = save_grad_cam(cam, output_dir / f"gradcam_{cam_head}.png")
            summary[f"gradcam_{cam_head}"] = {"path": str(path), "label": cam.label, "probability": cam.probability}

    attention = attention_map(model, processor, image, text if has_text else None, layer=layer, head=head)
    path = save_attention_map(attention, output_dir / f"attention_layer{attention.layer}_head{attention.head}.png")
    summary["attention"] = {"path": str(path), "layer": attention.layer, "head": attention.head}

    if has_text:
        attribution = text_attribution(model, processor, text, target=target)
        path = save_text_attribution(attribution, output_dir / "text_attribution.png")
        summary["text_attribution"] = {
            "path": str(path),
            "label": attribution.label,
            "probability": attribution.probability,
            "tokens": attribution.pairs(),
        }
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Explain RMT predictions with Grad-CAM, attention maps and text attributions."
    )
    parser.add_argument("--model", required=True, help="Folder of a saved RMT (model and processor).")
    parser.add_argument("--image", help="Chest X-ray: PNG, JPEG or DICOM path.")
    parser.add_argument("--text", help="Clinical note.")
    parser.add_argument("--output_dir", required=True, help="Folder for the PNG files.")
    parser.add_argument("--layer", type=int, default=-1, help="Encoder layer of the attention map, -1 for the last.")
    parser.add_argument("--head", type=int, default=0, help="Attention head of the attention map, from 0.")
    parser.add_argument("--target", help="Label to explain. Defaults to each head's predicted label.")
    args = parser.parse_args(argv)
    if args.image is None and not (args.text and args.text.strip()):
        parser.error("give --image, --text or both")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(name)s - %(message)s")
    args = parse_args(argv)
    model = RMTForMultimodalClassification.from_pretrained(args.model).eval()
    processor = RMTProcessor.from_pretrained(args.model)
    summary = explain(
        model, processor, args.output_dir, image=args.image, text=args.text, layer=args.layer, head=args.head,
        target=args.target,
    )  # fmt: skip
    print(json.dumps(summary, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
