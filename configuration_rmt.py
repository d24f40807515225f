"""Configuration of RMT, the robust multimodal transformer for pneumonia severity.

RMT follows MMBT (Kiela et al., 2019, "Supervised Multimodal Bitransformers for Classifying Images
and Text"): CNN feature maps become a few image embeddings in the input sequence of a BERT encoder
beside the text tokens. RMT adds three CLS tokens (image, text, multimodal), mask attention that
isolates the image CLS from the text and the text CLS from the image, and multi-task learning over
the three heads, so that a sample missing its X-ray or its notes is still answered by the head that
matches what it has.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# bert-base-chinese differs from `BertConfig()` only in its vocabulary size.
BERT_BASE_CHINESE_OVERRIDES = {"vocab_size": 21128}

DEFAULT_ID2LABEL = {0: "mild", 1: "severe"}

TASKS = ("image", "text", "multimodal")

ATTENTION_STRATEGIES = ("per_task", "fused")


class RMTConfig(PreTrainedConfig):
    r"""
    Configuration of [`RMTModel`] and [`RMTForMultimodalClassification`].

    Args:
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the BERT-family encoder that embeds the text tokens and encodes the joint sequence.
            Defaults to the architecture of bert-base-chinese (12 layers, hidden size 768, vocabulary 21128).
            Any encoder with BERT's absolute position ids counted from 0 and a `forward` that takes
            `inputs_embeds`, `token_type_ids`, `position_ids` and a 4-D additive `attention_mask` works
            (BERT, MiniLM, ELECTRA).
        text_model_name_or_path (`str`, *optional*, defaults to `"bert-base-chinese"`):
            Hub id or folder that the encoder and tokenizer weights came from. Recorded for provenance and
            used by `RMTForMultimodalClassification.from_backbones`; `from_pretrained` never reads it.
        image_model_name (`str`, *optional*, defaults to `"resnet152"`):
            timm model name of the CNN that turns the X-ray into a feature map.
        image_pretrained (`bool`, *optional*, defaults to `True`):
            Whether `from_backbones` starts the CNN from timm's ImageNet weights. Saved RMT checkpoints carry
            their own CNN weights, so `from_pretrained` never downloads them.
        freeze_image_backbone (`bool`, *optional*, defaults to `False`):
            Whether the CNN keeps its weights and its batch-norm statistics during training. The image projection
            still trains. A frozen CNN maps each image to fixed features, so they can be computed once and read
            from an `ImageFeatureCache` on later epochs and evaluations.
        num_image_embeddings (`int`, *optional*, defaults to 3):
            Number of image embeddings: the CNN feature map is average-pooled to this many regions.
        image_size (`int`, *optional*, defaults to 224):
            Side of the square input image in pixels, as produced by the image processor.
        task_weights (`list[float]`, *optional*, defaults to `[0.3, 0.3, 0.4]`):
            Weights of the image, text and multimodal cross-entropies in the multi-task loss.
        use_mask_attention (`bool`, *optional*, defaults to `True`):
            Whether the image CLS and the text CLS are computed in passes that see only their own modality.
            Off, all three CLS tokens read one pass with full attention over the present modalities.
        attention_strategy (`str`, *optional*, defaults to `"per_task"`):
            How mask attention is computed when `use_mask_attention` is on. `"per_task"` runs the image side,
            the text side and the joint sequence as three encoder passes; the multimodal CLS then reads tokens
            that attend across modalities. `"fused"` runs one pass with a structured mask: image-side tokens
            attend only to image-side keys, text-side tokens only to text-side keys, and only the multimodal
            CLS attends to both (bottleneck fusion, Nagrani et al., 2021, "Attention Bottlenecks for
            Multimodal Fusion"). Both give the same image and text CLS states; they differ in the multimodal
            CLS and in cost (about two joint passes against one).
        use_multitask (`bool`, *optional*, defaults to `True`):
            Whether the image and text heads train beside the multimodal head and answer the samples that
            have only their modality. Off, only the multimodal head trains and it answers every sample.
            Plain MMBT is `use_mask_attention=False, use_multitask=False`.
        classifier_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on each CLS state before its linear head.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initializer of the CLS embeddings, the image projection and the heads.
        id2label (`dict[int, str]`, *optional*, defaults to `{0: "mild", 1: "severe"}`):
            The label set; any number of labels works.
        temperatures (`dict[str, float]`, *optional*, defaults to 1.0 for each of `"image"`, `"text"` and `"multimodal"`):
            Temperature of each head for turning its logits into probabilities, `softmax(logits / temperature)`.
            Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") fits them on the
            validation split; 1.0 leaves a head's probabilities as trained. They never change the logits the
            model returns or its predicted labels. The `image-text-classification` pipeline applies them.
    """

    model_type = "rmt"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs=BERT_BASE_CHINESE_OVERRIDES
        ),
    }

    text_config: PreTrainedConfig | dict | None = None
    text_model_name_or_path: str = "bert-base-chinese"
    image_model_name: str = "resnet152"
    image_pretrained: bool = True
    freeze_image_backbone: bool = False
    num_image_embeddings: int = 3
    image_size: int = 224
    task_weights: list[float] | tuple[float, ...] = (0.3, 0.3, 0.4)
    use_mask_attention: bool = True
    attention_strategy: str = "per_task"
    use_multitask: bool = True
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02
    temperatures: dict[str, float] | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(DEFAULT_ID2LABEL)
            self.label2id = {label: index for index, label in DEFAULT_ID2LABEL.items()}
        super().__post_init__(**kwargs)
        if self.label2id is None:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.task_weights = [float(weight) for weight in self.task_weights]
        self.temperatures = {task: 1.0 for task in TASKS} | {
            task: float(value) for task, value in (self.temperatures or {}).items()
        }
        self._validate_rmt_fields()

    def _validate_rmt_fields(self) -> None:
        if len(self.task_weights) != len(TASKS):
            raise ValueError(
                f"task_weights must hold {len(TASKS)} weights (image, text, multimodal), got {self.task_weights}"
            )
        if any(weight < 0 for weight in self.task_weights) or sum(self.task_weights) <= 0:
            raise ValueError(f"task_weights must be non-negative with a positive sum, got {self.task_weights}")
        if self.attention_strategy not in ATTENTION_STRATEGIES:
            raise ValueError(
                f"attention_strategy must be one of {ATTENTION_STRATEGIES}, got {self.attention_strategy!r}"
            )
        if self.num_image_embeddings < 1:
            raise ValueError(f"num_image_embeddings must be at least 1, got {self.num_image_embeddings}")
        if self.num_labels < 2:
            raise ValueError(f"RMT classifies into at least 2 labels, got num_labels={self.num_labels}")
        unknown_heads = sorted(set(self.temperatures) - set(TASKS))
        if unknown_heads:
            raise ValueError(f"temperatures has unknown heads {unknown_heads}. The heads are {list(TASKS)}.")
        invalid = {task: value for task, value in self.temperatures.items() if not 0 < value < float("inf")}
        if invalid:
            raise ValueError(f"temperatures must be positive and finite, got {invalid}")

    @property
    def hidden_size(self) -> int:
        """Width of the joint sequence, equal to the encoder's hidden size."""
        return self.text_config.hidden_size


RMTConfig.register_for_auto_class()

__all__ = ["RMTConfig", "TASKS"]
