"""One run of the study: train one model on the training split, then predict every view of the evaluation splits.

A *view* is the set of modalities a model is shown for a sample: `image+text`, `image` or `text`
(see study/visibility.py). A run predicts each test sample under every view its modalities allow
(all three for a complete sample, one for an image-only sample), and each validation sample under
its recorded modalities. All models are in eval mode and score each sample independently of the rest
of its batch. So the robustness sweeps assemble their predictions from these views without running
the model again. tests/test_study.py checks this for the RMT variants against a mixed batch.

RMT with mask attention and multi-task learning runs a complete sample once: its image and text
views are the logits of its image and text heads in the image+text view.
"""

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PredictionOutput

from modeling_rmt import RMTForMultimodalClassification
from processing_rmt import RMTProcessor
from study.baselines import (
    ConcatBertClassifier,
    ImageOnlyClassifier,
    TextOnlyClassifier,
    build_image_backbone,
    build_text_encoder,
    build_tfidf_classifier,
    predict_class_probabilities,
)
from study.presets import DEFAULT_TASK_WEIGHTS, StudySettings
from study.visibility import MODALITIES, VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT, sample_view, usable_view
from train_rmt import (
    AugmentationEpochCallback,
    DataArguments,
    ModelArguments,
    RMTDataCollator,
    build_model,
    routed_logits,
    with_view,
)

logger = logging.getLogger(__name__)

ARCHITECTURES = ("rmt", "image_cnn", "text_bert", "concat_bert", "tfidf")
HIDDEN_MODALITY = {VIEW_BOTH: None, VIEW_IMAGE: "text", VIEW_TEXT: "image"}
# The arrays of a `Trainer.predict` output of RMT's full forward, in the field order of `RMTClassifierOutput`.
RMT_PREDICTION_FIELDS = ("logits", "image_logits", "text_logits", "multimodal_logits")
VIEW_LOGIT_FIELDS = {VIEW_BOTH: "logits", VIEW_IMAGE: "image_logits", VIEW_TEXT: "text_logits"}


@dataclass(frozen=True)
class RunSpec:
    """One model to train and evaluate.

    `architecture` is one of `ARCHITECTURES`. The RMT switches and task weights apply to `rmt` only,
    and `text_classifier` to `tfidf` only. `group` is `models` for the model comparison and
    `task_weights` for the task-weight grid.
    """

    name: str
    label: str
    architecture: str
    input_modalities: tuple[str, ...] = MODALITIES
    use_mask_attention: bool = True
    use_multitask: bool = True
    task_weights: tuple[float, float, float] = DEFAULT_TASK_WEIGHTS
    text_classifier: str | None = None
    group: str = "models"


MODEL_RUNS = {
    spec.name: spec
    for spec in (
        RunSpec("rmt", "RMT", "rmt"),
        RunSpec("rmt_no_multitask", "RMT w/o multi-task learning", "rmt", use_multitask=False),
        RunSpec("rmt_no_mask_attention", "RMT w/o mask attention", "rmt", use_mask_attention=False),
        RunSpec("mmbt", "MMBT", "rmt", use_mask_attention=False, use_multitask=False),
        RunSpec("cnn", "CNN (image only)", "image_cnn", input_modalities=("image",)),
        RunSpec("bert", "BERT (text only)", "text_bert", input_modalities=("text",)),
        RunSpec("concat_bert", "ConcatBert", "concat_bert"),
        RunSpec(
            "tfidf_random_forest", "TF-IDF + random forest", "tfidf", ("text",), text_classifier="random_forest"
        ),
        RunSpec(
            "tfidf_gradient_boosting",
            "TF-IDF + gradient boosting",
            "tfidf",
            ("text",),
            text_classifier="gradient_boosting",
        ),
    )
}


def task_weight_run(name: str, weights: tuple[float, float, float]) -> RunSpec:
    """Return the RMT run of the task-weight grid with image, text and multimodal loss weights `weights`."""
    label = f"RMT, weights {weights[0]:g} / {weights[1]:g} / {weights[2]:g}"
    return RunSpec(f"rmt_weights_{name}", label, "rmt", task_weights=tuple(weights), group="task_weights")


@dataclass
class StudyData:
    """The loaded splits and what every run needs to know about them."""

    splits: datasets.DatasetDict
    id2label: dict[int, str]
    pos_label: int
    files: dict[str, str]
    allow_outside_paths: bool
    on_bad_record: str


def natural_view(record: dict[str, Any]) -> str:
    """Return the view of a sample with the modalities it was recorded with."""
    return sample_view(record["image"] is not None, record["text"] is not None)


def available_views(record: dict[str, Any]) -> list[str]:
    """Return every view the sample's recorded modalities allow: all three for a complete sample."""
    if natural_view(record) == VIEW_BOTH:
        return [VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT]
    return [natural_view(record)]


def requested_views(
    dataset: datasets.Dataset, input_modalities: tuple[str, ...], every_view: bool
) -> dict[str, list[int]]:
    """Return `{view: sample indices}` that a model reading `input_modalities` must predict.

    With `every_view` each sample is predicted under every view it allows, else under its recorded one.
    Views are reduced to what the model uses, and samples it cannot use at all are left out.
    """
    requests: dict[str, list[int]] = {view: [] for view in (VIEW_BOTH, VIEW_IMAGE, VIEW_TEXT)}
    for index, (image, text) in enumerate(zip(dataset["image"], dataset["text"])):
        record = {"image": image, "text": text}
        views = available_views(record) if every_view else [natural_view(record)]
        usable = {usable_view(view, input_modalities) for view in views} - {None}
        for view in usable:
            requests[view].append(index)
    return {view: indices for view, indices in requests.items() if indices}


def training_prior(labels: list[int], num_labels: int) -> list[float]:
    """Return the class frequencies of the training labels, the probabilities of a sample a model cannot read."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    return (counts / counts.sum()).tolist()


def build_neural_model(spec: RunSpec, settings: StudySettings, data: StudyData) -> torch.nn.Module:
    """Build the untrained model of a neural run on the settings' backbones."""
    num_labels = len(data.id2label)
    if spec.architecture == "rmt":
        model_args, data_args = rmt_arguments(spec, settings, data)
        return build_model(model_args, data_args, data.id2label)
    if spec.architecture == "image_cnn":
        return ImageOnlyClassifier(settings.image_model_name, settings.image_pretrained, num_labels)
    encoder = build_text_encoder(settings.text_model_name_or_path, settings.config_overrides)
    if spec.architecture == "text_bert":
        return TextOnlyClassifier(encoder, num_labels)
    if spec.architecture == "concat_bert":
        backbone = build_image_backbone(settings.image_model_name, settings.image_pretrained)
        return ConcatBertClassifier(backbone, encoder, num_labels)
    raise ValueError(f"{spec.architecture!r} is not a neural architecture; choose one of {ARCHITECTURES[:4]}.")


def rmt_arguments(spec: RunSpec, settings: StudySettings, data: StudyData) -> tuple[ModelArguments, DataArguments]:
    """Return the `train_rmt.py` arguments that build the RMT variant of `spec`."""
    model_args = ModelArguments(
        text_model_name_or_path=settings.text_model_name_or_path,
        config_overrides=settings.config_overrides,
        image_model_name=settings.image_model_name,
        image_pretrained=settings.image_pretrained,
        num_image_embeddings=settings.num_image_embeddings,
        task_weights=list(spec.task_weights),
        use_mask_attention=spec.use_mask_attention,
        use_multitask=spec.use_multitask,
        attention_strategy=settings.attention_strategy,
    )
    data_args = DataArguments(
        train_file=data.files["train"],
        image_size=settings.image_size,
        max_seq_length=settings.max_seq_length,
        allow_outside_paths=data.allow_outside_paths,
        on_bad_record=data.on_bad_record,
    )
    return model_args, data_args


def training_arguments(settings: StudySettings, run_dir: Path, seed: int, mixed_precision: str) -> TrainingArguments:
    """Return the Trainer settings of a neural run. Runs keep no checkpoints: a failed run starts over."""
    return TrainingArguments(
        output_dir=str(run_dir / "trainer"),
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        # transformers 5 reads a float in [0, 1) as a share of the total steps.
        warmup_steps=settings.warmup_ratio,
        weight_decay=0.01,
        per_device_train_batch_size=settings.train_batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        logging_steps=settings.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        fp16=mixed_precision == "fp16",
        bf16=mixed_precision == "bf16",
        # The collator reads the raw `image` and `text` columns, which are not arguments of the models.
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )


def training_view(spec: RunSpec, dataset: datasets.Dataset) -> datasets.Dataset:
    """Return the training samples of a run: unimodal models train on the samples that have their modality."""
    if spec.input_modalities == MODALITIES:
        return with_view(dataset, augment=True)
    modality = spec.input_modalities[0]
    keep = [index for index, value in enumerate(dataset[modality]) if value is not None]
    hidden = "text" if modality == "image" else "image"
    return with_view(dataset.select(keep), augment=True, hidden_modality=hidden)


def predict_neural_views(
    trainer: Trainer, dataset: datasets.Dataset, requests: dict[str, list[int]]
) -> dict[str, np.ndarray]:
    """Return `{view: (len(indices), C) probabilities}` with the other modality hidden for unimodal views.

    RMT with mask attention and multi-task learning predicts the complete samples once and reads their
    image and text views from the image and text heads (see `predict_views_from_heads`). Every other
    model predicts each view separately.
    """
    if VIEW_BOTH in requests and heads_match_unimodal_views(trainer.model):
        logits = predict_views_from_heads(trainer, dataset, requests)
    else:
        logits = predict_each_view(trainer, dataset, requests)
    return {view: torch.as_tensor(values).softmax(dim=-1).numpy() for view, values in logits.items()}


def heads_match_unimodal_views(model: torch.nn.Module) -> bool:
    """Return True when a complete sample's image-head and text-head logits equal its image-view and text-view logits.

    That holds for RMT with mask attention and multi-task learning, with either attention strategy. Mask
    attention keeps the image CLS and the text CLS from seeing the other modality, so hiding it leaves
    their states unchanged. With multi-task learning, the model routes image-only and text-only inputs
    to the image and text heads.
    """
    if not isinstance(model, RMTForMultimodalClassification):
        return False
    return model.config.use_mask_attention and model.config.use_multitask


def predict_view(trainer: Trainer, dataset: datasets.Dataset, view: str, indices: list[int]) -> PredictionOutput:
    """Predict the samples `indices` of `dataset` in `view`, with the modality the view lacks hidden."""
    subset = with_view(dataset.select(indices), hidden_modality=HIDDEN_MODALITY[view])
    return trainer.predict(subset, metric_key_prefix=f"view_{view}")


def predict_each_view(
    trainer: Trainer, dataset: datasets.Dataset, requests: dict[str, list[int]]
) -> dict[str, np.ndarray]:
    """Return `{view: (len(indices), C) routed logits}`, one prediction per view."""
    return {
        view: np.asarray(routed_logits(predict_view(trainer, dataset, view, indices)), dtype=np.float32)
        for view, indices in requests.items()
    }


def predict_views_from_heads(
    trainer: Trainer, dataset: datasets.Dataset, requests: dict[str, list[int]]
) -> dict[str, np.ndarray]:
    """Return `{view: (len(indices), C) logits}` for RMT, predicting the complete samples only once.

    The complete samples' prediction gives their image+text view (routed logits), their image view
    (image-head logits) and their text view (text-head logits). Samples recorded with one modality get
    a prediction of their own view. `heads_match_unimodal_views` states when this is exact.
    """
    complete = requests[VIEW_BOTH]
    heads = rmt_head_logits(predict_view(trainer, dataset, VIEW_BOTH, complete))
    row_of_complete = {index: row for row, index in enumerate(complete)}

    logits = {VIEW_BOTH: heads[VIEW_BOTH]}
    for view in (VIEW_IMAGE, VIEW_TEXT):
        if view not in requests:
            continue
        indices = requests[view]
        derived = [position for position, index in enumerate(indices) if index in row_of_complete]
        unimodal = [position for position, index in enumerate(indices) if index not in row_of_complete]
        view_logits = np.empty((len(indices), heads[view].shape[1]), dtype=np.float32)
        view_logits[derived] = heads[view][[row_of_complete[indices[position]] for position in derived]]
        if unimodal:
            prediction = predict_view(trainer, dataset, view, [indices[position] for position in unimodal])
            view_logits[unimodal] = routed_logits(prediction)
        logits[view] = view_logits
    return logits


def rmt_head_logits(prediction: PredictionOutput) -> dict[str, np.ndarray]:
    """Return the `(N, C)` logits of each view's head from a `Trainer.predict` output of RMT's full forward.

    Trainer collects the fields of `RMTClassifierOutput` that are not None, minus the loss, in field
    order: `logits` (routed), `image_logits`, `text_logits`, `multimodal_logits`. The view image+text
    takes the routed logits, which are the multimodal head's for a complete sample.
    """
    predictions = prediction.predictions
    if not isinstance(predictions, tuple) or len(predictions) != len(RMT_PREDICTION_FIELDS):
        count = len(predictions) if isinstance(predictions, tuple) else 1
        raise ValueError(
            f"Expected RMT predictions with the fields {RMT_PREDICTION_FIELDS}, got {count} array(s). "
            "Predict with the full forward, without routed_only, hidden states or attentions."
        )
    by_field = dict(zip(RMT_PREDICTION_FIELDS, predictions))
    return {view: np.asarray(by_field[field], dtype=np.float32) for view, field in VIEW_LOGIT_FIELDS.items()}


def run_neural(
    spec: RunSpec,
    settings: StudySettings,
    data: StudyData,
    processor: RMTProcessor,
    run_dir: Path,
    seed: int,
    mixed_precision: str,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Train a neural run and predict its views; return `(train summary, {split: {view: probabilities}})`."""
    set_seed(seed)
    model = build_neural_model(spec, settings, data)
    args = training_arguments(settings, run_dir, seed, mixed_precision)
    collator = RMTDataCollator(processor, settings.max_seq_length, seed=seed)
    train_dataset = training_view(spec, data.splits["train"])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[AugmentationEpochCallback(collator)],
    )
    result = trainer.train()
    summary = {"samples": len(train_dataset), "steps": result.global_step, "loss": result.training_loss}
    predictions = {
        split: predict_neural_views(trainer, data.splits[split], requests)
        for split, requests in view_requests(spec, data).items()
    }
    return summary, predictions


def run_tfidf(
    spec: RunSpec, settings: StudySettings, data: StudyData, seed: int
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Fit a TF-IDF run on the training texts and predict the text view; same return value as `run_neural`."""
    train = data.splits["train"]
    texts = [(text, label) for text, label in zip(train["text"], train["label"]) if text is not None]
    pipeline = build_tfidf_classifier(spec.text_classifier, settings.tfidf, seed)
    pipeline.fit([text for text, _ in texts], [label for _, label in texts])
    summary = {"samples": len(texts), "features": len(pipeline.named_steps["tfidf"].vocabulary_)}

    predictions = {}
    for split, requests in view_requests(spec, data).items():
        split_texts = data.splits[split]["text"]
        predictions[split] = {
            view: predict_class_probabilities(pipeline, [split_texts[index] for index in indices], len(data.id2label))
            for view, indices in requests.items()
        }
    return summary, predictions


def view_requests(spec: RunSpec, data: StudyData) -> dict[str, dict[str, list[int]]]:
    """Return the views to predict per evaluation split: every view on test, the recorded one on validation."""
    requests = {}
    for split, every_view in (("test", True), ("validation", False)):
        if split in data.splits:
            requests[split] = requested_views(data.splits[split], spec.input_modalities, every_view)
    return requests


def execute_run(
    spec: RunSpec,
    settings: StudySettings,
    data: StudyData,
    processor: RMTProcessor,
    run_dir: Path,
    seed: int,
    mixed_precision: str,
) -> dict[str, Any]:
    """Train and predict one run and return its record (what `predictions.json` stores)."""
    started = time.perf_counter()
    if spec.architecture == "tfidf":
        summary, predictions = run_tfidf(spec, settings, data, seed)
    else:
        summary, predictions = run_neural(spec, settings, data, processor, run_dir, seed, mixed_precision)
    summary["seconds"] = round(time.perf_counter() - started, 1)

    splits = {}
    for split, views in predictions.items():
        requests = view_requests(spec, data)[split]
        size = len(data.splits[split])
        splits[split] = {"ids": list(data.splits[split]["id"]), "views": {}}
        for view, probabilities in views.items():
            column: list[list[float] | None] = [None] * size
            for index, row in zip(requests[view], probabilities.tolist()):
                column[index] = row
            splits[split]["views"][view] = column
        counts = Counter({view: len(indices) for view, indices in requests.items()})
        logger.info(f"{spec.name}: predicted {split} views {dict(counts)}")

    train_labels = data.splits["train"]["label"]
    return {
        "spec": asdict(spec),
        "train": summary,
        "prior": training_prior(train_labels, len(data.id2label)),
        "splits": splits,
    }


def json_ready(value: Any) -> Any:
    """Return `value` with NaN and infinite floats replaced by None, so that it serializes as strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, NaN as null, through a temporary file so that a crash leaves no half file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(json_ready(payload), indent=2, ensure_ascii=False, allow_nan=False)
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
