"""Checkpoint loading in train_rmt.py: safetensors only by default, and resuming after a crash."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import tiny_model
from train_rmt import DataArguments, ModelArguments, build_model, check_safetensors_checkpoint

ID2LABEL = {0: "mild", 1: "severe"}


def save_pickle_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Save a tiny RMT with its weights in pytorch_model.bin (a pickle) instead of model.safetensors."""
    tiny_model(seed=3).save_pretrained(folder)
    state_dict = load_file(folder / "model.safetensors")
    torch.save(state_dict, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return state_dict


def model_arguments(checkpoint: Path, allow_pickle: bool = False) -> ModelArguments:
    return ModelArguments(model_name_or_path=str(checkpoint), allow_pickle_checkpoints=allow_pickle)


def data_arguments() -> DataArguments:
    return DataArguments(train_file="unused.jsonl", image_size=32)


def test_pickle_folder_rejected(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(ValueError, match="only pickle files") as raised:
        check_safetensors_checkpoint(str(tmp_path), allow_pickle=False)
    assert str(tmp_path / "pytorch_model.bin") in str(raised.value)
    assert "--allow_pickle_checkpoints" in str(raised.value)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "pytorch_model-00001-of-00002.bin"])
def test_other_pickle_names_rejected(tmp_path, name):
    (tmp_path / name).write_bytes(b"pickle")

    with pytest.raises(ValueError, match=name):
        check_safetensors_checkpoint(str(tmp_path), allow_pickle=False)


def test_pickle_file_path_rejected(tmp_path):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"pickle")

    with pytest.raises(ValueError, match="only pickle files"):
        check_safetensors_checkpoint(str(weights), allow_pickle=False)


def test_trainer_checkpoint_with_safetensors_passes(tmp_path):
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (tmp_path / name).write_bytes(b"x")

    check_safetensors_checkpoint(str(tmp_path), allow_pickle=False)


def test_pickle_folder_allowed_by_flag(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")

    check_safetensors_checkpoint(str(tmp_path), allow_pickle=True)


def test_hub_id_left_to_from_pretrained():
    check_safetensors_checkpoint("some-org/some-model", allow_pickle=False)


def test_build_model_rejects_pickle_checkpoint(tmp_path):
    save_pickle_checkpoint(tmp_path)

    with pytest.raises(ValueError, match="pytorch_model.bin"):
        build_model(model_arguments(tmp_path), data_arguments(), ID2LABEL)


def test_build_model_loads_pickle_when_allowed(tmp_path):
    state_dict = save_pickle_checkpoint(tmp_path)
    model = build_model(model_arguments(tmp_path, allow_pickle=True), data_arguments(), ID2LABEL)

    loaded = model.state_dict()
    for name, tensor in state_dict.items():
        assert torch.equal(loaded[name], tensor), name


def test_build_model_loads_safetensors(tmp_path):
    tiny_model(seed=3).save_pretrained(tmp_path)
    model = build_model(model_arguments(tmp_path), data_arguments(), ID2LABEL)

    expected = load_file(tmp_path / "model.safetensors")
    loaded = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_resume_from_pickle_checkpoint_rejected(tmp_path, monkeypatch):
    import train_rmt

    checkpoint = tmp_path / "out" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "pytorch_model.bin").write_bytes(b"pickle")
    argv = ["train_rmt.py", "--train_file", "unused.jsonl", "--output_dir", str(tmp_path / "out"), "--do_train"]
    monkeypatch.setattr(sys, "argv", argv + ["--report_to", "none"])

    with pytest.raises(ValueError, match="checkpoint-4 has no model.safetensors"):
        train_rmt.main()
