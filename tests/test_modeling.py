import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_rmt import RMTModel, pooling_grid
from tests.tiny import random_batch, tiny_config, tiny_model

HEADS = ("logits", "image_logits", "text_logits", "multimodal_logits")
PATTERNS = [(1, 1), (1, 0), (0, 1)]

modality_masks = st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=5).map(
    lambda rows: torch.tensor(rows, dtype=torch.long)
)
PROPERTY_SETTINGS = settings(max_examples=12, deadline=None)


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def new_text(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    changed = dict(batch)
    changed["input_ids"] = torch.randint(5, 120, batch["input_ids"].shape, generator=generator)
    changed["attention_mask"] = torch.ones_like(batch["attention_mask"])
    changed["attention_mask"][:, -1] = torch.randint(0, 2, (batch["input_ids"].shape[0],), generator=generator)
    return changed


def new_images(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    changed = dict(batch)
    changed["pixel_values"] = torch.randn(batch["pixel_values"].shape, generator=generator) * 3
    return changed


@pytest.fixture(scope="module", params=[("sdpa", "per_task"), ("eager", "per_task"), ("sdpa", "fused")], ids=str)
def model(request):
    attention_implementation, strategy = request.param
    model = tiny_model(attention_strategy=strategy)
    model.set_attn_implementation(attention_implementation)
    return model


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_image_logits_ignore_text(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 6, seed, modality_mask)
    before = run(model, batch)
    after = run(model, new_text(batch, seed + 1))
    torch.testing.assert_close(after.image_logits, before.image_logits, rtol=0, atol=1e-5)


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_text_logits_ignore_image(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 6, seed, modality_mask)
    before = run(model, batch)
    after = run(model, new_images(batch, seed + 1))
    torch.testing.assert_close(after.text_logits, before.text_logits, rtol=0, atol=1e-5)


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_absent_inputs_change_no_output(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 6, seed, modality_mask)
    before = run(model, batch)
    changed = dict(batch)
    image_absent = modality_mask[:, 0] == 0
    text_absent = modality_mask[:, 1] == 0
    changed["pixel_values"] = torch.where(
        image_absent[:, None, None, None], new_images(batch, seed + 1)["pixel_values"], batch["pixel_values"]
    )
    text_changed = new_text(batch, seed + 2)
    for key in ("input_ids", "attention_mask"):
        changed[key] = torch.where(text_absent[:, None], text_changed[key], batch[key])
    after = run(model, changed)
    for head in HEADS:
        torch.testing.assert_close(getattr(after, head), getattr(before, head), rtol=0, atol=1e-5, msg=head)


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_sample_logits_ignore_other_rows(model, modality_mask, seed):
    batch = random_batch(len(modality_mask), 6, seed, modality_mask)
    together = run(model, batch)
    for row in range(len(modality_mask)):
        alone = run(model, {key: value[row : row + 1] for key, value in batch.items()})
        torch.testing.assert_close(alone.logits[0], together.logits[row], rtol=0, atol=1e-5)


def test_routing_picks_matching_head(model):
    modality_mask = torch.tensor(PATTERNS)
    output = run(model, random_batch(3, 5, seed=0, modality_mask=modality_mask))
    torch.testing.assert_close(output.logits[0], output.multimodal_logits[0])
    torch.testing.assert_close(output.logits[1], output.image_logits[1])
    torch.testing.assert_close(output.logits[2], output.text_logits[2])


def test_routing_without_multitask_uses_multimodal_head():
    model = tiny_model(use_multitask=False)
    output = run(model, random_batch(3, 5, seed=0, modality_mask=torch.tensor(PATTERNS)))
    torch.testing.assert_close(output.logits, output.multimodal_logits)


def test_image_logits_see_text_without_mask_attention():
    model = tiny_model(use_mask_attention=False)
    batch = random_batch(2, 6, seed=3)
    before = run(model, batch)
    after = run(model, new_text(batch, seed=4))
    assert not torch.allclose(after.image_logits, before.image_logits, atol=1e-5)


def test_multimodal_logits_see_both_modalities(model):
    batch = random_batch(2, 6, seed=5)
    before = run(model, batch)
    assert not torch.allclose(run(model, new_text(batch, 6)).multimodal_logits, before.multimodal_logits, atol=1e-5)
    assert not torch.allclose(run(model, new_images(batch, 7)).multimodal_logits, before.multimodal_logits, atol=1e-5)


def cross_entropy(logits, labels, rows):
    return torch.nn.functional.cross_entropy(logits[rows], labels[rows])


def test_loss_skips_tasks_lacking_modality():
    model = tiny_model(task_weights=[0.2, 0.3, 0.5])
    modality_mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 0]])
    labels = torch.tensor([0, 1, 1, 0])
    output = run(model, random_batch(4, 5, seed=1, modality_mask=modality_mask), labels=labels)

    image_rows = torch.tensor([True, True, False, True])
    text_rows = torch.tensor([True, False, True, False])
    both_rows = image_rows & text_rows
    expected = (
        0.2 * cross_entropy(output.image_logits, labels, image_rows)
        + 0.3 * cross_entropy(output.text_logits, labels, text_rows)
        + 0.5 * cross_entropy(output.multimodal_logits, labels, both_rows)
    )
    torch.testing.assert_close(output.loss, expected)


def test_loss_without_multitask_trains_multimodal_head_only():
    model = tiny_model(use_multitask=False)
    modality_mask = torch.tensor([[1, 1], [1, 0], [0, 1]])
    labels = torch.tensor([0, 1, 1])
    output = run(model, random_batch(3, 5, seed=2, modality_mask=modality_mask), labels=labels)
    expected = torch.nn.functional.cross_entropy(output.multimodal_logits, labels)
    torch.testing.assert_close(output.loss, expected)


def test_loss_gradients_reach_only_covered_heads():
    model = tiny_model()
    model.train()
    batch = random_batch(2, 5, seed=8, modality_mask=torch.tensor([[1, 0], [1, 0]]))
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert model.image_classifier[1].weight.grad.abs().sum() > 0
    assert model.text_classifier[1].weight.grad.abs().sum() == 0
    assert model.multimodal_classifier[1].weight.grad.abs().sum() == 0


def test_both_absent_raises_naming_rows(model):
    batch = random_batch(4, 5, seed=0, modality_mask=torch.tensor([[1, 1], [0, 0], [1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"Rows \[1, 3\]"):
        run(model, batch)


def test_modality_mask_bad_shape_raises(model):
    batch = random_batch(2, 5, seed=0, modality_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        run(model, batch)


def test_present_image_without_pixels_raises(model):
    batch = random_batch(2, 5, seed=0)
    del batch["pixel_values"]
    with pytest.raises(ValueError, match="pixel_values is missing"):
        run(model, batch)


def test_text_only_batch_without_pixels(model):
    batch = random_batch(2, 5, seed=0)
    batch.pop("pixel_values")
    batch["modality_mask"] = torch.tensor([[0, 1], [0, 1]])
    output = run(model, batch)
    torch.testing.assert_close(output.logits, output.text_logits)


def test_image_only_batch_without_text(model):
    batch = random_batch(2, 5, seed=0)
    image_only = {"pixel_values": batch["pixel_values"]}
    output = run(model, image_only)
    torch.testing.assert_close(output.logits, output.image_logits)


def test_any_label_set_sizes_heads():
    model = tiny_model(id2label={0: "a", 1: "b", 2: "c"})
    output = run(model, random_batch(2, 5, seed=0), labels=torch.tensor([2, 0]))
    assert output.logits.shape == (2, 3)
    assert torch.isfinite(output.loss)


@pytest.mark.parametrize("regions,grid", [(1, (1, 1)), (3, (3, 1)), (4, (2, 2)), (6, (3, 2)), (7, (7, 1))])
def test_pooling_grid_covers_regions(regions, grid):
    assert pooling_grid(regions) == grid


def test_base_model_returns_cls_states():
    torch.manual_seed(0)
    model = RMTModel(tiny_config()).eval()
    output = run(model, random_batch(2, 5, seed=0))
    assert output.image_cls_state.shape == (2, 32)
    assert output.last_hidden_state.shape == (2, 1 + 4 + 5, 32)


def test_attentions_cover_joint_sequence():
    model = tiny_model()
    model.set_attn_implementation("eager")
    output = run(model, random_batch(2, 5, seed=0), output_attentions=True)
    assert len(output.attentions) == 2
    assert output.attentions[0].shape == (2, 2, 10, 10)


FRESH_PROCESS_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    folder, inputs_file = sys.argv[1], sys.argv[2]
    batch = torch.load(inputs_file)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = classifier(**batch).logits
        states = base(**batch).multimodal_cls_state
    print(json.dumps({
        "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__,
        "classifier": type(classifier).__name__,
        "base": type(base).__name__,
        "logits": logits.tolist(),
        "states_shape": list(states.shape),
    }))
    """
)


def load_in_fresh_process(folder, batch, tmp_path):
    inputs_file = tmp_path / "inputs.pt"
    torch.save(batch, inputs_file)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS_LOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(inputs_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_save_load_fresh_process_same_logits(tmp_path):
    model = tiny_model(seed=4)
    batch = random_batch(3, 6, seed=9, modality_mask=torch.tensor(PATTERNS))
    expected = run(model, batch).logits
    folder = tmp_path / "saved"
    model.save_pretrained(folder)

    loaded = load_in_fresh_process(folder, batch, tmp_path)

    assert (folder / "model.safetensors").exists()
    assert (folder / "modeling_rmt.py").exists()
    assert loaded["config"] == "RMTConfig"
    assert loaded["classifier"] == "RMTForMultimodalClassification"
    assert loaded["base"] == "RMTModel"
    assert loaded["states_shape"] == [3, 32]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("text_length", [3, 9])
def test_absent_text_logits_ignore_padded_length(model, text_length):
    short = random_batch(2, 3, seed=1, modality_mask=torch.tensor([[1, 0], [1, 1]]))
    other = random_batch(2, text_length, seed=1, modality_mask=torch.tensor([[1, 0], [1, 1]]))
    other["pixel_values"] = short["pixel_values"]
    torch.testing.assert_close(run(model, other).text_logits[0], run(model, short).text_logits[0], rtol=0, atol=1e-5)


def test_absent_image_logits_constant(model):
    batch = random_batch(2, 4, seed=1, modality_mask=torch.tensor([[0, 1], [0, 1]]))
    output = run(model, batch)
    torch.testing.assert_close(output.image_logits[0], output.image_logits[1], rtol=0, atol=1e-5)


@PROPERTY_SETTINGS
@given(modality_mask=modality_masks, seed=st.integers(0, 10_000))
def test_fused_unimodal_logits_match_per_task(modality_mask, seed):
    per_task = tiny_model(seed=3)
    fused = tiny_model(seed=3, attention_strategy="fused")
    batch = random_batch(len(modality_mask), 6, seed, modality_mask)
    expected, actual = run(per_task, batch), run(fused, batch)
    torch.testing.assert_close(actual.image_logits, expected.image_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.text_logits, expected.text_logits, rtol=0, atol=1e-5)


def test_fused_text_tokens_ignore_image():
    fused = tiny_model(seed=3, attention_strategy="fused")
    batch = random_batch(2, 6, seed=4)
    text_side = slice(1 + 1 + 3, None)
    before = run(fused.rmt, batch).last_hidden_state[:, text_side]
    after = run(fused.rmt, new_images(batch, seed=5)).last_hidden_state[:, text_side]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_per_task_text_tokens_see_image():
    per_task = tiny_model(seed=3)
    batch = random_batch(2, 6, seed=4)
    text_side = slice(1 + 1 + 3, None)
    before = run(per_task.rmt, batch).last_hidden_state[:, text_side]
    after = run(per_task.rmt, new_images(batch, seed=5)).last_hidden_state[:, text_side]
    assert not torch.allclose(after, before, atol=1e-5)


def test_unknown_attention_strategy_raises():
    with pytest.raises(ValueError, match="attention_strategy"):
        tiny_config(attention_strategy="sparse")


@pytest.mark.parametrize("value", [2.0, -1.0, 0.5, 0.01, float("nan")])
def test_modality_mask_non_binary_raises(model, value):
    batch = random_batch(2, 5, seed=0)
    batch["modality_mask"] = torch.tensor([[1.0, value], [1.0, 1.0]])
    with pytest.raises(ValueError, match="0 or 1"):
        run(model, batch)


@pytest.mark.parametrize("key", ["pixel_values", "attention_mask", "modality_mask"])
def test_batch_size_mismatch_raises(model, key):
    batch = random_batch(2, 5, seed=0)
    batch[key] = batch[key][:1]
    with pytest.raises(ValueError, match="batch size"):
        run(model, batch)


@pytest.mark.parametrize("token_id", [-1, 120, 10**6])
def test_input_ids_outside_vocabulary_raise(model, token_id):
    batch = random_batch(2, 5, seed=0)
    batch["input_ids"][1, 2] = token_id
    with pytest.raises(ValueError, match="vocabulary"):
        run(model, batch)


def test_text_longer_than_positions_raises(model):
    batch = random_batch(1, 65, seed=0)
    with pytest.raises(ValueError, match="position"):
        run(model, batch)
