"""Model card (README.md) of a trained RMT checkpoint.

The card has YAML metadata for the Hub (library_name, pipeline_tag, tags, optional base_model and
license), then: how to load the model, intended use, training data (split sizes, modality patterns,
labels), metrics per task and split, calibration, an optional robustness table, limitations and the
training settings.

Metrics come from `all_results.json` as `train_rmt.py` writes it: `{split}_{task}_{metric}` for the
tasks in `CARD_TASKS` and the metrics in `CARD_METRICS`, and the calibration keys
`{split}_{head}_ece_before`, `{split}_{head}_ece_after`. Confidence intervals and a robustness table
come from an optional study `results.json` with this layout (every key optional):

    {
      "confidence_level": 0.95,
      "intervals": {"test_routed_accuracy": [0.71, 0.86], "...": [low, high]},
      "robustness_caption": "Test accuracy when a share of the X-rays is removed.",
      "robustness": [{"missing_image_rate": 0.0, "accuracy": 0.80}, {"missing_image_rate": 0.5, "...": 0.0}]
    }

Interval keys are the keys of `all_results.json`. Robustness rows become table rows, with the keys of
the first row as columns.
"""

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

CARD_TASKS = ("routed", "image", "text", "multimodal")
CARD_METRICS = ("accuracy", "precision", "sensitivity", "specificity", "roc_auc")
CALIBRATED_HEADS = ("image", "text", "multimodal")
MODALITY_PATTERNS = ("image+text", "image only", "text only")

# Hub pipeline tags are a fixed list without an image+text classification task, so the card uses the
# tag of the X-ray input. The transformers task of the carried pipeline is given in the tags and the text.
PIPELINE_TAG = "image-classification"
PIPELINE_TASK = "image-text-classification"
CARD_TAGS = (
    "rmt",
    "multimodal",
    "image-text-classification",
    "chest-x-ray",
    "pneumonia",
    "medical",
    "missing-modality",
    "custom_code",
)
# A Hub repository id: a name, optionally after an owner and a slash.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class SplitSummary:
    """Size, modality patterns and label counts of one data split."""

    samples: int
    modality_patterns: dict[str, int]
    labels: dict[str, int]


@dataclass
class CardContext:
    """Everything the card states besides the metrics files.

    `config` is the model's RMTConfig. `training` contains settings to list, e.g. learning rate and epochs.
    `repo_id` is the Hub id that the usage examples load. Without one they load `model_name` from disk.
    """

    model_name: str
    config: Any
    positive_label: str
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    data_files: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    repo_id: str | None = None
    license: str | None = None


def summarize_split(labels: Iterable[int], images: Iterable[Any], texts: Iterable[Any], id2label: dict) -> SplitSummary:
    """Count the samples of a split per modality pattern and per label.

    `labels` are class ids. An image or a text is present when it is not None; the caller removes blank texts.
    """
    patterns: Counter[str] = Counter()
    label_counts: Counter[str] = Counter()
    samples = 0
    for label, image, text in zip(labels, images, texts, strict=True):
        samples += 1
        label_counts[id2label[label]] += 1
        if image is not None and text is not None:
            patterns["image+text"] += 1
        elif image is not None:
            patterns["image only"] += 1
        else:
            patterns["text only"] += 1
    return SplitSummary(samples, dict(patterns), dict(label_counts))


def load_json_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object from `path`, and raise ValueError naming `what` and the path when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"{what} {str(path)!r} not found.") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must contain a JSON object, got {type(data).__name__}.")
    return data


def load_study_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a study results.json (layout in the module docstring).

    Raises:
        ValueError: unreadable JSON, an interval that is not `[low, high]` with low <= high, or robustness
            rows that are not a list of objects. The message names the file and the entry.
    """
    study = load_json_file(path, "Study results file")
    for key, interval in study.get("intervals", {}).items():
        valid = isinstance(interval, (list, tuple)) and len(interval) == 2 and interval[0] <= interval[1]
        if not valid:
            raise ValueError(f"Study results file {str(path)!r}: interval {key!r} must be [low, high], got {interval!r}.")
    rows = study.get("robustness", [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"Study results file {str(path)!r}: 'robustness' must be a list of objects.")
    return study


def is_hub_id(name: str | None) -> bool:
    """Return True for a string shaped like a Hub repository id that is not an existing local path."""
    return bool(name) and _HUB_ID_PATTERN.match(name) is not None and not os.path.exists(name)


def describe_source(name: str) -> str:
    """Return a Hub id as a code span, and a local path as its last folder name, so cards leak no local paths."""
    if is_hub_id(name):
        return f"`{name}`"
    return f"a local folder named `{Path(name).name}`"


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_format_number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_metadata(context: CardContext) -> str:
    """Return the YAML front matter, `---` lines included."""
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(CARD_TAGS),
        license=context.license,
        base_model=context.base_model if is_hub_id(context.base_model) else None,
    )
    return f"---\n{metadata.to_yaml()}\n---\n"


def render_overview(context: CardContext) -> str:
    config = context.config
    labels = [config.id2label[index] for index in range(config.num_labels)]
    text_config = config.text_config
    label_list = ", ".join(f"`{label}`" for label in labels)
    encoder = (
        f"{text_config.num_hidden_layers} layers, hidden size {text_config.hidden_size}, "
        f"tokenizer from {describe_source(config.text_model_name_or_path)}"
    )
    return f"""# {context.model_name}

RMT, a robust multimodal transformer, classifies pneumonia severity into {label_list} from a chest
X-ray, clinical text or both. A `{config.image_model_name}` CNN turns the X-ray into
{config.num_image_embeddings} image embeddings that join the text tokens in a BERT encoder ({encoder}).
Three heads read three CLS tokens: the image head classifies samples with only an X-ray, the text head
samples with only text, and the multimodal head samples with both.
"""


def render_usage(context: CardContext) -> str:
    model_id = context.repo_id or f"path/to/{context.model_name}"
    return f"""## How to use

The model, processor and pipeline are custom code carried in this repository
(`configuration_rmt.py`, `modeling_rmt.py`, `processing_rmt.py`, `pipeline_rmt.py`), so loading needs
`trust_remote_code=True`. Read those files before running them.

```python
from transformers import pipeline

classifier = pipeline("{PIPELINE_TASK}", model="{model_id}", trust_remote_code=True)
classifier({{"image": "chest.dcm", "text": "Fever and dyspnea for three days."}})  # multimodal head
classifier({{"image": "chest.png"}})  # image head
classifier({{"text": "SpO2 88% on room air."}})  # text head
```

Each result has `label`, `score`, `probabilities` (every label) and `head`, the head that produced it.
Images may be PNG or JPEG (8 or 16 bit), DICOM files or pydicom Datasets (both need
`pip install pydicom`), PIL images or numpy arrays.

Without the pipeline, the processor returns `modality_mask`, a `(batch, 2)` tensor whose column 0 is 1
where the X-ray is present and column 1 is 1 where the text is. The model routes each row to the head
that matches it, so pass the mask with every batch in which a modality is missing:

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoProcessor

processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained("{model_id}", trust_remote_code=True).eval()
batch = processor(images=["chest.png", None], text=[None, "Mild cough."], return_tensors="pt")
print(batch["modality_mask"])  # tensor([[1, 0], [0, 1]])
with torch.no_grad():
    logits = model(**batch).logits  # row 0 from the image head, row 1 from the text head
```

`model(...).logits` are uncalibrated. The pipeline divides them by the temperature of the head used
(`config.temperatures`) before the softmax.
"""


def render_intended_use() -> str:
    return """## Intended use

Research on chest X-ray and clinical text models that must cope with a missing modality. This model
is not a medical device and has not been cleared or approved by any regulator. Do not use it to
diagnose, triage or treat patients, or in place of a clinician's judgement.
"""


def render_training_data(context: CardContext) -> str:
    if not context.splits:
        return "## Training data\n\nNo data summary was recorded.\n"
    labels = sorted({label for summary in context.splits.values() for label in summary.labels})
    header = ["split", "samples", *MODALITY_PATTERNS, *labels]
    rows = [
        [
            split,
            summary.samples,
            *(summary.modality_patterns.get(pattern, 0) for pattern in MODALITY_PATTERNS),
            *(summary.labels.get(label, 0) for label in labels),
        ]
        for split, summary in context.splits.items()
    ]
    files = "".join(f"- {split}: `{name}`\n" for split, name in context.data_files.items())
    files_text = f"\nData files:\n\n{files}" if files else ""
    return f"""## Training data

Samples per split, per modality pattern and per label:

{_markdown_table(header, rows)}
{files_text}"""


def _metric_cell(results: dict[str, float], intervals: dict[str, list[float]], key: str) -> str:
    if key not in results:
        return "n/a"
    cell = _format_number(results[key])
    if key in intervals:
        low, high = intervals[key]
        cell += f" [{low:.3f}, {high:.3f}]"
    return cell


def render_metrics(context: CardContext, results: dict[str, float], study: dict[str, Any] | None) -> str:
    """Return one table per evaluated split, with the study's confidence intervals beside the metrics."""
    intervals = (study or {}).get("intervals", {})
    sections = []
    for split in ("validation", "test"):
        tasks = [task for task in CARD_TASKS if f"{split}_{task}_samples" in results]
        if not tasks:
            continue
        rows = [
            [task, results[f"{split}_{task}_samples"]]
            + [_metric_cell(results, intervals, f"{split}_{task}_{metric}") for metric in CARD_METRICS]
            for task in tasks
        ]
        sections.append(f"### {split}\n\n{_markdown_table(['task', 'samples', *CARD_METRICS], rows)}\n")
    if not sections:
        return "## Evaluation\n\nNo evaluation results were recorded.\n"

    if intervals:
        level = study.get("confidence_level", 0.95)
        interval_text = f"Brackets give {level:.0%} confidence intervals from the study results."
    else:
        interval_text = "No confidence intervals were computed for these metrics."
    return f"""## Evaluation

`routed` answers every sample with the head that matches its modalities. `image`, `text` and
`multimodal` evaluate one head on the samples that have its modalities, with the other modality
masked. Sensitivity, specificity and ROC-AUC take `{context.positive_label}` as the positive class.
{interval_text}

{chr(10).join(sections)}"""


def render_calibration(context: CardContext, results: dict[str, float]) -> str:
    temperatures = getattr(context.config, "temperatures", None) or {}
    rows = []
    for split in ("validation", "test"):
        for head in CALIBRATED_HEADS:
            before = results.get(f"{split}_{head}_ece_before")
            if before is None:
                continue
            after = results.get(f"{split}_{head}_ece_after", float("nan"))
            rows.append([split, head, temperatures.get(head, 1.0), before, after])
    if not rows:
        listed = ", ".join(f"{head} {value:.3f}" for head, value in temperatures.items())
        return f"## Calibration\n\nNo calibration was run. Temperatures: {listed}.\n"
    return f"""## Calibration

Temperature scaling fitted one temperature per head on the validation split (L-BFGS on the negative
log-likelihood). The table gives the expected calibration error (ECE, 15 equal-width bins) before and
after. Validation ECE after scaling is measured on the data the temperatures were fitted on, so the
test rows are the fair estimate.

{_markdown_table(["split", "head", "temperature", "ECE before", "ECE after"], rows)}
"""


def render_robustness(study: dict[str, Any] | None) -> str:
    rows = (study or {}).get("robustness", [])
    if not rows:
        return ""
    columns = list(rows[0])
    caption = study.get("robustness_caption", "")
    table = _markdown_table(columns, [[row.get(column, "") for column in columns] for row in rows])
    return f"## Robustness\n\n{caption}\n\n{table}\n".replace("\n\n\n", "\n\n")


def render_limitations(context: CardContext) -> str:
    total = sum(summary.samples for summary in context.splits.values())
    size_text = f"{total} samples in all" if total else "an unrecorded number of samples"
    return f"""## Limitations

- Trained and evaluated on {size_text}. The metrics above come from the same source as the
  training data and do not show how the model performs in other hospitals, scanners, populations or
  note styles.
- The labels follow the source data's definition of severity. They are not a clinical outcome.
- A head answers only the modality patterns it was trained on. Each head's accuracy differs, so check
  the per-task rows, not only `routed`, for the inputs you expect.
- The tokenizer, from {describe_source(context.config.text_model_name_or_path)}, decides which languages the
  text side reads.
- DICOM input must be a single-frame image. Compressed transfer syntaxes need pydicom's decoder plugins.
- Temperatures were fitted on the validation split, if at all, and may not hold on other data.
- Grad-CAM heatmaps and attention maps (`explain_rmt.py`) show what moved a score in this model, not
  clinical evidence.
"""


def render_training_procedure(context: CardContext) -> str:
    config = context.config
    settings = {
        "image model": config.image_model_name,
        "image size": config.image_size,
        "image embeddings": config.num_image_embeddings,
        "text encoder and tokenizer source": describe_source(config.text_model_name_or_path),
        "mask attention": config.use_mask_attention,
        "multi-task": config.use_multitask,
        "task weights (image, text, multimodal)": ", ".join(f"{weight:g}" for weight in config.task_weights),
        **context.training,
    }
    rows = [[name, f"{value:g}" if isinstance(value, float) else value] for name, value in settings.items()]
    return f"## Training procedure\n\n{_markdown_table(['setting', 'value'], rows)}\n"


def render_model_card(context: CardContext, results: dict[str, float], study: dict[str, Any] | None = None) -> str:
    """Return the whole card: metadata, then the sections in reading order."""
    sections = [
        render_overview(context),
        render_usage(context),
        render_intended_use(),
        render_training_data(context),
        render_metrics(context, results, study),
        render_calibration(context, results),
        render_robustness(study),
        render_limitations(context),
        render_training_procedure(context),
    ]
    body = "\n".join(section for section in sections if section)
    return f"{render_metadata(context)}\n{body}"


def write_model_card(
    folder: str | os.PathLike, context: CardContext, study_results: str | os.PathLike | None = None
) -> Path:
    """Write README.md into `folder` from `context`, `folder/all_results.json` and optional study results."""
    folder = Path(folder)
    results_path = folder / "all_results.json"
    results = load_json_file(results_path, "Results file") if results_path.is_file() else {}
    study = load_study_results(study_results) if study_results is not None else None
    path = folder / "README.md"
    path.write_text(render_model_card(context, results, study), encoding="utf-8")
    return path


__all__ = [
    "CardContext",
    "SplitSummary",
    "load_study_results",
    "render_model_card",
    "summarize_split",
    "write_model_card",
]
