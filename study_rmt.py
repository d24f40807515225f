#!/usr/bin/env python
"""Compare RMT with its ablations and baselines, and measure how each copes with a missing modality.

    python study_rmt.py --train_file data/train.jsonl --validation_file data/validation.jsonl \
        --test_file data/test.jsonl --preset small --output_dir outputs/study

Each run trains one model and stores its test predictions under every view in
`OUTPUT_DIR/runs/NAME/predictions.json`. The models are RMT, RMT without multi-task learning, RMT
without mask attention, MMBT, an image-only CNN, a text-only BERT, ConcatBert, TF-IDF + random forest,
TF-IDF + gradient boosting, and RMT under other task weights. A run whose predictions file exists is
reused. A failing run is logged and listed with its error while the others go on.

The scores are then computed from the stored predictions: test metrics per input with bootstrap
intervals, and the robustness sweeps, in which the text (or the X-ray) stays visible for a share of
the complete test samples. The folder receives `results.json`, `results.md` and the PNG plots.
docs/study.md describes the outputs.
"""

import hashlib
import json
import logging
import sys
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import HfArgumentParser

from processing_rmt import RMTProcessor
from study.analysis import (
    RECORDED,
    EvaluationSettings,
    EvaluationSplit,
    analyze,
)
from study.plots import plot_roc_curves, plot_sweep
from study.presets import PRESETS, TASK_WEIGHT_GRID, StudySettings, resolve_text_model
from study.report import render_report
from study.runs import (
    MODEL_RUNS,
    RunSpec,
    StudyData,
    execute_run,
    json_ready,
    natural_view,
    task_weight_run,
    write_json,
)
from train_rmt import (
    DataArguments,
    ModelArguments,
    build_processor,
    load_metric,
    load_splits,
    log_split_counts,
    resolve_labels,
    split_files,
)

logger = logging.getLogger("study_rmt")

PREDICTIONS_FILE = "predictions.json"
RUN_CONFIG_FILE = "run_config.json"
ERROR_FILE = "error.txt"
# Settings that change what is reported but not what a run trains, so a finished run stays reusable.
REPORTING_SETTINGS = ("task_weight_grid", "bootstrap_samples", "eval_batch_size", "logging_steps")
# Inputs of the performance table and the task names `model_card_rmt.py` reads for their intervals.
MODEL_CARD_TASKS = {RECORDED: "routed", "image": "image", "text": "text", "image+text": "multimodal"}
PATTERN_NAMES = {"image+text": "image+text", "image": "image only", "text": "text only"}


@dataclass
class StudyArguments:
    """Data, preset and evaluation settings of the study. Preset values can be overridden one by one."""

    train_file: str = field(metadata={"help": "Training JSONL file (format in README.md)."})
    test_file: str = field(metadata={"help": "Test JSONL file; every score of the study is taken on it."})
    output_dir: str = field(metadata={"help": "Folder for results.json, results.md, the plots and runs/."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation JSONL file; its metrics are reported as recorded."}
    )
    preset: str = field(
        default="small",
        metadata={
            "help": "tiny (tests, a few steps), small (MiniLM and resnet10t at 64 px, for a CPU) or paper "
            "(bert-base-chinese and ResNet-152 at 224 px with the full task-weight grid, for a GPU).",
            "choices": list(PRESETS),
        },
    )
    models: list[str] | None = field(
        default=None,
        metadata={"help": f"Models to run, default all: {', '.join(MODEL_RUNS)}.", "choices": list(MODEL_RUNS)},
    )
    task_weight_grid: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Named task weights of extra RMT runs, from {', '.join(TASK_WEIGHT_GRID)}; 'none' for no "
            "grid. Defaults to the preset's grid."
        },
    )
    task_weights: list[str] | None = field(
        default=None,
        metadata={"help": "More RMT runs, one per 'IMAGE,TEXT,MULTIMODAL' loss-weight triple, e.g. 0.5,0.25,0.25."},
    )
    visibility_rates: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9],
        metadata={"help": "Shares of the complete test samples that keep the swept modality, each in [0, 1]."},
    )
    num_repeats: int = field(default=5, metadata={"help": "Seeds (visibility masks) per visibility rate."})
    bootstrap_samples: int | None = field(
        default=None, metadata={"help": "Bootstrap replicates for the confidence intervals (default: the preset's)."}
    )
    confidence_level: float = field(default=0.95, metadata={"help": "Level of the bootstrap intervals."})
    seed: int = field(default=42, metadata={"help": "Seed of training, the visibility masks and the bootstrap."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "Label set in class-id order (default: the sorted training labels)."}
    )
    positive_label: str | None = field(
        default=None,
        metadata={"help": "Positive class for sensitivity, specificity and ROC-AUC (default: the last label)."},
    )
    allow_outside_paths: bool = field(
        default=False, metadata={"help": "Accept image paths that resolve outside the JSONL file's folder."}
    )
    on_bad_record: str = field(
        default="error",
        metadata={"help": "'error' stops on invalid records, 'skip' drops them.", "choices": ["error", "skip"]},
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Encoder and tokenizer folder or Hub id (default: the preset's)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Encoder config overrides; the encoder then starts from random weights."}
    )
    image_model_name: str | None = field(default=None, metadata={"help": "timm CNN name (default: the preset's)."})
    image_pretrained: bool | None = field(
        default=None, metadata={"help": "Start the CNN from timm's ImageNet weights, which are downloaded."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Image side in pixels."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Maximum text length in tokens."})
    num_train_epochs: float | None = field(default=None, metadata={"help": "Training epochs per run."})
    max_steps: int | None = field(default=None, metadata={"help": "Training steps per run; overrides epochs when > 0."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate of AdamW."})
    train_batch_size: int | None = field(default=None, metadata={"help": "Training batch size per device."})
    attention_strategy: str | None = field(
        default=None,
        metadata={
            "help": "Mask attention of the RMT runs: per_task (three encoder passes) or fused (one pass with a "
            "structured mask, about half the cost). Default: the preset's.",
            "choices": ["per_task", "fused"],
        },
    )
    mixed_precision: str = field(
        default="no", metadata={"help": "Mixed precision of the neural runs.", "choices": ["no", "fp16", "bf16"]}
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch (default: torch's choice, usually the core count)."}
    )

    def __post_init__(self):
        if any(not 0.0 <= rate <= 1.0 for rate in self.visibility_rates):
            raise ValueError(f"--visibility_rates must lie in [0, 1], got {self.visibility_rates}.")
        if self.num_repeats < 1:
            raise ValueError(f"--num_repeats must be at least 1, got {self.num_repeats}.")
        if not 0.0 < self.confidence_level < 1.0:
            raise ValueError(f"--confidence_level must lie in (0, 1), got {self.confidence_level}.")


def parse_args(argv: list[str] | None = None) -> StudyArguments:
    (args,) = HfArgumentParser(StudyArguments).parse_args_into_dataclasses(args=argv)
    return args


def setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()


def parse_weight_triple(text: str) -> tuple[float, float, float]:
    """Parse 'IMAGE,TEXT,MULTIMODAL' into three non-negative weights with a positive sum."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise ValueError(
            f"--task_weights {text!r} is not three comma-separated numbers, e.g. 0.5,0.25,0.25."
        ) from error
    if len(weights) != 3 or any(weight < 0 for weight in weights) or sum(weights) <= 0:
        raise ValueError(f"--task_weights {text!r} must be three non-negative numbers with a positive sum.")
    return weights


def resolve_settings(args: StudyArguments) -> StudySettings:
    """Return the preset's settings with every option given on the command line applied."""
    overrides = {
        name: getattr(args, name)
        for name in (
            "text_model_name_or_path",
            "config_overrides",
            "image_model_name",
            "image_pretrained",
            "image_size",
            "max_seq_length",
            "num_train_epochs",
            "max_steps",
            "learning_rate",
            "train_batch_size",
            "attention_strategy",
            "bootstrap_samples",
        )
        if getattr(args, name) is not None
    }
    if args.task_weight_grid is not None:
        grid = tuple(name for name in args.task_weight_grid if name != "none")
        unknown = sorted(set(grid) - set(TASK_WEIGHT_GRID))
        if unknown:
            raise ValueError(
                f"--task_weight_grid has unknown names {unknown}; choose from {list(TASK_WEIGHT_GRID)} or none."
            )
        overrides["task_weight_grid"] = grid
    settings = replace(PRESETS[args.preset], **overrides)
    settings.text_model_name_or_path = resolve_text_model(settings.text_model_name_or_path)
    return settings


def plan_runs(args: StudyArguments, settings: StudySettings) -> list[RunSpec]:
    """Return the runs of the study: the chosen models, then the RMT runs of the task-weight grid."""
    specs = [MODEL_RUNS[name] for name in (args.models or MODEL_RUNS)]
    specs += [task_weight_run(name, TASK_WEIGHT_GRID[name]) for name in settings.task_weight_grid]
    for text in args.task_weights or []:
        weights = parse_weight_triple(text)
        specs.append(task_weight_run("_".join(f"{weight:g}" for weight in weights), weights))
    names = [spec.name for spec in specs]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"Runs {duplicates} are requested twice; drop the repeated models or task weights.")
    return specs


def read_patient_ids(path: str) -> dict[str, str]:
    """Return `{sample id: patient_id}` for the records of a JSONL file that carry a non-empty `patient_id`."""
    patient_ids = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # load_splits has already rejected or dropped the invalid lines
            if isinstance(record, dict) and "id" in record and record.get("patient_id") not in (None, ""):
                patient_ids[str(record["id"])] = str(record["patient_id"])
    return patient_ids


def load_study_data(args: StudyArguments) -> StudyData:
    """Load and validate the splits with the checks of train_rmt.py."""
    data_args = DataArguments(
        train_file=args.train_file,
        validation_file=args.validation_file,
        test_file=args.test_file,
        labels=args.labels,
        positive_label=args.positive_label,
        allow_outside_paths=args.allow_outside_paths,
        on_bad_record=args.on_bad_record,
    )
    files = split_files(data_args)
    labels = resolve_labels(data_args, ModelArguments(), files["train"])
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    positive_label = args.positive_label or labels[-1]
    if positive_label not in label2id:
        raise ValueError(f"--positive_label {positive_label!r} is not one of the labels {labels}.")
    splits = load_splits(files, label2id, data_args)
    log_split_counts(splits, id2label)
    return StudyData(splits, id2label, label2id[positive_label], files, args.allow_outside_paths, args.on_bad_record)


def evaluation_split(dataset: datasets.Dataset, path: str) -> tuple[EvaluationSplit, str]:
    """Return the split's labels, recorded views and bootstrap groups, and the resampling unit."""
    ids = list(dataset["id"])
    patient_ids = read_patient_ids(path)
    views = [natural_view({"image": image, "text": text}) for image, text in zip(dataset["image"], dataset["text"])]
    split = EvaluationSplit(ids, np.asarray(dataset["label"]), views, [patient_ids.get(i, i) for i in ids])
    return split, "patient" if patient_ids else "sample"


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_fingerprint(spec: RunSpec, settings: StudySettings, data: StudyData, args: StudyArguments) -> dict[str, Any]:
    """Return everything that decides what a run trains and predicts; a reused run must match it."""
    training_settings = {key: value for key, value in asdict(settings).items() if key not in REPORTING_SETTINGS}
    return {
        "spec": asdict(spec),
        "settings": training_settings,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "labels": [data.id2label[index] for index in range(len(data.id2label))],
        "data_sha256": {split: file_sha256(path) for split, path in data.files.items()},
    }


def check_reusable_runs(specs: list[RunSpec], fingerprints: dict[str, dict], runs_dir: Path) -> None:
    """Raise ValueError when a finished run in `runs_dir` was made with other settings or data."""
    for spec in specs:
        run_dir = runs_dir / spec.name
        if not (run_dir / PREDICTIONS_FILE).is_file():
            continue
        config_path = run_dir / RUN_CONFIG_FILE
        if not config_path.is_file():
            raise ValueError(
                f"{run_dir} has {PREDICTIONS_FILE} but no {RUN_CONFIG_FILE}, so its settings cannot be checked. "
                "Delete that folder to redo the run."
            )
        stored = json.loads(config_path.read_text(encoding="utf-8"))["fingerprint"]
        expected = json.loads(json.dumps(fingerprints[spec.name]))
        if stored != expected:
            differing = sorted(key for key in expected if stored.get(key) != expected[key])
            raise ValueError(
                f"{run_dir} was made with other {', '.join(differing)}. Delete that folder to redo the run, "
                "or choose another --output_dir."
            )


def execute_runs(
    specs: list[RunSpec], settings: StudySettings, data: StudyData, args: StudyArguments, runs_dir: Path
) -> dict[str, dict[str, Any]]:
    """Train and predict every run that has no predictions file yet; return the status of each run."""
    fingerprints = {spec.name: run_fingerprint(spec, settings, data, args) for spec in specs}
    check_reusable_runs(specs, fingerprints, runs_dir)
    processor = build_processor(
        ModelArguments(text_model_name_or_path=settings.text_model_name_or_path),
        DataArguments(train_file=args.train_file, image_size=settings.image_size),
    )
    statuses = {}
    with logging_redirect_tqdm():
        for spec in tqdm(specs, desc="Study runs", unit="run"):
            run_dir = runs_dir / spec.name
            if (run_dir / PREDICTIONS_FILE).is_file():
                logger.info(f"{spec.name}: reusing the finished run in {run_dir}")
                statuses[spec.name] = {"status": "reused"}
                continue
            fingerprint = fingerprints[spec.name]
            statuses[spec.name] = execute_one_run(spec, settings, data, processor, run_dir, args, fingerprint)
    counts = Counter(status["status"] for status in statuses.values())
    logger.info(f"Runs: {len(specs)} ({', '.join(f'{key} {value}' for key, value in sorted(counts.items()))})")
    return statuses


def execute_one_run(
    spec: RunSpec,
    settings: StudySettings,
    data: StudyData,
    processor: RMTProcessor,
    run_dir: Path,
    args: StudyArguments,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """Run one model and write its predictions. An `Exception` from the run is logged and returned, not raised."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    write_json(run_dir / RUN_CONFIG_FILE, {"fingerprint": fingerprint, "settings": asdict(settings)})
    logger.info(f"{spec.name}: training {spec.label}")
    try:
        record = execute_run(spec, settings, data, processor, run_dir, args.seed, args.mixed_precision)
    except Exception as error:  # any failure of one model must leave the other runs going
        message = f"{type(error).__name__}: {error}"
        logger.error(f"{spec.name}: run failed ({message}); the study continues with the other runs.")
        (run_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        return {"status": "failed", "error": message}
    write_json(run_dir / PREDICTIONS_FILE, record)
    train = record["train"]
    logger.info(f"{spec.name}: finished in {train['seconds']} s on {train['samples']} training samples")
    return {"status": "trained"}


def load_records(specs: list[RunSpec], runs_dir: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for spec in specs:
        path = runs_dir / spec.name / PREDICTIONS_FILE
        if path.is_file():
            records[spec.name] = json.loads(path.read_text(encoding="utf-8"))
    return records


def describe_runs(specs: list[RunSpec], statuses: dict, records: dict) -> dict[str, dict[str, Any]]:
    runs = {}
    for spec in specs:
        runs[spec.name] = {
            "label": spec.label,
            "group": spec.group,
            "input_modalities": list(spec.input_modalities),
            "task_weights": list(spec.task_weights),
            **statuses[spec.name],
            "train": records.get(spec.name, {}).get("train"),
        }
    return runs


def describe_split(split: EvaluationSplit) -> dict[str, Any]:
    patterns = Counter(split.recorded_views)
    return {
        "samples": len(split.ids),
        "groups": len(set(split.groups)),
        "patterns": dict(patterns),
        "patterns_text": ", ".join(f"{count} {PATTERN_NAMES[view]}" for view, count in sorted(patterns.items())),
    }


def model_card_entries(results: dict[str, Any], confidence_level: float) -> dict[str, Any]:
    """Return the keys `model_card_rmt.py` reads: intervals and robustness rows of the study's RMT run."""
    performance = results["performance"].get("rmt")
    if performance is None:
        return {}
    intervals = {}
    for input_name, entry in performance.items():
        for metric, interval in entry.get("intervals", {}).items():
            if interval is not None:
                intervals[f"test_{MODEL_CARD_TASKS[input_name]}_{metric}"] = interval
    robustness = []
    for modality, sweep in results["sweeps"].items():
        for rate, summary in sweep["runs"].get("rmt", {}).items():
            robustness.append(
                {
                    "visible modality share": f"{float(rate):.0%} {modality}",
                    "accuracy": summary["mean"]["accuracy"],
                    "roc_auc": summary["mean"]["roc_auc"],
                }
            )
    return {
        "confidence_level": confidence_level,
        "intervals": intervals,
        "robustness_caption": "Test accuracy and ROC-AUC of the study's RMT run on the complete test samples when "
        "the text or the X-ray stays visible for only a share of them (mean over the visibility seeds).",
        "robustness": robustness,
    }


def write_outputs(
    results: dict[str, Any], records: dict, test: EvaluationSplit, pos_label: int, output_dir: Path
) -> None:
    write_json(output_dir / "results.json", results)
    (output_dir / "results.md").write_text(render_report(json_ready(results)), encoding="utf-8")
    written = ["results.json", "results.md"]
    for modality in ("text", "image"):
        path = output_dir / f"accuracy_{modality}_visibility.png"
        if plot_sweep(results, results["runs"], modality, path):
            written.append(path.name)
    if records:
        plot_roc_curves(results, records, results["runs"], test, pos_label, output_dir / "roc_curves.png")
        written.append("roc_curves.png")
    logger.info(f"Wrote {', '.join(written)} to {output_dir}")


def evaluation_splits(data: StudyData) -> tuple[dict[str, EvaluationSplit], str]:
    """Return the test (and validation) splits to score, and the bootstrap's resampling unit of the test split."""
    test, unit = evaluation_split(data.splits["test"], data.files["test"])
    splits = {"test": test}
    if "validation" in data.splits:
        splits["validation"], _ = evaluation_split(data.splits["validation"], data.files["validation"])
    return splits, unit


def score_runs(
    records: dict[str, dict[str, Any]],
    splits: dict[str, EvaluationSplit],
    args: StudyArguments,
    settings: StudySettings,
    data: StudyData,
) -> dict[str, Any]:
    evaluation = EvaluationSettings(
        visibility_rates=tuple(args.visibility_rates),
        num_repeats=args.num_repeats,
        bootstrap_samples=settings.bootstrap_samples,
        confidence_level=args.confidence_level,
        seed=args.seed,
        pos_label=data.pos_label,
        num_labels=len(data.id2label),
    )
    return analyze(records, splits, evaluation, load_metric())


def describe_study(
    args: StudyArguments, settings: StudySettings, data: StudyData, splits: dict[str, EvaluationSplit], unit: str
) -> dict[str, Any]:
    return {
        "preset": args.preset,
        "arguments": asdict(args),
        "settings": asdict(settings),
        "labels": [data.id2label[index] for index in range(len(data.id2label))],
        "positive_label": data.id2label[data.pos_label],
        "resampling_unit": unit,
        "bootstrap_samples": settings.bootstrap_samples,
        "num_repeats": args.num_repeats,
        "confidence_level": args.confidence_level,
        "data": {name: describe_split(split) for name, split in splits.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    settings = resolve_settings(args)
    specs = plan_runs(args, settings)
    output_dir = Path(args.output_dir)
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    data = load_study_data(args)
    statuses = execute_runs(specs, settings, data, args, runs_dir)
    records = load_records(specs, runs_dir)

    splits, unit = evaluation_splits(data)
    scores = score_runs(records, splits, args, settings, data)
    results = {
        "study": describe_study(args, settings, data, splits, unit),
        **model_card_entries(scores, args.confidence_level),
        "runs": describe_runs(specs, statuses, records),
        **scores,
    }
    write_outputs(results, records, splits["test"], data.pos_label, output_dir)

    failed = [name for name, status in statuses.items() if status["status"] == "failed"]
    if failed:
        logger.error(
            f"{len(failed)} run(s) failed: {', '.join(failed)}. Their errors are in results.md and runs/*/{ERROR_FILE}."
        )
    return results


if __name__ == "__main__":
    study_results = main()
    # A failed run does not stop the study, but exit status 1 lets scripts notice the missing results.
    sys.exit(1 if any(run["status"] == "failed" for run in study_results["runs"].values()) else 0)
