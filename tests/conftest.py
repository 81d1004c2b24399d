"""Shared pytest fixtures. Tests never touch the network: the Hub is forced offline here."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Real third-party data (tokenizers, HH-RLHF, chat templates, a tiny Llama) lives beside the checkout,
# never in it; see ../shared/data/SOURCES.md. Tests that need it skip when it is absent.
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA}")
    return SHARED_DATA
