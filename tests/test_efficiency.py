"""The cheaper computation paths give the same numbers as the plain forward.

Covered: routed-only inference, precomputed image features, the frozen CNN, activation checkpointing,
channels-last CNN weights, and SDPA on every encoder pass.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from configuration_rmt import TASKS
from modeling_rmt import routed_tasks
from tests.tiny import random_batch, tiny_model

PATTERNS = [(1, 1), (1, 0), (0, 1)]
VARIANTS = {
    "per_task": {"attention_strategy": "per_task"},
    "fused": {"attention_strategy": "fused"},
    "no_mask_attention": {"use_mask_attention": False},
    "no_multitask": {"use_multitask": False},
    "mmbt": {"use_mask_attention": False, "use_multitask": False},
}
modality_masks = st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=6).map(
    lambda rows: torch.tensor(rows, dtype=torch.long)
)
PROPERTY_SETTINGS = settings(max_examples=10, deadline=None)


@pytest.fixture(scope="module", params=list(VARIANTS), ids=str)
def model(request):
    return tiny_model(**VARIANTS[request.param])


def without_pixels(batch, image_features):
    inputs = {key: value for key, value in batch.items() if key != "pixel_values"}
    return {**inputs, "image_features": image_features}


def count_sdpa_calls(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(query, key, value, attn_mask=None, *args, **kwargs):
        calls.append({"queries": query.shape[-2], "masked": attn_mask is not None})
        return original(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_routed_only_matches_full_forward(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 7, seed, modality_mask)
    with torch.no_grad():
        full = model(**batch)
        routed = model(**batch, routed_only=True)
    torch.testing.assert_close(routed.logits, full.logits, rtol=0, atol=1e-5)
    assert routed.image_logits is None
    assert routed.text_logits is None
    assert routed.multimodal_logits is None


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_image_features_match_pixels(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 5, seed, modality_mask)
    with torch.no_grad():
        features = model.rmt.embeddings.image_encoder.image_features(batch["pixel_values"])
        from_pixels = model(**batch)
        from_features = model(**without_pixels(batch, features))
    for head in ("logits", "image_logits", "text_logits", "multimodal_logits"):
        torch.testing.assert_close(from_features[head], from_pixels[head], rtol=0, atol=1e-6)


def test_absent_image_features_ignored():
    model = tiny_model()
    modality_mask = torch.tensor([[1, 1], [0, 1]])
    batch = random_batch(2, 5, 0, modality_mask)
    features = model.rmt.embeddings.image_encoder.image_features(batch["pixel_values"]).detach()
    changed = features.clone()
    changed[1] = torch.randn_like(changed[1]) * 10
    with torch.no_grad():
        before = model(**without_pixels(batch, features)).logits
        after = model(**without_pixels(batch, changed)).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape", [(2, 4, 512), (2, 3, 100), (2, 512)], ids=["wrong regions", "wrong channels", "missing regions"]
)
def test_wrong_feature_shape_rejected(shape):
    model = tiny_model()
    batch = random_batch(2, 5, 0)
    with pytest.raises(ValueError, match=r"image_features must have shape \(batch_size, 3, 512\)"):
        model(**without_pixels(batch, torch.zeros(shape)))


def test_pixels_and_features_rejected():
    model = tiny_model()
    batch = random_batch(2, 5, 0)
    with pytest.raises(ValueError, match="not both"):
        model(**batch, image_features=torch.zeros(2, 3, 512))


def test_routed_only_rejects_labels_and_attentions():
    model = tiny_model()
    batch = random_batch(2, 5, 0)
    with pytest.raises(ValueError, match="loss needs every head"):
        model(**batch, labels=torch.tensor([0, 1]), routed_only=True)
    with pytest.raises(ValueError, match="no attentions"):
        model(**batch, output_attentions=True, routed_only=True)


@pytest.mark.parametrize(
    "use_multitask, expected",
    [(True, ["multimodal", "image", "text"]), (False, ["multimodal", "multimodal", "multimodal"])],
)
def test_routed_tasks_follow_modality_mask(use_multitask, expected):
    modality_mask = torch.tensor(PATTERNS, dtype=torch.bool)
    assert [TASKS[task] for task in routed_tasks(modality_mask, use_multitask)] == expected


@pytest.mark.parametrize(
    "strategy, patterns, expected_passes",
    [
        ("per_task", [(1, 1), (1, 1)], ["joint"]),
        ("per_task", [(1, 0), (0, 1)], ["image", "text"]),
        ("per_task", [(1, 1), (1, 0)], ["image", "joint"]),
        ("fused", [(1, 1), (1, 1)], ["joint"]),
    ],
)
def test_routed_only_runs_needed_passes(monkeypatch, strategy, patterns, expected_passes):
    model = tiny_model(attention_strategy=strategy)
    text_length, num_layers = 6, model.config.text_config.num_hidden_layers
    image_side, joint = 1 + model.config.num_image_embeddings, 1 + 1 + model.config.num_image_embeddings + 6
    length_of_pass = {"image": image_side, "text": text_length, "joint": joint}
    calls = count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        model(**random_batch(len(patterns), text_length, 0, torch.tensor(patterns)), routed_only=True)
    expected = sorted(length_of_pass[name] for name in expected_passes for _ in range(num_layers))
    assert sorted(call["queries"] for call in calls) == expected


@pytest.mark.parametrize("strategy, passes", [("per_task", 3), ("fused", 1)])
def test_encoder_passes_use_masked_sdpa(monkeypatch, strategy, passes):
    model = tiny_model(attention_strategy=strategy)
    assert model.config._attn_implementation == "sdpa"
    calls = count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        model(**random_batch(3, 6, 0, torch.tensor(PATTERNS)))
    assert len(calls) == passes * model.config.text_config.num_hidden_layers
    assert all(call["masked"] for call in calls)


def test_frozen_backbone_eval_without_gradient():
    model = tiny_model(freeze_image_backbone=True).train()
    backbone = model.rmt.embeddings.image_encoder.backbone
    assert not backbone.training
    assert model.rmt.embeddings.image_encoder.projection.training
    batch = random_batch(4, 5, 0)
    model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    assert all(parameter.grad is None for parameter in backbone.parameters())
    assert model.rmt.embeddings.image_encoder.projection.weight.grad.abs().sum() > 0


def test_trainable_backbone_follows_mode():
    model = tiny_model().train()
    assert model.rmt.embeddings.image_encoder.backbone.training


def zero_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    return loss.detach(), gradients


@pytest.mark.parametrize("strategy", ["per_task", "fused"])
def test_activation_checkpointing_keeps_gradients(strategy):
    model = zero_dropout(tiny_model(attention_strategy=strategy).train())
    batch = random_batch(4, 6, 0, torch.tensor([(1, 1), (1, 0), (0, 1), (1, 1)]))
    batch = {**batch, "pixel_values": torch.randn(4, 3, 64, 64), "labels": torch.tensor([0, 1, 1, 0])}
    plain_loss, plain_gradients = loss_and_gradients(model, batch)

    model.activation_checkpointing_enable()
    assert model.rmt.embeddings.image_encoder.backbone.grad_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.rmt.encoder.encoder.layer)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, batch)

    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=1e-6)
    assert checkpointed_gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    model.activation_checkpointing_disable()
    assert not model.rmt.embeddings.image_encoder.backbone.grad_checkpointing


def test_channels_last_cnn_same_logits():
    model = tiny_model()
    batch = random_batch(3, 5, 0)
    with torch.no_grad():
        before = model(**batch).logits
        model.rmt.embeddings.image_encoder.to(memory_format=torch.channels_last)
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "features, message",
    [
        (np.zeros((2, 3, 512), dtype=np.float32), "must be a torch.Tensor, got ndarray"),
        (torch.zeros(2, 3, 512, dtype=torch.long), "must be floating point, got torch.int64"),
    ],
    ids=["numpy array", "integer tensor"],
)
def test_invalid_image_features_rejected(features, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(**without_pixels(random_batch(2, 5, 0), features))


def test_non_finite_present_features_rejected():
    model = tiny_model()
    batch = random_batch(2, 5, 0, torch.tensor([(1, 1), (0, 1)]))
    features = torch.zeros(2, 3, 512)
    features[1] = float("nan")
    with torch.no_grad():
        model(**without_pixels(batch, features))
    features[0, 1, 7] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[0\] contain NaN or infinite values"):
        model(**without_pixels(batch, features))


@pytest.mark.parametrize("input_name", ["input_ids", "image_features"])
def test_empty_batch_rejected(input_name):
    model = tiny_model()
    inputs = {"input_ids": torch.zeros(0, 5, dtype=torch.long), "image_features": torch.zeros(0, 3, 512)}
    with pytest.raises(ValueError, match="empty batch"):
        model(**{input_name: inputs[input_name]})
