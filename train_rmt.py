#!/usr/bin/env python
"""Train and evaluate RMT on JSONL data where some samples lack the X-ray or the clinical text.

Each JSONL line is one sample: `{"id": ..., "label": ..., "image": ..., "text": ...}`. `image` is a path
relative to the JSONL file's folder, or null when the X-ray is absent; `text` is null or empty when the
notes are absent. Other keys (for example `patient_id`) are kept and ignored.

    accelerate launch train_rmt.py --train_file data/train.jsonl --validation_file data/validation.jsonl \
        --test_file data/test.jsonl --output_dir outputs/rmt --do_train --do_eval --do_predict

Every `TrainingArguments` flag works (fp16/bf16, resume, push_to_hub, ...). After training, each split is
evaluated four times: routed predictions (each sample answered by the head matching its modalities) and
the image, text and multimodal tasks, each on the samples that have that task's modalities, with the
other modality masked.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    EvalPrediction,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from calibration_rmt import (
    HEADS,
    calibrate_head,
    expected_calibration_error,
    format_calibration_table,
    reset_temperatures,
    softmax_with_temperature,
)
from configuration_rmt import RMTConfig
from datasets_scripts.validate import (
    ValidationOptions,
    ValidationReport,
    format_findings,
    has_text,
    infer_labels,
    read_labels,
    validate_files,
)
from feature_cache_rmt import ImageFeatureCache
from model_card_rmt import CardContext, summarize_split, write_model_card
from modeling_rmt import RMTForMultimodalClassification
from processing_rmt import RMTProcessor

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
METRIC_PATH = REPO_ROOT / "metrics" / "rmt_classification"
# A checkpoint folder that contains one of these files has safetensors weights. The patterns match pickle files.
SAFETENSORS_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth")
MODALITY_PATTERNS = {(True, True): "image+text", (True, False): "image only", (False, True): "text only"}
# Task name -> (modalities a sample must have, modality hidden from the model during its evaluation).
EVALUATION_TASKS = {
    "routed": ((), None),
    "image": (("image",), "text"),
    "text": (("text",), "image"),
    "multimodal": (("image", "text"), None),
}


@dataclass
class ModelArguments:
    """Backbones RMT starts from and settings of its training."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A trained RMT (folder or Hub id) to fine-tune. Leave unset to build RMT from backbones."},
    )
    text_model_name_or_path: str = field(
        default="bert-base-chinese",
        metadata={"help": "BERT-family encoder and tokenizer (folder or Hub id) for the text tokens and the encoder."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override encoder config settings, e.g. 'num_hidden_layers=2,hidden_size=64,intermediate_size=128'. "
            "The encoder then starts from random weights; its tokenizer still comes from text_model_name_or_path."
        },
    )
    image_model_name: str = field(default="resnet152", metadata={"help": "timm model name of the image CNN."})
    image_pretrained: bool = field(
        default=True, metadata={"help": "Start the CNN from timm's ImageNet weights (downloads them from the Hub)."}
    )
    num_image_embeddings: int = field(default=3, metadata={"help": "Image embeddings per X-ray (pooled regions)."})
    task_weights: list[float] = field(
        default_factory=lambda: [0.3, 0.3, 0.4],
        metadata={"help": "Weights of the image, text and multimodal cross-entropies."},
    )
    use_mask_attention: bool = field(
        default=True, metadata={"help": "Isolate the image CLS from text and the text CLS from the image."}
    )
    use_multitask: bool = field(
        default=True, metadata={"help": "Train the image and text heads beside the multimodal head."}
    )
    attention_strategy: str = field(
        default="per_task",
        metadata={
            "help": "How mask attention runs: 'per_task' (three encoder passes) or 'fused' (one pass with a "
            "structured mask where only the multimodal CLS sees both modalities).",
            "choices": ["per_task", "fused"],
        },
    )
    allow_pickle_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Load weights from pickle files (pytorch_model.bin, *.pt, *.pth) when a --model_name_or_path or "
            "resume checkpoint folder has no model.safetensors. Unpickling can run arbitrary code: trusted files only."
        },
    )
    freeze_image_backbone: bool = field(
        default=False,
        metadata={
            "help": "Keep the CNN's weights and batch-norm statistics fixed in training (it runs in eval mode); the "
            "image projection and the rest of RMT still train. Also applies when fine-tuning --model_name_or_path."
        },
    )
    channels_last: bool = field(
        default=False,
        metadata={
            "help": "Store the CNN weights channels-last (NHWC), which cuDNN and oneDNN convolutions often run faster; "
            "docs/benchmarks.md has a measured ratio. The saved weights are the same."
        },
    )


@dataclass
class DataArguments:
    """JSONL split files and the settings that turn their samples into model inputs."""

    train_file: str | None = field(default=None, metadata={"help": "Training JSONL file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation JSONL file."})
    test_file: str | None = field(default=None, metadata={"help": "Test JSONL file."})
    labels: list[str] | None = field(
        default=None,
        metadata={
            "help": "The label set in class-id order. Defaults to the trained model's labels when fine-tuning, "
            "else to the sorted labels of the training file."
        },
    )
    positive_label: str | None = field(
        default=None,
        metadata={"help": "Positive class for sensitivity, specificity and ROC-AUC. Defaults to the last label."},
    )
    image_size: int = field(default=224, metadata={"help": "Side of the square model input in pixels."})
    max_seq_length: int = field(default=128, metadata={"help": "Maximum text length in tokens, CLS and SEP included."})
    augment: bool = field(default=True, metadata={"help": "Apply rotation, scaling and contrast jitter in training."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation and test samples."}
    )
    on_bad_record: str = field(
        default="error",
        metadata={
            "help": "What to do with invalid records (see datasets_scripts/validate.py): 'error' stops and lists "
            "every one of them, 'skip' drops them and logs each dropped id and the count per reason.",
            "choices": ["error", "skip"],
        },
    )
    allow_outside_paths: bool = field(
        default=False,
        metadata={
            "help": "Accept image paths that resolve outside the JSONL file's folder (through '..', an absolute "
            "path or a symbolic link)."
        },
    )
    image_feature_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an on-disk cache of pooled CNN features (see feature_cache_rmt.py), created if missing "
            "and filled before training. Batches without augmentation then read the features instead of decoding "
            "X-rays and running the CNN. Training with it needs --freeze_image_backbone. Evaluation works with "
            "any model."
        },
    )

    def __post_init__(self):
        if self.train_file is None and self.validation_file is None and self.test_file is None:
            raise ValueError("Give at least one of --train_file, --validation_file or --test_file.")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"--on_bad_record must be 'error' or 'skip', got {self.on_bad_record!r}.")
        if self.labels:
            duplicates = sorted(label for label, count in Counter(self.labels).items() if count > 1)
            if duplicates:
                raise ValueError(f"--labels contains duplicates: {duplicates}")
        cache = self.image_feature_cache
        if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
            raise ValueError(f"--image_feature_cache {cache!r} exists but is not a folder. Pass a folder path.")


@dataclass
class PublishingArguments:
    """Calibration and model card settings, applied after training and evaluation."""

    calibrate: bool = field(
        default=False,
        metadata={
            "help": "Fit one temperature per head (image, text, multimodal) on the validation split by L-BFGS on the "
            "negative log-likelihood, save them in config.json, and log and save the ECE (15 bins) before and after."
        },
    )
    study_results: str | None = field(
        default=None,
        metadata={
            "help": "A study results.json with confidence intervals and a robustness table for the model card "
            "(layout in model_card_rmt.py). Defaults to OUTPUT_DIR/study/results.json when that file exists."
        },
    )


class DatasetError(ValueError):
    """A JSONL dataset contains invalid records; the message lists every one of them."""


def parse_args() -> tuple[ModelArguments, DataArguments, TrainingArguments, PublishingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, PublishingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    # This script's own summaries (counts per split, label set) show on the main process by default.
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def find_last_checkpoint(training_args: TrainingArguments) -> str | None:
    """Return the checkpoint to resume from: `--resume_from_checkpoint`, else the newest complete one in the
    output folder. A checkpoint without `trainer_state.json` was cut off while being written and is skipped."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if not (training_args.do_train and os.path.isdir(training_args.output_dir)):
        return None
    checkpoints = sorted(
        (path for path in Path(training_args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()),
        key=lambda path: int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    incomplete = [path.name for path in checkpoints if not (path / TRAINER_STATE_NAME).is_file()]
    if incomplete:
        logger.warning(f"Ignoring incomplete checkpoints without {TRAINER_STATE_NAME}: {incomplete}")
    complete = [path for path in checkpoints if (path / TRAINER_STATE_NAME).is_file()]
    if not complete:
        return None
    logger.info(f"Resuming from {complete[-1]}; delete it or choose another --output_dir to start over.")
    return str(complete[-1])


def check_safetensors_checkpoint(checkpoint: str, allow_pickle: bool) -> None:
    """Raise ValueError when a local checkpoint has pickled weights but no model.safetensors.

    `checkpoint` is a folder, a weights file (which `from_pretrained` also accepts) or a Hub id.
    Trainer checkpoints also contain optimizer.pt, scheduler.pt and rng_state.pth. Those pass when
    model.safetensors is present, because Trainer reads them with `torch.load(weights_only=True)`.
    A Hub id is not checked here: `from_pretrained(use_safetensors=True)` rejects its pickled weights.
    """
    if allow_pickle:
        return
    pickled = find_pickle_weights(Path(checkpoint))
    if pickled:
        raise ValueError(
            f"Checkpoint {checkpoint} has no model.safetensors, only pickle files {pickled}. Unpickling can run "
            "arbitrary code, so convert them to safetensors, or pass --allow_pickle_checkpoints if you trust them."
        )


def find_pickle_weights(path: Path) -> list[str]:
    """Return the pickle files that would provide the weights of a checkpoint file or folder, else []."""
    if path.is_file():
        return [str(path)] if any(path.match(pattern) for pattern in PICKLE_WEIGHT_PATTERNS) else []
    if not path.is_dir() or any((path / name).is_file() for name in SAFETENSORS_WEIGHT_NAMES):
        return []
    return sorted(str(file) for pattern in PICKLE_WEIGHT_PATTERNS for file in path.glob(pattern))


def split_files(data_args: DataArguments) -> dict[str, str]:
    """Return the absolute path of each given split; raise when a file is missing or given for two splits."""
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: os.path.abspath(path) for split, path in files.items() if path is not None}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{split}_file not found: {path}")
    splits_of_path: dict[str, list[str]] = {}
    for split, path in files.items():
        splits_of_path.setdefault(os.path.realpath(path), []).append(split)
    for path, splits in splits_of_path.items():
        if len(splits) > 1:
            raise ValueError(f"{path} is given for both {' and '.join(splits)}; each split needs its own file.")
    return files


def resolve_labels(data_args: DataArguments, model_args: ModelArguments, train_path: str | None) -> list[str]:
    """Return the label set in class-id order."""
    if data_args.labels:
        return list(data_args.labels)
    if model_args.model_name_or_path:
        config = RMTConfig.from_pretrained(model_args.model_name_or_path)
        return [config.id2label[index] for index in range(config.num_labels)]
    if train_path is None:
        raise ValueError("Pass --labels (or --model_name_or_path) when evaluating without a training file.")
    return labels_from_training_file(train_path)


def labels_from_training_file(train_path: str) -> list[str]:
    """Return the sorted label set of the training file and log how often each label occurs."""
    values = [value for value in read_labels(train_path) if value is not None]
    not_strings = sorted({repr(value) for value in values if not isinstance(value, str)})
    if not_strings:
        raise DatasetError(
            f"{train_path}: labels must be JSON strings, got {', '.join(not_strings)}. "
            'Write them as strings (e.g. "severe") or pass --labels.'
        )
    labels = infer_labels(values)
    if not labels:
        raise DatasetError(f"{train_path} contains no labeled records.")
    counts = Counter(values)
    logger.warning(
        f"Labels inferred from the training file, in class-id order: {labels}; records per label "
        f"{dict(sorted(counts.items()))}. Pass --labels to fix the label set."
    )
    return labels


def load_splits(files: dict[str, str], label2id: dict[str, int], data_args: DataArguments) -> datasets.DatasetDict:
    """Load and validate the JSONL splits; image paths become absolute, images stay undecoded until used.

    Raises DatasetError listing every invalid record unless `--on_bad_record skip`, which drops them.
    """
    options = ValidationOptions(labels=tuple(label2id), allow_outside_paths=data_args.allow_outside_paths)
    report = validate_files(list(files.values()), options)
    log_validation_warnings(report)
    if report.bad:
        handle_bad_records(report, data_args.on_bad_record)

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.Value("int64"),
            "image": datasets.Value("string"),
            "text": datasets.Value("string"),
        }
    )
    splits = {}
    for split, path in files.items():
        folder = str(Path(path).parent)
        records = [normalize_record(record, folder, label2id) for record in report.valid_records(path)]
        if not records:
            raise DatasetError(f"{path} has no valid record, so the {split} split would be empty.")
        splits[split] = datasets.Dataset.from_list(records, features=features)
    return datasets.DatasetDict(splits)


def handle_bad_records(report: ValidationReport, on_bad_record: str) -> None:
    """Raise DatasetError listing every invalid record, or log what `--on_bad_record skip` drops."""
    errors = [finding for result in report.bad for finding in result.errors]
    counts = ", ".join(f"{reason}: {count}" for reason, count in sorted(report.bad_by_reason().items()))
    if on_bad_record == "error":
        raise DatasetError(
            f"{len(report.bad)} invalid record(s) of {len(report.results)} ({counts}):\n{format_findings(errors)}\n"
            "Fix them, or pass --on_bad_record skip to train without them."
        )
    logger.warning(
        f"Skipping {len(report.bad)} invalid record(s) of {len(report.results)} ({counts}; each counted under "
        f"its first error):\n{format_findings(errors)}"
    )


def log_validation_warnings(report: ValidationReport) -> None:
    """Log the warning-level findings (records that stay in the data) as counts with the first example."""
    findings = [finding for finding in report.findings if finding.severity == "warning"]
    for reason, count in sorted(report.warnings_by_reason().items()):
        first = next(finding for finding in findings if finding.reason == reason)
        logger.warning(f"{count} record(s) kept with warning {reason}, the first: {first}")


def normalize_record(record: dict[str, Any], folder: str, label2id: dict[str, int]) -> dict[str, Any]:
    image = record["image"]
    return {
        "id": str(record["id"]),
        "label": label2id[record["label"]],
        "image": os.path.join(folder, image) if image is not None else None,
        "text": record["text"] if has_text(record["text"]) else None,
    }


def modality_pattern(record: dict[str, Any]) -> str:
    return MODALITY_PATTERNS[(record["image"] is not None, record["text"] is not None)]


def log_split_counts(splits: datasets.DatasetDict, id2label: dict[int, str]) -> None:
    for split, dataset in splits.items():
        counts = Counter(
            (id2label[label], modality_pattern({"image": image, "text": text}))
            for label, image, text in zip(dataset["label"], dataset["image"], dataset["text"])
        )
        details = ", ".join(f"{label}/{pattern}: {count}" for (label, pattern), count in sorted(counts.items()))
        logger.info(f"{split}: {len(dataset)} samples ({details})")


def build_model(model_args: ModelArguments, data_args: DataArguments, id2label: dict[int, str]):
    """Return RMT: fine-tuned from a trained RMT, built on pretrained backbones, or with a from-scratch encoder."""
    label_kwargs = {"id2label": id2label, "label2id": {label: index for index, label in id2label.items()}}
    if model_args.model_name_or_path:
        check_safetensors_checkpoint(model_args.model_name_or_path, model_args.allow_pickle_checkpoints)
        return RMTForMultimodalClassification.from_pretrained(
            model_args.model_name_or_path,
            ignore_mismatched_sizes=True,
            use_safetensors=None if model_args.allow_pickle_checkpoints else True,
            freeze_image_backbone=model_args.freeze_image_backbone,
            **label_kwargs,
        )

    text_config = AutoConfig.from_pretrained(model_args.text_model_name_or_path)
    if model_args.config_overrides:
        text_config.update_from_string(model_args.config_overrides)
        logger.warning(
            f"Encoder built from config with overrides {model_args.config_overrides!r}: it starts from random weights."
        )
    config = RMTConfig(
        text_config=text_config.to_dict(),
        text_model_name_or_path=model_args.text_model_name_or_path,
        image_model_name=model_args.image_model_name,
        image_pretrained=model_args.image_pretrained,
        num_image_embeddings=model_args.num_image_embeddings,
        image_size=data_args.image_size,
        task_weights=model_args.task_weights,
        use_mask_attention=model_args.use_mask_attention,
        use_multitask=model_args.use_multitask,
        attention_strategy=model_args.attention_strategy,
        freeze_image_backbone=model_args.freeze_image_backbone,
        **label_kwargs,
    )
    if not model_args.image_pretrained:
        logger.warning(f"Image backbone {model_args.image_model_name} starts from random weights (no ImageNet weights).")
    if not model_args.config_overrides:
        return RMTForMultimodalClassification.from_backbones(config)
    model = RMTForMultimodalClassification(config)
    if model_args.image_pretrained:
        model.load_pretrained_image_backbone()
    return model


def check_feature_cache_arguments(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> None:
    """Raise ValueError when the run's CNN could give other features than those in `--image_feature_cache`."""
    if data_args.image_feature_cache is None:
        return
    if training_args.do_train and not model_args.freeze_image_backbone:
        raise ValueError(
            "--image_feature_cache needs --freeze_image_backbone when training: a trainable CNN changes at every "
            "step, so its cached features would go stale. Pass --freeze_image_backbone, or drop --image_feature_cache."
        )
    if training_args.fp16_full_eval or training_args.bf16_full_eval:
        raise ValueError(
            "--image_feature_cache contains float32 CNN features, but --fp16_full_eval and --bf16_full_eval cast the "
            "CNN to half precision for evaluation. Drop one of the two options."
        )


def check_resume_freeze(last_checkpoint: str, model_args: ModelArguments) -> None:
    """Raise ValueError when a resumed checkpoint was trained with the other `--freeze_image_backbone` setting.

    The optimizer state of the checkpoint covers its trainable parameters only, so it cannot be resumed
    with a different set of them.
    """
    config_path = Path(last_checkpoint) / "config.json"
    if not config_path.is_file():
        return
    frozen = bool(json.loads(config_path.read_text(encoding="utf-8")).get("freeze_image_backbone", False))
    if frozen != model_args.freeze_image_backbone:
        raise ValueError(
            f"Checkpoint {last_checkpoint} was trained with freeze_image_backbone={frozen}, but this run sets "
            f"--freeze_image_backbone {str(model_args.freeze_image_backbone).lower()}. Resume with the checkpoint's "
            "setting, or start a new --output_dir and fine-tune the checkpoint with --model_name_or_path."
        )


def log_frozen_backbone(model: RMTForMultimodalClassification) -> None:
    backbone = model.rmt.embeddings.image_encoder.backbone
    frozen = sum(parameter.numel() for parameter in backbone.parameters())
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        f"Image backbone {model.config.image_model_name} is frozen: {frozen:,} of the model's {total:,} parameters "
        "stay fixed, and its batch norm keeps its running statistics."
    )


def prepare_feature_cache(
    data_args: DataArguments,
    training_args: TrainingArguments,
    model: RMTForMultimodalClassification,
    processor: RMTProcessor,
    splits: datasets.DatasetDict,
    last_checkpoint: str | None,
) -> tuple[ImageFeatureCache | None, list[TrainerCallback]]:
    """Open and fill `--image_feature_cache`. Return the cache (None without the option) and the callbacks it needs."""
    if data_args.image_feature_cache is None:
        return None, []
    cache = ImageFeatureCache(data_args.image_feature_cache, model, processor)
    filler = FeatureCacheFiller(cache, splits, cached_splits(data_args, training_args, splits), training_args)
    filler()
    callbacks = [FeatureCacheRefillCallback(filler)] if last_checkpoint is not None else []
    return cache, callbacks


def cached_splits(
    data_args: DataArguments, training_args: TrainingArguments, splits: datasets.DatasetDict
) -> list[str]:
    """Return the splits whose batches read the image feature cache.

    These are all splits except an augmented or unused training split and a test split without `--do_predict`.
    """
    names = [split for split in splits if split != "train" and (split != "test" or training_args.do_predict)]
    if training_args.do_train and data_args.augment:
        logger.info(
            "The training split is augmented (--augment true), so its batches read pixels and run the CNN. The "
            "image feature cache serves the other splits. Pass --augment false to train on cached features."
        )
    elif training_args.do_train:
        names.insert(0, "train")
    return names


@dataclass
class FeatureCacheFiller:
    """Fill step of the image feature cache for the images of the cached splits, run on the main process first.

    Other processes of a distributed run wait for the main process, and then find every entry in place.
    """

    cache: ImageFeatureCache
    splits: datasets.DatasetDict
    split_names: list[str]
    training_args: TrainingArguments

    def __call__(self) -> None:
        images = {image for split in self.split_names for image in self.splits[split]["image"] if image is not None}
        with self.training_args.main_process_first(desc="filling the image feature cache"):
            computed = self.cache.fill(
                sorted(images),
                batch_size=self.training_args.per_device_eval_batch_size,
                device=self.training_args.device,
                show_progress=not self.training_args.disable_tqdm,
            )
        logger.info(
            f"Image feature cache {self.cache.namespace_dir}: {len(images)} images of the "
            f"{', '.join(self.split_names)} split(s), {computed} newly computed (images with identical content "
            "share one entry)."
        )


class FeatureCacheRefillCallback(TrainerCallback):
    """Fill the image feature cache again after Trainer has loaded the checkpoint that training resumes from.

    The cache was filled for the starting model. A checkpoint's frozen CNN usually has the same weights, and
    then nothing is computed. A CNN from another seed or another pretrained start selects another namespace,
    filled here.
    """

    def __init__(self, filler: FeatureCacheFiller) -> None:
        self.filler = filler

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.filler()


def build_processor(model_args: ModelArguments, data_args: DataArguments) -> RMTProcessor:
    if model_args.model_name_or_path:
        return RMTProcessor.from_pretrained(model_args.model_name_or_path)
    return RMTProcessor.from_text_model(model_args.text_model_name_or_path, image_size=data_args.image_size)


def with_view(dataset: datasets.Dataset, augment: bool = False, hidden_modality: str | None = None):
    """Return the dataset with each record marked for augmentation and for a modality to hide from the model."""

    def mark(batch: dict[str, list]) -> dict[str, list]:
        size = len(batch["id"])
        return {**batch, "augment": [augment] * size, "hidden_modality": [hidden_modality] * size}

    return dataset.with_transform(mark)


@dataclass
class RMTDataCollator:
    """Turn records into a padded batch: images are read from disk here, so they are decoded lazily.

    Augmentation draws from torch's random generator seeded with (seed, epoch, ids of the batch's
    records) inside `torch.random.fork_rng`, so it leaves the global generator untouched. Resuming from
    a checkpoint then gives the same augmentation and dropout as an uninterrupted run. Trainer restores
    the global generator only after it has fetched the first batch of the resumed epoch.
    `AugmentationEpochCallback` sets `epoch`.

    With a `feature_cache`, batches without augmentation carry `image_features` read from it in place of
    `pixel_values`. Augmented batches always read pixels, because cached features have no augmentation.

    NOTE: with `--dataloader_persistent_workers`, the workers keep the collator of the first epoch, so
    every epoch repeats its augmentations.
    """

    processor: RMTProcessor
    max_seq_length: int = 128
    seed: int = 0
    epoch: int = 0
    feature_cache: ImageFeatureCache | None = None

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [None if r["hidden_modality"] == "image" else r["image"] for r in records]
        texts = [None if r["hidden_modality"] == "text" else r["text"] for r in records]
        do_augment = bool(records[0]["augment"])
        if self.feature_cache is not None and not do_augment:
            batch = self.cached_feature_batch(images, texts)
        else:
            batch = self.pixel_batch(images, texts, records, do_augment)
        batch["labels"] = torch.tensor([r["label"] for r in records], dtype=torch.long)
        return batch

    def pixel_batch(
        self, images: list[str | None], texts: list[str | None], records: list[dict[str, Any]], do_augment: bool
    ) -> dict[str, torch.Tensor]:
        """Build the batch with the processor, which decodes each present image into `pixel_values`."""
        with torch.random.fork_rng(devices=[], enabled=do_augment):
            if do_augment:
                torch.manual_seed(self.augmentation_seed(records))
            batch = self.processor(
                images=images,
                text=texts,
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                do_augment=do_augment,
                return_tensors="pt",
            )
        return dict(batch)

    def cached_feature_batch(self, images: list[str | None], texts: list[str | None]) -> dict[str, torch.Tensor]:
        """Build the batch with cached `image_features` in place of `pixel_values`, so no image is decoded.

        An absent or hidden image gets a row of zero features, which the model ignores.
        """
        batch = self.processor(
            images=images,
            text=texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
            return_pixel_values=False,
        )
        image_rows = [row for row, image in enumerate(images) if image is not None]
        image_features = torch.zeros(len(images), *self.feature_cache.feature_shape)
        if image_rows:
            image_features[image_rows] = self.feature_cache.load([images[row] for row in image_rows])
        return {**batch, "image_features": image_features}

    def augmentation_seed(self, records: list[dict[str, Any]]) -> int:
        """Return a 64-bit seed that depends only on the run's seed, the epoch and the batch's record ids."""
        key = f"{self.seed}:{self.epoch}:" + "\n".join(str(record["id"]) for record in records)
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


class AugmentationEpochCallback(TrainerCallback):
    """Tell the data collator which epoch starts, so that each epoch draws new augmentations."""

    def __init__(self, collator: RMTDataCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # `state.epoch` is fractional: after resuming mid-epoch it is e.g. 1.33, so the floor is the epoch index.
        self.collator.epoch = math.floor(state.epoch or 0)


def load_metric():
    return evaluate.load(str(METRIC_PATH))


def classification_metrics(metric, logits: np.ndarray, labels: np.ndarray, pos_label: int) -> dict[str, float]:
    scores = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1).numpy()
    return metric.compute(
        predictions=scores.argmax(-1),
        references=labels,
        prediction_scores=scores,
        pos_label=pos_label,
    )


def make_compute_metrics(metric, pos_label: int):
    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return classification_metrics(metric, logits, prediction.label_ids, pos_label)

    return compute_metrics


def task_subset(dataset: datasets.Dataset, required: tuple[str, ...]) -> datasets.Dataset:
    if not required:
        return dataset
    return dataset.filter(lambda record: all(record[m] is not None for m in required), desc="Selecting task samples")


def evaluate_tasks(trainer: Trainer, dataset: datasets.Dataset, split: str, metric, pos_label: int) -> dict:
    """Evaluate routed predictions and each task on the samples that have the task's modalities."""
    results = {}
    for task, (required, hidden) in EVALUATION_TASKS.items():
        subset = task_subset(dataset, required)
        results[f"{split}_{task}_samples"] = len(subset)
        if len(subset) == 0:
            logger.warning(f"{split}: no sample has the modalities of the {task} task; it is not evaluated.")
            continue
        prediction = trainer.predict(with_view(subset, hidden_modality=hidden), metric_key_prefix=f"{split}_{task}")
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        scores = classification_metrics(metric, logits, prediction.label_ids, pos_label)
        results.update({f"{split}_{task}_{name}": value for name, value in scores.items()})
    return results


def format_task_table(results: dict[str, float], split: str) -> str:
    names = ("accuracy", "precision", "sensitivity", "specificity", "roc_auc")
    lines = [f"{'task':<12}{'samples':>8}" + "".join(f"{name:>13}" for name in names)]
    for task in EVALUATION_TASKS:
        count = results.get(f"{split}_{task}_samples", 0)
        values = "".join(f"{results.get(f'{split}_{task}_{name}', float('nan')):>13.4f}" for name in names)
        lines.append(f"{task:<12}{count:>8}{values}")
    return "\n".join(lines)


def routed_logits(prediction) -> np.ndarray:
    """Return the routed `(N, num_labels)` logits of a `Trainer.predict` output."""
    return prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions


def collect_head_logits(trainer: Trainer, dataset: datasets.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return `{head: (logits (N, num_labels), labels (N,))}` over the samples routed to each head.

    Each head is run as its evaluation task is: on the samples with its modalities and the other one
    hidden, so the routed logits are that head's. With `use_multitask` off the multimodal head answers
    every sample, so it gets the whole split.
    """
    if not trainer.model.config.use_multitask:
        prediction = trainer.predict(with_view(dataset), metric_key_prefix="calibration_multimodal")
        return {"multimodal": (routed_logits(prediction), prediction.label_ids)}

    head_logits = {}
    for head in HEADS:
        required, hidden = EVALUATION_TASKS[head]
        subset = task_subset(dataset, required)
        if len(subset) == 0:
            logger.warning(f"No sample has the modalities of the {head} head; its temperature stays 1.0.")
            continue
        prediction = trainer.predict(with_view(subset, hidden_modality=hidden), metric_key_prefix=f"calibration_{head}")
        head_logits[head] = (routed_logits(prediction), prediction.label_ids)
    return head_logits


def calibrate(trainer: Trainer, splits: datasets.DatasetDict, report_test: bool) -> dict[str, float]:
    """Fit each head's temperature on the validation split and store them in the model's config.

    Returns the temperatures and the ECE and NLL before and after on validation, plus the ECE on the
    test split when `report_test` is set and the split is loaded. The test ECE is the fair one, because
    the temperatures were fitted on validation.
    """
    metrics: dict[str, float] = {}
    rows = []
    temperatures = {head: 1.0 for head in HEADS}
    for head, (logits, labels) in collect_head_logits(trainer, splits["validation"]).items():
        fit = calibrate_head(head, logits, labels)
        temperatures[head] = fit.temperature
        metrics[f"temperature_{head}"] = fit.temperature
        metrics[f"validation_{head}_ece_before"] = fit.ece_before
        metrics[f"validation_{head}_ece_after"] = fit.ece_after
        metrics[f"validation_{head}_nll_before"] = fit.nll_before
        metrics[f"validation_{head}_nll_after"] = fit.nll_after
        rows.append({"split": "validation", **dataclasses.asdict(fit)})
    trainer.model.config.temperatures = temperatures

    if report_test and "test" in splits:
        for head, (logits, labels) in collect_head_logits(trainer, splits["test"]).items():
            ece_before = expected_calibration_error(softmax_with_temperature(logits, 1.0), labels)
            ece_after = expected_calibration_error(softmax_with_temperature(logits, temperatures[head]), labels)
            metrics[f"test_{head}_ece_before"] = ece_before
            metrics[f"test_{head}_ece_after"] = ece_after
            rows.append(
                {
                    "split": "test",
                    "head": head,
                    "samples": len(labels),
                    "temperature": temperatures[head],
                    "ece_before": ece_before,
                    "ece_after": ece_after,
                }
            )

    if trainer.is_world_process_zero():
        print(f"\nCalibration (temperatures fitted on validation)\n{format_calibration_table(rows)}")
    return metrics


def find_study_results(publish_args: PublishingArguments, output_dir: str) -> str | None:
    """Return `--study_results`, else OUTPUT_DIR/study/results.json when it exists, else None."""
    if publish_args.study_results is not None:
        return publish_args.study_results
    default = Path(output_dir) / "study" / "results.json"
    return str(default) if default.is_file() else None


def build_card_context(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    splits: datasets.DatasetDict,
    model: RMTForMultimodalClassification,
    positive_label: str,
) -> CardContext:
    """Collect what the model card states about the data, the base model and the training settings."""
    id2label = model.config.id2label
    summaries = {
        split: summarize_split(dataset["label"], dataset["image"], dataset["text"], id2label)
        for split, dataset in splits.items()
    }
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    return CardContext(
        model_name=Path(training_args.output_dir).name,
        config=model.config,
        positive_label=positive_label,
        splits=summaries,
        data_files={split: Path(path).name for split, path in files.items() if path is not None},
        training={
            "learning rate": training_args.learning_rate,
            "epochs": training_args.num_train_epochs,
            "batch size per device": training_args.per_device_train_batch_size,
            "seed": training_args.seed,
        },
        base_model=model_args.model_name_or_path or model_args.text_model_name_or_path,
        repo_id=training_args.hub_model_id,
    )


class RMTTrainer(Trainer):
    """Trainer that writes RMT's model card (model_card_rmt.py) in place of the generic Trainer card.

    `Trainer.push_to_hub` calls `create_model_card` before every upload, so the pushed card is this one.
    """

    def __init__(self, *args, card_context: CardContext, study_results: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.card_context = card_context
        self.study_results = study_results

    def create_model_card(
        self,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        license: str | None = None,
        **unused_trainer_card_kwargs,
    ) -> None:
        """Write README.md into the output folder. The arguments override the card context's values."""
        if not self.is_world_process_zero():
            return
        context = dataclasses.replace(
            self.card_context,
            model_name=model_name or self.card_context.model_name,
            config=self.model.config,
            base_model=finetuned_from or self.card_context.base_model,
            repo_id=getattr(self, "hub_model_id", None) or self.card_context.repo_id,
            license=license or self.card_context.license,
        )
        write_model_card(self.args.output_dir, context, self.study_results)


def main() -> None:
    model_args, data_args, training_args, publish_args = parse_args()
    setup_logging(training_args)
    logger.info(f"Training arguments: {training_args}")
    check_feature_cache_arguments(model_args, data_args, training_args)
    last_checkpoint = find_last_checkpoint(training_args)
    if last_checkpoint is not None:
        check_safetensors_checkpoint(last_checkpoint, model_args.allow_pickle_checkpoints)
        check_resume_freeze(last_checkpoint, model_args)
    set_seed(training_args.seed)

    files = split_files(data_args)
    if publish_args.calibrate and "validation" not in files:
        raise ValueError("--calibrate fits the temperatures on the validation split: pass --validation_file too.")
    labels = resolve_labels(data_args, model_args, files.get("train"))
    id2label = dict(enumerate(labels))
    label2id = {label: index for index, label in id2label.items()}
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    positive_label = data_args.positive_label or labels[-1]
    if positive_label not in label2id:
        raise ValueError(f"--positive_label {positive_label!r} is not one of the labels {labels}")
    splits = load_splits(files, label2id, data_args)
    if data_args.max_train_samples is not None and "train" in splits:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    for split in ("validation", "test"):
        if data_args.max_eval_samples is not None and split in splits:
            splits[split] = splits[split].select(range(min(data_args.max_eval_samples, len(splits[split]))))
    log_split_counts(splits, id2label)

    model = build_model(model_args, data_args, id2label)
    if model_args.channels_last:
        model.rmt.embeddings.image_encoder.backbone.to(memory_format=torch.channels_last)
    if training_args.do_train:
        stale = reset_temperatures(model.config)
        if any(value != 1.0 for value in stale.values()):
            logger.info(f"Reset the starting model's temperatures {stale} to 1.0, because training changes the heads.")
    if model.config.freeze_image_backbone:
        log_frozen_backbone(model)
    processor = build_processor(model_args, data_args)
    feature_cache, cache_callbacks = prepare_feature_cache(
        data_args, training_args, model, processor, splits, last_checkpoint
    )
    metric = load_metric()
    pos_label = label2id[positive_label]

    # The collator reads the raw `image` and `text` columns, which are not arguments of the model.
    training_args.remove_unused_columns = False
    collator = RMTDataCollator(
        processor, data_args.max_seq_length, seed=training_args.seed, feature_cache=feature_cache
    )
    trainer = RMTTrainer(
        model=model,
        args=training_args,
        train_dataset=with_view(splits["train"], augment=data_args.augment) if "train" in splits else None,
        eval_dataset=with_view(splits["validation"]) if "validation" in splits else None,
        processing_class=processor,
        data_collator=collator,
        callbacks=[AugmentationEpochCallback(collator), *cache_callbacks],
        compute_metrics=make_compute_metrics(metric, pos_label),
        card_context=build_card_context(model_args, data_args, training_args, splits, model, positive_label),
        study_results=find_study_results(publish_args, training_args.output_dir),
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    for split, do_split in (("validation", training_args.do_eval), ("test", training_args.do_predict)):
        if not do_split or split not in splits:
            continue
        results = evaluate_tasks(trainer, splits[split], split, metric, pos_label)
        trainer.save_metrics(split, results)
        if trainer.is_world_process_zero():
            print(f"\n{split} metrics (positive label: {positive_label})\n{format_task_table(results, split)}")

    if publish_args.calibrate:
        trainer.save_metrics("calibration", calibrate(trainer, splits, report_test=training_args.do_predict))
        trainer.save_model()
    if (Path(training_args.output_dir) / "config.json").is_file():
        trainer.create_model_card()

    if trainer.is_world_process_zero():
        if training_args.do_train or publish_args.calibrate:
            print(f"\nModel and processor saved to {os.path.abspath(training_args.output_dir)}")
        print(f"Metrics written to {os.path.join(os.path.abspath(training_args.output_dir), 'all_results.json')}")
    if training_args.push_to_hub:
        trainer.push_to_hub(finetuned_from=model_args.model_name_or_path or model_args.text_model_name_or_path)


if __name__ == "__main__":
    main()
