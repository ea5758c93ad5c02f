from pathlib import Path

import pytest

from minimind.config import build_config
from minimind.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


def tiny_config(tmp_path: Path | None = None, **sections):
    """A tiny-preset config on the bundled sample; ``sections`` are nested dicts merged in."""
    raw = {
        "model": {"preset": "tiny"},
        "data": {"train_files": [str(SAMPLE / "pretrain.jsonl")], "seq_len": 64},
        "optim": {"batch_size": 8, "lr": 3e-3, "max_steps": 4},
        "logging": {"every_steps": 1},
    }
    for name, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(name, {}).update(value)
        else:
            raw[name] = value
    if tmp_path is not None:
        raw.setdefault("checkpoint", {}).setdefault("dir", str(tmp_path))
    return build_config(raw)
