import atexit
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

# Ray reads its auth settings when first imported: the test cluster's token must be set before any
# test module imports ray. The token is this session's own (nothing is written to ~/.ray).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray Train's Prometheus metrics (for the dashboard; no test reads them) cost each run's controller and
# workers ~12% of a tiny run's CPU time (tests/local_cluster.py sets it for the cluster's own processes).
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# Ray's usage statistics, off as on the test cluster (tests/local_cluster.py): with them on, Ray Data in this process
# and in the drivers tests start records each execution through one more actor process and polls for Prometheus.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The session's own token cache (minimind/data/token_cache.py), for this process, the test cluster and the drivers
# tests start: each sample file is tokenized once per session, not once per run, and never read from a developer's.
os.environ["MINIMIND_CACHE"] = tempfile.mkdtemp(prefix="minimind-cache-")
atexit.register(shutil.rmtree, os.environ["MINIMIND_CACHE"], ignore_errors=True)

import pytest  # noqa: E402

from minimind.config import build_config  # noqa: E402
from minimind.tokenizer import load_tokenizer  # noqa: E402

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
    """The tiny preset pretrained 100 steps on the sample corpus, 5% held out for evaluation.

    Returns the trainer, its result, and the evaluation of the same weights before training.
    Shared by the loss-fall and evaluation tests so the suite trains it once.
    """
    from minimind.train.loop import Trainer

    config = tiny_config(
        tmp_path_factory.mktemp("pretrained"),
        data={"seq_len": 128},
        optim={"batch_size": 16, "lr": 1e-2, "warmup_steps": 10, "min_lr_ratio": 1.0, "max_steps": 100},
        eval={
            "val_fraction": 0.05,
            "every_steps": 50,
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
def ray_cluster():
    """One real two-node Ray cluster for the whole session (head + a second ``ray start`` node, 2 CPUs
    each, own temp dirs and ports); this process is connected to it as a driver."""
    import ray
    from local_cluster import LocalCluster

    cluster = LocalCluster(cpus_per_node=2, nodes=2, pythonpath=str(ROOT))
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        cluster.stop()


@pytest.fixture(scope="session")
def ray_address(ray_cluster):
    return ray_cluster.address


# Multiple-choice files in C-Eval's layout (with its dev split's explanation column), CMMLU's (an unnamed index
# column, capitalised names) and jsonl.
CEVAL_VAL = """id,question,A,B,C,D,answer
0,中国的首都是哪座城市？,上海,北京,广州,深圳,B
1,"一年有几个季节？",两个,三个,四个,五个,C
2,水在标准大气压下的沸点是多少摄氏度？,50,80,100,120,C
"""
CEVAL_DEV = """id,question,A,B,C,D,answer,explanation
0,太阳从哪个方向升起？,东方,西方,南方,北方,A,常识
"""
CMMLU = """,Question,A,B,C,D,Answer
0,1加1等于几？,1,2,3,4,B
1,"三角形有几条边？",三条,四条,五条,六条,A
"""
CHOICES_JSONL = [
    {"question": "下面哪个是水果？", "choices": ["苹果", "石头", "铁"], "answer": 0, "subject": "常识"},
    {"question": "天空通常是什么颜色？", "choices": ["绿色", "蓝色"], "answer": "B"},
]


def choice_files(directory: Path) -> dict[str, Path]:
    files = {"history_val.csv": CEVAL_VAL, "history_dev.csv": CEVAL_DEV, "arithmetic.csv": CMMLU,
             "mixed.jsonl": "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in CHOICES_JSONL)}  # fmt: skip
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return {name: directory / name for name in files}
