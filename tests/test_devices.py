"""Device choice on this CPU machine: ``auto`` is the CPU; a run or a command that asks for a GPU it cannot have
stops at once, saying why, instead of running on the CPU."""

import pytest
import torch
from conftest import ROOT, tiny_config

from minimind.cli import main
from minimind.config import ConfigError
from minimind.cuda import DeviceError, driver_version
from minimind.devices import select_device
from minimind.train.distributed import check_devices
from minimind.train.runtime import check_gpu_request

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_auto_is_the_cpu_here_and_a_gpu_request_is_refused_naming_why():
    assert select_device() == select_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="--device cuda:1 asks for a GPU, but .*not falling back to the CPU"):
        select_device("cuda:1")
    with pytest.raises(DeviceError, match="runtime.device cuda asks for a GPU, but "):
        check_gpu_request(tiny_config(runtime={"device": "cuda"}))
    with pytest.raises(DeviceError, match="distributed.use_gpu: true asks for a GPU"):
        check_gpu_request(tiny_config(distributed={"use_gpu": True}))
    check_gpu_request(tiny_config())
    assert driver_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build") == (
        "570.86.15"
    )


def test_ray_train_refuses_a_cuda_device_without_gpu_workers():
    with pytest.raises(ConfigError, match="runtime.device: cuda under Ray Train needs distributed.use_gpu"):
        check_devices(tiny_config(runtime={"device": "cuda"}))
    check_devices(tiny_config(runtime={"device": "cuda"}, distributed={"use_gpu": True}))


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", str(ROOT / "recipes" / "tiny" / "pretrain.yaml"), "--distributed.use_gpu", "true"],
        ["generate", "--checkpoint", "unused", "--device", "cuda"],
    ],
    ids=["train", "generate"],
)
def test_the_cli_stops_before_any_work_when_its_gpu_is_missing(argv, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(argv)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and "device error:" in err and "asks for a GPU" in err, err


def test_what_a_gpu_worker_is_given_as_a_cpu_can_check_it(tmp_path):
    """The GPU-only choices, as the pure functions that make them: dtype auto by compute capability, a worker's
    own GPU random stream picked from a checkpoint of one stream per visible GPU, and DDP's settings (real gloo)."""
    import torch.distributed as dist

    from minimind.train.checkpointing import own_gpu_stream
    from minimind.train.parallel import DataParallel
    from minimind.train.runtime import gpu_dtype, resolve_dtype

    assert [gpu_dtype(c) for c in ((7, 5), (8, 0), (9, 0))] == [torch.float16, torch.bfloat16, torch.bfloat16]
    assert resolve_dtype(tiny_config().runtime, torch.device("cpu")) == torch.float32

    streams = [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]
    assert own_gpu_stream({"cuda": streams}, torch.device("cuda", 1)).item() == 11  # an old list: its own entry
    assert own_gpu_stream({"cuda": streams[0]}, torch.device("cuda", 3)).item() == 10  # one stream: its own
    assert own_gpu_stream({"cuda": streams}, torch.device("cpu")) is None

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(2, 2)
        wrapped, _ = DataParallel(torch.device("cpu")).parallelize(model, torch.optim.SGD(model.parameters()))
        # RoPE tables are computed alike on every rank: not broadcast each forward; gradients live in the buckets.
        assert (wrapped.broadcast_buffers, wrapped.gradient_as_bucket_view) == (False, True)
    finally:
        dist.destroy_process_group()
