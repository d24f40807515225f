"""Tiny RMT parts that build in milliseconds, shared by the tests."""

import torch

from configuration_rmt import RMTConfig
from modeling_rmt import RMTForMultimodalClassification

TINY_TEXT_CONFIG = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 120,
    "max_position_embeddings": 64,
}
IMAGE_SIZE = 32
VOCAB_SIZE = TINY_TEXT_CONFIG["vocab_size"]


def tiny_config(**overrides) -> RMTConfig:
    settings = {
        "text_config": dict(TINY_TEXT_CONFIG),
        "image_model_name": "resnet10t",
        "image_pretrained": False,
        "image_size": IMAGE_SIZE,
        "num_image_embeddings": 3,
    }
    settings.update(overrides)
    return RMTConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> RMTForMultimodalClassification:
    torch.manual_seed(seed)
    return RMTForMultimodalClassification(tiny_config(**overrides)).eval()


def random_batch(
    batch_size: int, text_length: int, seed: int, modality_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Return random inputs with padding in some rows, and both modalities present unless `modality_mask` is given."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch_size, text_length), generator=generator)
    input_ids[:, 0] = 2
    lengths = torch.randint(1, text_length + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    pixel_values = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if modality_mask is None:
        modality_mask = torch.ones(batch_size, 2, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "modality_mask": modality_mask,
    }
