"""Model card rendering, and train_rmt.py with --calibrate and --push_to_hub against a local stand-in Hub."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from configuration_rmt import RMTConfig
from model_card_rmt import (
    CardContext,
    SplitSummary,
    load_study_results,
    render_model_card,
    summarize_split,
    write_model_card,
)
from tests.test_train import run_command, train_command
from tests.tiny import TINY_TEXT_CONFIG

CODE_FILES = ("configuration_rmt.py", "modeling_rmt.py", "processing_rmt.py", "pipeline_rmt.py")
HUB_REPO = "local-user/rmt-tiny"

RESULTS = {
    "test_routed_samples": 20,
    "test_routed_accuracy": 0.8,
    "test_routed_roc_auc": 0.9,
    "test_image_samples": 12,
    "test_image_accuracy": 0.75,
    "validation_image_ece_before": 0.21,
    "validation_image_ece_after": 0.04,
    "test_image_ece_before": 0.25,
    "test_image_ece_after": 0.07,
}
STUDY = {
    "confidence_level": 0.9,
    "intervals": {"test_routed_accuracy": [0.7, 0.88]},
    "robustness_caption": "Routed test accuracy with a share of the X-rays removed.",
    "robustness": [{"missing_image_rate": 0.0, "accuracy": 0.8}, {"missing_image_rate": 0.5, "accuracy": 0.74}],
}


def card_context(**overrides) -> CardContext:
    config = RMTConfig(
        text_config=dict(TINY_TEXT_CONFIG),
        text_model_name_or_path="/home/someone/models/minilm",
        image_model_name="resnet10t",
        temperatures={"image": 2.5},
    )
    settings = {
        "model_name": "rmt-tiny",
        "config": config,
        "positive_label": "severe",
        "splits": {
            "train": SplitSummary(40, {"image+text": 30, "image only": 5, "text only": 5}, {"mild": 22, "severe": 18}),
            "test": SplitSummary(20, {"image+text": 12, "text only": 8}, {"mild": 10, "severe": 10}),
        },
        "data_files": {"train": "train.jsonl", "test": "test.jsonl"},
        "training": {"learning rate": 1e-3, "epochs": 2.0},
        "repo_id": HUB_REPO,
    }
    settings.update(overrides)
    return CardContext(**settings)


def test_card_metadata_parses():
    card = ModelCard(render_model_card(card_context(), RESULTS))
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "image-text-classification" in card.data.tags
    assert "medical" in card.data.tags


def test_card_base_model_only_for_hub_ids():
    local = ModelCard(render_model_card(card_context(base_model="/tmp/some/folder"), RESULTS))
    hub = ModelCard(render_model_card(card_context(base_model="nreimers/MiniLM-L6-H384-uncased"), RESULTS))
    assert local.data.base_model is None
    assert hub.data.base_model == "nreimers/MiniLM-L6-H384-uncased"


def test_card_states_intended_use_and_loading():
    text = render_model_card(card_context(), RESULTS)
    assert "not a medical device" in text
    assert "trust_remote_code=True" in text
    assert "modality_mask" in text
    assert f'pipeline("image-text-classification", model="{HUB_REPO}"' in text
    assert "## Limitations" in text


def test_card_hides_local_paths():
    text = render_model_card(card_context(), RESULTS)
    assert "/home/someone" not in text
    assert "a local folder named `minilm`" in text


def test_card_lists_data_and_metrics():
    text = render_model_card(card_context(), RESULTS)
    assert "| train | 40 | 30 | 5 | 5 | 22 | 18 |" in text
    assert "| test | 20 | 12 | 0 | 8 | 10 | 10 |" in text
    assert "| routed | 20 | 0.800 | n/a | n/a | n/a | 0.900 |" in text
    assert "No confidence intervals" in text
    assert "## Robustness" not in text


def test_card_shows_study_intervals_and_robustness():
    text = render_model_card(card_context(), RESULTS, STUDY)
    assert "| routed | 20 | 0.800 [0.700, 0.880] |" in text
    assert "90% confidence intervals" in text
    assert "## Robustness" in text
    assert "| missing_image_rate | accuracy |" in text
    assert "| 0.500 | 0.740 |" in text


def test_card_calibration_table():
    text = render_model_card(card_context(), RESULTS)
    assert "| validation | image | 2.500 | 0.210 | 0.040 |" in text
    assert "| test | image | 2.500 | 0.250 | 0.070 |" in text


def test_card_without_calibration_lists_temperatures():
    uncalibrated = {key: value for key, value in RESULTS.items() if "_ece_" not in key}
    text = render_model_card(card_context(), uncalibrated)
    assert "No calibration was run. Temperatures: image 2.500, text 1.000, multimodal 1.000." in text


def test_write_model_card_reads_all_results(tmp_path):
    (tmp_path / "all_results.json").write_text(json.dumps(RESULTS))
    path = write_model_card(tmp_path, card_context())
    assert path == tmp_path / "README.md"
    assert "| routed | 20 | 0.800 |" in path.read_text()


@pytest.mark.parametrize(
    "study,message",
    [
        ({"intervals": {"test_routed_accuracy": [0.9, 0.1]}}, "interval 'test_routed_accuracy' must be"),
        ({"intervals": {"test_routed_accuracy": 0.8}}, "must be \\[low, high\\]"),
        ({"robustness": {"rate": 0.5}}, "'robustness' must be a list"),
    ],
)
def test_study_results_rejects_bad_layout(tmp_path, study, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(study))
    with pytest.raises(ValueError, match=message):
        load_study_results(path)


def test_study_results_rejects_invalid_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="results.json.*not valid JSON"):
        load_study_results(path)


def test_study_results_default_location(tmp_path):
    from train_rmt import PublishingArguments, find_study_results

    assert find_study_results(PublishingArguments(), str(tmp_path)) is None
    default = tmp_path / "study" / "results.json"
    default.parent.mkdir()
    default.write_text("{}")
    assert find_study_results(PublishingArguments(), str(tmp_path)) == str(default)
    assert find_study_results(PublishingArguments(study_results="other.json"), str(tmp_path)) == "other.json"


def test_summarize_split_counts_patterns():
    summary = summarize_split([0, 1, 1, 0], ["a.png", "b.png", None, None], ["x", None, "y", "z"], {0: "mild", 1: "severe"})
    assert summary.samples == 4
    assert summary.modality_patterns == {"image+text": 1, "image only": 1, "text only": 2}
    assert summary.labels == {"mild": 2, "severe": 2}


# Runs train_rmt.py with `transformers.trainer.hf_api` replaced by a stand-in whose upload_folder copies
# the files the Hub would receive (the Trainer's ignore patterns plus huggingface_hub's defaults, matched
# with huggingface_hub's own filter) into a local folder per repository. Nothing reaches the network.
LOCAL_HUB_TRAIN = textwrap.dedent(
    """
    import json, runpy, shutil, sys
    from concurrent.futures import Future
    from pathlib import Path
    from types import SimpleNamespace
    from unittest import mock

    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    hub_root = Path(sys.argv.pop(1))
    sys.argv = sys.argv[1:]


    class LocalHub:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message=None, allow_patterns=None,
                          ignore_patterns=None, run_as_future=False, **kwargs):
            folder = Path(folder_path)
            names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
            ignore = list(ignore_patterns or []) + list(DEFAULT_IGNORE_PATTERNS)
            kept = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore))
            for name in kept:
                target = hub_root / repo_id / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, target)
            with open(hub_root / "commits.jsonl", "a") as log:
                log.write(json.dumps({"repo_id": repo_id, "message": commit_message, "files": kept}) + "\\n")
            result = SimpleNamespace(commit_url=f"local://{repo_id}")
            if run_as_future:
                future = Future()
                future.set_result(result)
                return future
            return result


    with mock.patch("transformers.trainer.hf_api", return_value=LocalHub()):
        runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


@dataclass
class PushedRun:
    data_dir: Path
    output_dir: Path
    repo: Path
    stdout: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, minilm_dir) -> PushedRun:
    """Train a tiny RMT with --calibrate and --push_to_hub into the local stand-in Hub."""
    from datasets_scripts.synthetic import make_synthetic_dataset

    workdir = tmp_path_factory.mktemp("push")
    data_dir = workdir / "data"
    make_synthetic_dataset(data_dir, num_samples=60, image_size=32, seed=1)
    output_dir = workdir / "rmt-tiny"
    study_results = workdir / "study" / "results.json"
    study_results.parent.mkdir()
    study_results.write_text(json.dumps(STUDY))
    hub_root = workdir / "hub"
    hub_root.mkdir()
    script = workdir / "train_with_local_hub.py"
    script.write_text(LOCAL_HUB_TRAIN)

    command = train_command(data_dir, output_dir, minilm_dir, "--num_train_epochs", "2", "--save_strategy", "no")
    command[1:1] = [str(script), str(hub_root)]
    command += ["--calibrate", "--study_results", str(study_results), "--push_to_hub", "--hub_model_id", HUB_REPO]
    result = run_command(command, workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return PushedRun(data_dir, output_dir, hub_root / HUB_REPO, result.stdout)


def test_push_uploads_model_code_and_card(pushed):
    repo = pushed.repo
    uploaded = {path.relative_to(repo).as_posix() for path in repo.rglob("*") if path.is_file()}
    expected = {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"}
    assert expected <= uploaded, sorted(uploaded)
    for name in CODE_FILES:
        assert name in uploaded, f"{name} was not uploaded"
    assert not any(name.startswith("checkpoint-") for name in uploaded)


def test_push_card_is_rmt_card(pushed):
    output_dir, repo = pushed.output_dir, pushed.repo
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    assert "## Calibration" in card.text
    assert "90% confidence intervals" in card.text
    assert "## Robustness" in card.text
    assert f'model="{HUB_REPO}"' in card.text
    assert (repo / "README.md").read_text() == (output_dir / "README.md").read_text()


def test_push_config_has_pipeline_and_temperatures(pushed):
    repo = pushed.repo
    config = json.loads((repo / "config.json").read_text())
    assert "image-text-classification" in config["custom_pipelines"]
    assert set(config["temperatures"]) == {"image", "text", "multimodal"}
    assert any(value != 1.0 for value in config["temperatures"].values())


def test_train_calibrate_writes_ece_before_and_after(pushed):
    output_dir, stdout = pushed.output_dir, pushed.stdout
    results = json.loads((output_dir / "all_results.json").read_text())
    config = json.loads((output_dir / "config.json").read_text())
    for head in ("image", "text", "multimodal"):
        assert results[f"temperature_{head}"] == pytest.approx(config["temperatures"][head])
        for split in ("validation", "test"):
            for moment in ("before", "after"):
                assert 0.0 <= results[f"{split}_{head}_ece_{moment}"] <= 1.0, f"{split}_{head}_ece_{moment}"
    assert "Calibration (temperatures fitted on validation)" in stdout


def test_train_calibrate_lowers_validation_nll(pushed):
    output_dir = pushed.output_dir
    results = json.loads((output_dir / "all_results.json").read_text())
    for head in ("image", "text", "multimodal"):
        assert results[f"validation_{head}_nll_after"] <= results[f"validation_{head}_nll_before"] + 1e-9, head


UPLOADED_PIPELINE = textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    folder, image = sys.argv[1:3]
    classifier = pipeline(model=folder, trust_remote_code=True, device="cpu")
    print(json.dumps([classifier({"image": image}), classifier({"text": "Progressive dyspnea."})]))
    """
)


def test_uploaded_folder_runs_pipeline(pushed, tmp_path):
    repo = pushed.repo
    image = next((pushed.data_dir / "images").iterdir())
    script = tmp_path / "classify.py"
    script.write_text(UPLOADED_PIPELINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), str(repo), str(image)],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    image_answer, text_answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert image_answer["head"] == "image"
    assert text_answer["head"] == "text"
