"""Checkpoint loading in train_rmt.py: safetensors only by default, and resuming after a crash."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datasets_scripts.synthetic import make_synthetic_dataset
from tests.conftest import REPO_ROOT
from tests.test_train import train_command
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
    (checkpoint / "trainer_state.json").write_text("{}")
    argv = ["train_rmt.py", "--train_file", "unused.jsonl", "--output_dir", str(tmp_path / "out"), "--do_train"]
    monkeypatch.setattr(sys, "argv", argv + ["--report_to", "none"])

    with pytest.raises(ValueError, match="checkpoint-4 has no model.safetensors"):
        train_rmt.main()


def collate(collator, data_dir: Path) -> torch.Tensor:
    records = [json.loads(text) for text in (data_dir / "train.jsonl").read_text().splitlines()[:4]]
    rows = [
        {**record, "image": str(data_dir / record["image"]) if record["image"] else None, "label": 0,
         "augment": True, "hidden_modality": None}
        for record in records
    ]  # fmt: skip
    return collator(rows)["pixel_values"]


@pytest.fixture(scope="module")
def augmenting_collator(minilm_dir, tmp_path_factory):
    from processing_rmt import RMTProcessor
    from train_rmt import RMTDataCollator

    data_dir = tmp_path_factory.mktemp("collator")
    make_synthetic_dataset(data_dir, num_samples=20, image_size=32, seed=4)
    processor = RMTProcessor.from_text_model(minilm_dir, image_size=32)
    return RMTDataCollator(processor, max_seq_length=32, seed=5), data_dir


def test_collator_augmentation_repeats_per_epoch(augmenting_collator):
    collator, data_dir = augmenting_collator
    collator.epoch = 1
    first = collate(collator, data_dir)
    torch.rand(10)
    second = collate(collator, data_dir)

    assert torch.equal(first, second)


def test_collator_augmentation_changes_with_epoch(augmenting_collator):
    collator, data_dir = augmenting_collator
    collator.epoch = 1
    first = collate(collator, data_dir)
    collator.epoch = 2
    second = collate(collator, data_dir)

    assert not torch.equal(first, second)


def test_collator_leaves_global_generator_alone(augmenting_collator):
    collator, data_dir = augmenting_collator
    state = torch.random.get_rng_state()
    collate(collator, data_dir)

    assert torch.equal(torch.random.get_rng_state(), state)


# Runs train_rmt.main() with a callback that blocks right after the checkpoint of step PAUSE_STEP is
# saved, so the test can SIGKILL the process at a known point in the middle of an epoch.
PAUSING_RUNNER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import transformers
    import train_rmt

    PAUSE_STEP = int(os.environ["PAUSE_STEP"])
    MARKER = Path(os.environ["PAUSE_MARKER"])

    class PauseAfterSave(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == PAUSE_STEP:
                MARKER.write_text(str(state.global_step))
                time.sleep(600)

    original_init = transformers.Trainer.__init__

    def init_with_pause(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(PauseAfterSave())

    transformers.Trainer.__init__ = init_with_pause
    sys.argv = ["train_rmt.py", *sys.argv[1:]]
    train_rmt.main()
    """
)
# 60 synthetic samples give 42 training samples, so 6 steps of 8 per epoch and 12 steps in 2 epochs.
# The kill comes after checkpoint-8, the second step of the second epoch.
PAUSE_STEP = 8
RESUME_ARGUMENTS = ("--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1")
# Metrics of the train() call itself, which cover only the steps after a resume.
TRAIN_CALL_METRICS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def training_environment(workdir: Path, **extra: str) -> dict[str, str]:
    # One thread in every run, so that CPU reductions add up in the same order.
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(workdir / "modules"),
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def start_training(command: list[str], workdir: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(command, cwd=workdir, env=training_environment(workdir, **extra_env),
                            stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_file(path: Path, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.2)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def step_losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def interrupted_and_reference(tmp_path_factory, minilm_dir):
    """Train once without interruption and once with a SIGKILL after checkpoint-8 and a resume."""
    workdir = tmp_path_factory.mktemp("resume")
    data_dir = workdir / "data"
    make_synthetic_dataset(data_dir, num_samples=60, image_size=32, seed=1)
    reference_dir, interrupted_dir = workdir / "reference", workdir / "interrupted"
    runner = workdir / "pausing_runner.py"
    runner.write_text(PAUSING_RUNNER)
    marker = workdir / "paused"

    reference = start_training(
        train_command(data_dir, reference_dir, minilm_dir, *RESUME_ARGUMENTS), workdir, workdir / "reference.log"
    )
    pausing_command = train_command(data_dir, interrupted_dir, minilm_dir, *RESUME_ARGUMENTS)
    pausing_command[1] = str(runner)
    interrupted = start_training(
        pausing_command, workdir, workdir / "interrupted.log", PAUSE_STEP=str(PAUSE_STEP), PAUSE_MARKER=str(marker)
    )
    try:
        wait_for_file(marker, interrupted, workdir / "interrupted.log", timeout=300)
        os.kill(interrupted.pid, signal.SIGKILL)
        interrupted.wait(timeout=60)
        killed_checkpoints = sorted(path.name for path in interrupted_dir.glob("checkpoint-*"))
        killed_final_model = (interrupted_dir / "model.safetensors").exists()
        assert reference.wait(timeout=300) == 0, (workdir / "reference.log").read_text()[-3000:]
    finally:
        for process in (interrupted, reference):
            if process.poll() is None:
                process.kill()

    resumed = subprocess.run(
        [*train_command(data_dir, interrupted_dir, minilm_dir, *RESUME_ARGUMENTS), "--log_level", "info"],
        cwd=workdir, env=training_environment(workdir), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {
        "reference": reference_dir,
        "interrupted": interrupted_dir,
        "killed_returncode": interrupted.returncode,
        "killed_checkpoints": killed_checkpoints,
        "killed_final_model": killed_final_model,
        "resumed_output": resumed.stdout + resumed.stderr,
    }


@pytest.mark.slow
def test_kill_leaves_checkpoints_only(interrupted_and_reference):
    assert interrupted_and_reference["killed_returncode"] == -signal.SIGKILL
    assert interrupted_and_reference["killed_checkpoints"] == ["checkpoint-4", "checkpoint-8"]
    assert not interrupted_and_reference["killed_final_model"]


@pytest.mark.slow
def test_rerun_resumes_from_last_checkpoint(interrupted_and_reference):
    checkpoint = interrupted_and_reference["interrupted"] / "checkpoint-8"

    assert f"Resuming from {checkpoint}" in interrupted_and_reference["resumed_output"]


@pytest.mark.slow
def test_resumed_weights_equal_uninterrupted(interrupted_and_reference):
    reference = final_weights(interrupted_and_reference["reference"])
    resumed = final_weights(interrupted_and_reference["interrupted"])

    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-5), name


@pytest.mark.slow
def test_resumed_step_losses_equal_uninterrupted(interrupted_and_reference):
    reference = step_losses(interrupted_and_reference["reference"])
    resumed = step_losses(interrupted_and_reference["interrupted"])

    assert sorted(resumed) == list(range(1, 13))
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


@pytest.mark.slow
def test_resumed_metrics_equal_uninterrupted(interrupted_and_reference):
    reference = json.loads((interrupted_and_reference["reference"] / "all_results.json").read_text())
    resumed = json.loads((interrupted_and_reference["interrupted"] / "all_results.json").read_text())

    compared = [name for name in reference if name not in TRAIN_CALL_METRICS and not name.endswith("_runtime")]
    compared = [name for name in compared if not name.endswith("_per_second")]
    assert any(name.startswith("test_") for name in compared)
    for name in compared:
        assert resumed[name] == pytest.approx(reference[name], abs=1e-5), name
