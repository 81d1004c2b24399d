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


# Helpers of the tests that run train.py, in this process or as a subprocess.

def run_main(argv) -> int:
    """train.main in this process, single-threaded; returns its exit status."""
    import torch
    import train
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(argv)
    finally:
        torch.set_num_threads(n)


def subprocess_env() -> dict:
    """The environment of a train.py subprocess: one thread, offline, unbuffered, not a torchrun rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def read_metrics(out: Path, eval_records=False) -> list[dict]:
    """OUT/metrics.jsonl's train records (or its eval records)."""
    import json
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in recs if bool(r.get("eval")) == eval_records]


def save_checkpoint(path: Path, config) -> str:
    """A random-init HF checkpoint of `config` with the synthetic tokenizer saved into it, for --model PATH."""
    import torch
    import data
    import model as model_lib
    torch.manual_seed(0)
    model_lib.Transformer(config).save_pretrained(path)
    data.synthetic_tokenizer().save(path)
    return str(path)
