"""Baselines of the RMT study: image-only CNN, text-only BERT, ConcatBert and TF-IDF text classifiers.

The neural baselines take the batches of `train_rmt.RMTDataCollator` (`input_ids`, `attention_mask`,
`pixel_values`, `modality_mask`, `labels`), so they share RMT's image and text preprocessing and train
with the same `Trainer`. Each returns a `SequenceClassifierOutput` with `logits` and, given `labels`,
a cross-entropy `loss`.

- Image-only CNN: a timm backbone, global average pooling and a linear head.
- Text-only BERT: the final state of the tokenizer's CLS token and a linear head.
- ConcatBert: late fusion, the concatenated CNN and BERT CLS features and one linear head. An absent
  modality contributes zero features, the way MMBT masks it.
- TF-IDF + random forest and TF-IDF + gradient boosting, on character n-grams within word boundaries
  (`analyzer="char_wb"`), which need no word segmentation and so work for Chinese notes too. The
  gradient boosting model is scikit-learn's `GradientBoostingClassifier`, used in place of XGBoost.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import timm
import torch
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import Pipeline
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

IMAGE_PRESENT, TEXT_PRESENT = 0, 1
TEXT_CLASSIFIERS = ("random_forest", "gradient_boosting")


def build_text_encoder(text_model_name_or_path: str, config_overrides: str | None) -> PreTrainedModel:
    """Return a BERT-family encoder without pooler: pretrained, or from its config with overrides and random weights."""
    if config_overrides:
        config = AutoConfig.from_pretrained(text_model_name_or_path)
        config.update_from_string(config_overrides)
        encoder = AutoModel.from_config(config)
    else:
        encoder = AutoModel.from_pretrained(text_model_name_or_path)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def build_image_backbone(image_model_name: str, image_pretrained: bool) -> nn.Module:
    """Return a timm CNN that maps `(B, 3, H, W)` pixels to globally average-pooled `(B, num_features)` features."""
    return timm.create_model(image_model_name, pretrained=image_pretrained, num_classes=0)


def _classification_output(logits: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    loss = None
    if labels is not None:
        loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device).long())
    return SequenceClassifierOutput(loss=loss, logits=logits)


def _require_modality(modality_mask: torch.Tensor, column: int, name: str) -> None:
    """Raise ValueError when a row lacks the modality that a unimodal model needs."""
    missing = (~modality_mask[:, column].bool()).nonzero(as_tuple=True)[0].tolist()
    if missing:
        raise ValueError(f"Rows {missing} have no {name}, but this model reads only the {name}.")


class ImageOnlyClassifier(nn.Module):
    """Image-only CNN: timm backbone with global average pooling and a linear head. Every row needs an image."""

    input_modalities = ("image",)

    def __init__(self, image_model_name: str, image_pretrained: bool, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = build_image_backbone(image_model_name, image_pretrained)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.backbone.num_features, num_labels))

    def forward(
        self,
        pixel_values: torch.Tensor,
        modality_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **unused_inputs,
    ) -> SequenceClassifierOutput:
        _require_modality(modality_mask, IMAGE_PRESENT, "image")
        return _classification_output(self.classifier(self.backbone(pixel_values)), labels)


class TextOnlyClassifier(nn.Module):
    """Text-only BERT: the final CLS state and a linear head. Every row needs text."""

    input_modalities = ("text",)

    def __init__(self, encoder: PreTrainedModel, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.config.hidden_size, num_labels))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        modality_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **unused_inputs,
    ) -> SequenceClassifierOutput:
        _require_modality(modality_mask, TEXT_PRESENT, "text")
        cls_state = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return _classification_output(self.classifier(cls_state), labels)


class ConcatBertClassifier(nn.Module):
    """ConcatBert: CNN features and the BERT CLS state, concatenated, with one linear head.

    The features of an absent modality are zeros. The CNN runs on the present images only, so absent
    rows never reach its batch-norm statistics.
    """

    input_modalities = ("image", "text")

    def __init__(self, image_backbone: nn.Module, encoder: PreTrainedModel, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = image_backbone
        self.encoder = encoder
        width = image_backbone.num_features + encoder.config.hidden_size
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_labels))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        modality_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **unused_inputs,
    ) -> SequenceClassifierOutput:
        image_present = modality_mask[:, IMAGE_PRESENT].bool()
        text_present = modality_mask[:, TEXT_PRESENT].bool()

        cls_state = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        text_features = cls_state * text_present[:, None].to(cls_state.dtype)

        image_features = cls_state.new_zeros(cls_state.shape[0], self.backbone.num_features)
        if image_present.any():
            present_features = self.backbone(pixel_values[image_present]).to(cls_state.dtype)
            image_features = image_features.index_put((image_present.nonzero(as_tuple=True)[0],), present_features)

        features = torch.cat([image_features, text_features], dim=1)
        return _classification_output(self.classifier(features), labels)


@dataclass
class TfidfSettings:
    """Settings of the TF-IDF text baselines."""

    ngram_range: tuple[int, int] = (1, 3)
    max_features: int = 20000
    forest_trees: int = 300
    boosting_stages: int = 200


def build_tfidf_classifier(classifier: str, settings: TfidfSettings, seed: int) -> Pipeline:
    """Return a TF-IDF (character n-grams within word boundaries) + `classifier` scikit-learn pipeline."""
    vectorizer = TfidfVectorizer(
        analyzer="char_wb", ngram_range=settings.ngram_range, max_features=settings.max_features, sublinear_tf=True
    )
    if classifier == "random_forest":
        model = RandomForestClassifier(n_estimators=settings.forest_trees, random_state=seed, n_jobs=1)
    elif classifier == "gradient_boosting":
        model = GradientBoostingClassifier(
            n_estimators=settings.boosting_stages, max_depth=3, learning_rate=0.1, subsample=0.8, random_state=seed
        )
    else:
        raise ValueError(f"Unknown text classifier {classifier!r}; choose one of {TEXT_CLASSIFIERS}.")
    return Pipeline([("tfidf", vectorizer), ("classifier", model)])


def predict_class_probabilities(pipeline: Pipeline, texts: Sequence[str], num_labels: int) -> np.ndarray:
    """Return `(N, num_labels)` probabilities, with zero columns for classes absent from the training labels."""
    probabilities = np.zeros((len(texts), num_labels))
    probabilities[:, pipeline.classes_] = pipeline.predict_proba(list(texts))
    return probabilities
