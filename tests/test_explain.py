"""Grad-CAM, attention maps and text attributions of explain_rmt.py, on synthetic and real X-rays."""

import copy
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from explain_rmt import (
    attention_map,
    explain,
    grad_cam,
    main,
    save_attention_map,
    save_grad_cam,
    save_text_attribution,
    text_attribution,
)
from processing_rmt import RMTProcessor
from tests.checkpoints import tiny_classifier, write_synthetic_xray

# At 128 px the last ResNet stage is 4 x 4, enough for Grad-CAM to vary across the X-ray.
EXPLAIN_IMAGE_SIZE = 128
NOTE = "Progressive dyspnea, oxygen saturation 86% on room air."


@pytest.fixture(scope="module")
def model():
    return tiny_classifier(seed=1, image_size=EXPLAIN_IMAGE_SIZE)


@pytest.fixture(scope="module")
def processor(minilm_dir) -> RMTProcessor:
    return RMTProcessor.from_text_model(minilm_dir, image_size=EXPLAIN_IMAGE_SIZE)


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> Path:
    return write_synthetic_xray(tmp_path_factory.mktemp("explain") / "xray.png", size=160, seed=5)


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.is_file(), path
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side, image.size


@pytest.mark.parametrize("head", ["image", "multimodal"])
def test_grad_cam_heatmap_matches_image(model, processor, xray, head):
    result = grad_cam(model, processor, xray, NOTE, head=head)
    assert result.heatmap.shape == (160, 160)
    assert result.heatmap.dtype == np.float32
    assert np.isfinite(result.heatmap).all()
    assert result.heatmap.min() >= 0.0
    assert result.heatmap.max() <= 1.0
    assert result.head == head
    assert result.label in ("mild", "severe")


def test_grad_cam_varies_over_image(model, processor, xray):
    result = grad_cam(model, processor, xray, head="image", target="severe")
    other = grad_cam(model, processor, xray, head="image", target="mild")
    nonzero = result if result.heatmap.any() else other
    assert nonzero.heatmap.max() == pytest.approx(1.0)
    assert nonzero.heatmap.std() > 0.01, "a 4 x 4 map upsampled to 160 px should not be flat"


def test_grad_cam_image_head_ignores_text(model, processor, xray):
    without_text = grad_cam(model, processor, xray, None, head="image", target=1)
    with_text = grad_cam(model, processor, xray, NOTE, head="image", target=1)
    np.testing.assert_allclose(with_text.heatmap, without_text.heatmap, atol=1e-6)


def test_grad_cam_multimodal_needs_text(model, processor, xray):
    with pytest.raises(ValueError, match="needs a non-blank text"):
        grad_cam(model, processor, xray, "  ", head="multimodal")


def test_grad_cam_rejects_unknown_target(model, processor, xray):
    with pytest.raises(ValueError, match="'moderate' is not one of"):
        grad_cam(model, processor, xray, head="image", target="moderate")


def test_grad_cam_leaves_no_gradients(model, processor, xray):
    grad_cam(model, processor, xray, NOTE, head="multimodal")
    assert all(parameter.grad is None for parameter in model.parameters())


def test_attention_map_labels_joint_sequence(model, processor, xray):
    result = attention_map(model, processor, xray, NOTE, layer=-1, head=1)
    length = len(result.tokens)
    assert result.weights.shape == (length, length)
    assert result.tokens[:5] == ["[MM-CLS]", "[IMG-CLS]", "[IMG-1]", "[IMG-2]", "[IMG-3]"]
    assert result.tokens[5] == "[CLS]"
    assert result.tokens[-1] == "[SEP]"
    assert "oxygen" in result.tokens
    assert result.segments[:5] == ["multimodal CLS", "image", "image", "image", "image"]
    assert set(result.segments[5:]) == {"text"}
    assert result.layer == 1
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-5)


def test_attention_map_masks_absent_image(model, processor):
    result = attention_map(model, processor, None, NOTE, layer=0, head=0)
    image_keys = [index for index, segment in enumerate(result.segments) if segment == "image"]
    assert not any(result.key_visible[index] for index in image_keys)
    assert np.abs(result.weights[:, image_keys]).max() < 1e-6


def test_attention_map_restores_attention_implementation(model, processor, xray):
    before = model.config._attn_implementation
    attention_map(model, processor, xray, NOTE)
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("layer,head,message", [(2, 0, "Layer 2 is outside"), (0, 2, "Head 2 is outside")])
def test_attention_map_rejects_bad_index(model, processor, xray, layer, head, message):
    with pytest.raises(ValueError, match=message):
        attention_map(model, processor, xray, NOTE, layer=layer, head=head)


def test_text_attribution_scores_word_tokens(model, processor):
    result = text_attribution(model, processor, NOTE)
    assert result.tokens == processor.tokenizer.tokenize(NOTE)
    assert len(result.scores) == len(result.tokens)
    assert all(np.isfinite(score) for score in result.scores)
    assert any(score != 0.0 for score in result.scores)
    assert result.pairs()[0] == (result.tokens[0], result.scores[0])


def test_text_attribution_is_gradient_times_input(model, processor):
    # Scaling token i's word embedding by (1 + eps) changes the logit by about eps * (gradient . embedding).
    # float64 keeps the finite difference far above rounding error.
    model = copy.deepcopy(model).double()
    result = text_attribution(model, processor, NOTE, target="severe")
    token = 3  # position in the attribution, which leaves out the [CLS] at input position 0
    epsilon = 1e-4
    inputs = processor(text=[NOTE], return_tensors="pt")
    embeddings = model.rmt.get_input_embeddings()

    def text_logit(scale: float) -> float:
        def rescale(module, args, output):
            output = output.clone()
            output[0, token + 1] *= scale
            return output

        hook = embeddings.register_forward_hook(rescale)
        try:
            with torch.no_grad():
                return float(model(**inputs).text_logits[0, model.config.label2id["severe"]])
        finally:
            hook.remove()

    finite_difference = (text_logit(1 + epsilon) - text_logit(1 - epsilon)) / (2 * epsilon)
    assert finite_difference == pytest.approx(result.scores[token], rel=1e-4)


def test_text_attribution_rejects_blank_text(model, processor):
    with pytest.raises(ValueError, match="non-blank text"):
        text_attribution(model, processor, " ")


def test_saved_pngs_open(model, processor, xray, tmp_path):
    cam_path = save_grad_cam(grad_cam(model, processor, xray, NOTE, head="multimodal"), tmp_path / "cam.png")
    attention_path = save_attention_map(attention_map(model, processor, xray, NOTE), tmp_path / "attention.png")
    text_path = save_text_attribution(text_attribution(model, processor, NOTE), tmp_path / "text.png")
    for path in (cam_path, attention_path, text_path):
        assert_png(path)


def test_explain_writes_every_png(model, processor, xray, tmp_path):
    summary = explain(model, processor, tmp_path, image=xray, text=NOTE, layer=-1, head=0)
    assert set(summary) == {"gradcam_image", "gradcam_multimodal", "attention", "text_attribution"}
    for key in ("gradcam_image", "gradcam_multimodal", "attention", "text_attribution"):
        assert_png(Path(summary[key]["path"]))
    assert summary["attention"]["path"].endswith("attention_layer1_head0.png")
    assert all(isinstance(token, str) for token, _ in summary["text_attribution"]["tokens"])


def test_explain_image_only_skips_text_outputs(model, processor, xray, tmp_path):
    summary = explain(model, processor, tmp_path, image=xray)
    assert set(summary) == {"gradcam_image", "attention"}


def test_explain_cli_prints_summary(model, processor, xray, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--image", str(xray), "--text", NOTE, "--output_dir", str(tmp_path / "out")])
    summary = json.loads(capsys.readouterr().out)
    assert Path(summary["gradcam_multimodal"]["path"]).is_file()
    assert summary["text_attribution"]["tokens"][0][0] == "progressive"


@pytest.mark.shared_data
def test_explain_real_xray(model, processor, covid_data_dir, tmp_path):
    image_path = sorted((covid_data_dir / "images").iterdir())[0]
    summary = explain(model, processor, tmp_path, image=image_path, text=NOTE, layer=0, head=1)
    with PIL.Image.open(image_path) as original:
        size = original.size
    cam = grad_cam(model, processor, image_path, head="image")
    assert cam.heatmap.shape == (size[1], size[0])
    for key in ("gradcam_image", "gradcam_multimodal", "attention", "text_attribution"):
        assert_png(Path(summary[key]["path"]))
