import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datasets_scripts.synthetic import make_synthetic_dataset
from tests.conftest import REPO_ROOT

TINY_ENCODER = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"
TASKS = ("routed", "image", "text", "multimodal")
METRICS = ("accuracy", "precision", "sensitivity", "specificity", "roc_auc")


def train_command(data_dir: Path, output_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "train_rmt.py"),
        "--train_file", str(data_dir / "train.jsonl"),
        "--validation_file", str(data_dir / "validation.jsonl"),
        "--test_file", str(data_dir / "test.jsonl"),
        "--text_model_name_or_path", str(tokenizer_dir),
        "--config_overrides", TINY_ENCODER,
        "--image_model_name", "resnet10t",
        "--image_pretrained", "false",
        "--image_size", "32",
        "--max_seq_length", "32",
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--do_predict",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16",
        "--learning_rate", "1e-3",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(data_dir, num_samples=60, image_size=32, seed=1)
    return data_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir, minilm_dir):
    output_dir = tmp_path_factory.mktemp("run") / "model"
    command = train_command(
        synthetic_dir,
        output_dir,
        minilm_dir,
        "--num_train_epochs", "2",
        "--save_strategy", "epoch",
        "--activation_checkpointing",
        "--channels_last",
    )  # fmt: skip
    result = run_command(command, output_dir.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result


def test_train_writes_metrics_for_every_task(trained):
    output_dir, _ = trained
    results = json.loads((output_dir / "all_results.json").read_text())
    for split in ("validation", "test"):
        for task in TASKS:
            for metric in METRICS:
                assert f"{split}_{task}_{metric}" in results, f"{split}_{task}_{metric}"


def test_train_task_sample_counts_match_modalities(trained, synthetic_dir):
    output_dir, _ = trained
    results = json.loads((output_dir / "all_results.json").read_text())
    records = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()]
    with_image = sum(r["image"] is not None for r in records)
    with_text = sum(bool(r["text"]) for r in records)
    both = sum(r["image"] is not None and bool(r["text"]) for r in records)
    assert results["test_routed_samples"] == len(records)
    assert results["test_image_samples"] == with_image
    assert results["test_text_samples"] == with_text
    assert results["test_multimodal_samples"] == both


def test_train_prints_metrics_and_output_folder(trained):
    output_dir, result = trained
    assert "test metrics" in result.stdout
    assert str(output_dir) in result.stdout


def test_train_saves_loadable_folder(trained):
    output_dir, _ = trained
    for name in ("model.safetensors", "config.json", "modeling_rmt.py", "configuration_rmt.py", "processing_rmt.py"):
        assert (output_dir / name).exists(), name


FRESH_PROCESS_PREDICT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForSequenceClassification, AutoProcessor
    folder, image = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    batch = processor(images=[image, image, None], text=["mild cough", None, "呼吸困难"], return_tensors="pt")
    with torch.no_grad():
        print(json.dumps(model(**batch).logits.tolist()))
    """
)


def predict_in_fresh_process(folder: Path, image: Path, workdir: Path) -> list:
    script = workdir / "predict.py"
    script.write_text(FRESH_PROCESS_PREDICT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / f"modules-{folder.name}")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(image)],
        capture_output=True, text=True, cwd=workdir, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_trainer_checkpoint_reloads_like_final_model(trained, synthetic_dir, tmp_path):
    output_dir, _ = trained
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert checkpoints, "no Trainer checkpoint was written"
    last = checkpoints[-1]
    for name in ("modeling_rmt.py", "configuration_rmt.py", "processing_rmt.py"):
        assert (last / name).exists(), f"{last.name} lacks {name}"

    image = next((synthetic_dir / "images").iterdir())
    final_logits = predict_in_fresh_process(output_dir, image, tmp_path)
    checkpoint_logits = predict_in_fresh_process(last, image, tmp_path)
    for checkpoint_row, final_row in zip(checkpoint_logits, final_logits, strict=True):
        assert checkpoint_row == pytest.approx(final_row, abs=1e-5)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def bad_dataset(tmp_path: Path, bad_record: dict) -> Path:
    data_dir = tmp_path / "bad"
    make_synthetic_dataset(data_dir, num_samples=12, image_size=16, seed=2)
    records = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()[:6]]
    write_jsonl(data_dir / "train.jsonl", records + [bad_record])
    return data_dir


@pytest.mark.parametrize(
    "bad_record,message",
    [
        ({"id": "x1", "label": "moderate", "image": None, "text": "cough"}, "unknown label 'moderate'"),
        ({"id": "x2", "label": "mild", "image": None, "text": "  "}, "both modalities absent"),
        ({"id": "x3", "label": "mild", "image": None}, "missing key(s) ['text']"),
        ({"id": "x4", "label": "mild", "image": "nowhere.png", "text": "cough"}, "image file not found"),
        ({"id": "x5", "label": "mild", "image": "broken.png", "text": "cough"}, "unreadable image"),
    ],
)
def test_bad_record_error_names_record(tmp_path, bad_record, message):
    data_dir = bad_dataset(tmp_path, bad_record)
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    command = [
        sys.executable, str(REPO_ROOT / "train_rmt.py"),
        "--train_file", str(data_dir / "train.jsonl"), "--labels", "mild", "severe",
        "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none",
    ]  # fmt: skip
    result = run_command(command, tmp_path)
    assert result.returncode != 0
    assert f"line 7 (id='{bad_record['id']}')" in result.stderr
    assert message in result.stderr


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_data_training_loss_falls(covid_data_dir, minilm_dir, tmp_path):
    from datasets_scripts.covid_chestxray import convert

    data_dir = tmp_path / "covid"
    convert(covid_data_dir, data_dir, seed=42)
    output_dir = tmp_path / "model"
    command = train_command(data_dir, output_dir, minilm_dir)
    command[command.index("--config_overrides") : command.index("--config_overrides") + 2] = []
    command += [
        "--max_train_samples", "48", "--max_eval_samples", "16", "--num_train_epochs", "4",
        "--per_device_train_batch_size", "16", "--learning_rate", "2e-4", "--logging_steps", "1",
        "--save_strategy", "no", "--image_size", "64", "--allow_outside_paths",
    ]  # fmt: skip
    result = run_command(command, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 8
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"loss did not fall: first steps {losses[:3]}, last steps {losses[-3:]}"


def test_last_checkpoint_skips_incomplete(tmp_path):
    from transformers import TrainingArguments

    from train_rmt import find_last_checkpoint

    for step, complete in ((5, True), (10, True), (15, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    args = TrainingArguments(output_dir=str(tmp_path), do_train=True, report_to="none")
    assert find_last_checkpoint(args) == str(tmp_path / "checkpoint-10")


def test_last_checkpoint_none_in_folder_without_checkpoints(tmp_path):
    from transformers import TrainingArguments

    from train_rmt import find_last_checkpoint

    (tmp_path / "all_results.json").write_text("{}")
    args = TrainingArguments(output_dir=str(tmp_path), do_train=True, report_to="none")
    assert find_last_checkpoint(args) is None


def tiny_train_command(data_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "train_rmt.py"),
        "--train_file", str(data_dir / "train.jsonl"),
        "--output_dir", str(tmp_path / "out"), "--do_train", "--report_to", "none",
        *extra,
    ]  # fmt: skip


def test_empty_train_file_raises_clearly(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    result = run_command(tiny_train_command(tmp_path, tmp_path), tmp_path)
    assert result.returncode != 0
    assert "contains no labeled records" in result.stderr


def test_integer_labels_raise_clearly(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "label": 0, "image": None, "text": "cough"}])
    result = run_command(tiny_train_command(tmp_path, tmp_path), tmp_path)
    assert result.returncode != 0
    assert "labels must be JSON strings" in result.stderr


def test_duplicate_labels_option_raises(tmp_path):
    data_dir = bad_dataset(tmp_path, {"id": "x", "label": "mild", "image": None, "text": "cough"})
    result = run_command(tiny_train_command(data_dir, tmp_path, "--labels", "mild", "severe", "mild"), tmp_path)
    assert result.returncode != 0
    assert "--labels contains duplicates: ['mild']" in result.stderr


def test_missing_train_file_raises_clearly(tmp_path):
    result = run_command(tiny_train_command(tmp_path / "nowhere", tmp_path), tmp_path)
    assert result.returncode != 0
    assert "--train_file not found" in result.stderr


def test_same_file_for_two_splits_raises(tmp_path):
    data_dir = bad_dataset(tmp_path, {"id": "x", "label": "mild", "image": None, "text": "cough"})
    command = tiny_train_command(data_dir, tmp_path, "--validation_file", str(data_dir / "train.jsonl"))
    result = run_command(command, tmp_path)
    assert result.returncode != 0
    assert "given for both train and validation" in result.stderr


def test_inferred_labels_logged_with_counts(tmp_path):
    data_dir = bad_dataset(tmp_path, {"id": "x", "label": "moderate", "image": None, "text": "cough"})
    command = tiny_train_command(data_dir, tmp_path, "--max_steps", "0")
    result = run_command(command, tmp_path)
    assert "Labels inferred from the training file" in result.stdout + result.stderr
    assert "'moderate': 1" in result.stdout + result.stderr


def test_build_model_applies_attention_strategy(minilm_dir):
    from train_rmt import DataArguments, ModelArguments, build_model

    model_args = ModelArguments(
        text_model_name_or_path=str(minilm_dir),
        config_overrides=TINY_ENCODER,
        image_model_name="resnet10t",
        image_pretrained=False,
        attention_strategy="fused",
    )
    data_args = DataArguments(train_file="unused.jsonl", image_size=32)
    model = build_model(model_args, data_args, {0: "mild", 1: "severe"})
    assert model.config.attention_strategy == "fused"
