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


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """Untrained tiny-preset weights saved as a checkpoint: a start for SFT/LoRA/DPO/distill, a model to score."""
    import torch

    from minimind.config import model_config
    from minimind.model import MiniMindLM
    from minimind.model.checkpoint import save_model

    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("base")
    save_model(MiniMindLM(model_config("tiny")), directory)
    return directory


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory):
    """The tiny preset pretrained 300 steps on the sample corpus, 5% held out for evaluation.

    Returns the trainer, its result, and the evaluation of the same weights before training.
    Shared by the loss-fall and evaluation tests so the suite trains it once.
    """
    from minimind.train.loop import Trainer

    config = tiny_config(
        tmp_path_factory.mktemp("pretrained"),
        data={"seq_len": 128},
        optim={"batch_size": 16, "lr": 1e-2, "warmup_steps": 20, "min_lr_ratio": 1.0, "max_steps": 300},
        eval={
            "val_fraction": 0.05,
            "every_steps": 150,
            "max_examples": 16,
            "continuation_docs": 16,
            "prefix_tokens": 16,
            "continuation_tokens": 8,
        },
        logging={"every_steps": 1},
    )
    trainer = Trainer(config)
    untrained = trainer.evaluator(trainer.model)
    result = trainer.fit()
    return trainer, result, untrained


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray cluster for the whole session, with its own temp dir; shut down at the end."""
    import os
    import shutil
    import tempfile

    import ray

    temp_dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield os.environ["RAY_ADDRESS"]
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    shutil.rmtree(temp_dir, ignore_errors=True)
