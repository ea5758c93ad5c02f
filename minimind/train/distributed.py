"""Ray Train: any stage as a ``TorchTrainer`` job. Every Ray Train touchpoint of the project is here.

Driver side, :func:`build_trainer` turns a :class:`TrainConfig` into a ``TorchTrainer``:

- ``ScalingConfig`` from ``distributed.*`` (workers, GPU or not, CPUs/GPUs per worker, placement);
- ``RunConfig(name, storage_path)`` from ``checkpoint.dir`` = ``storage_path/name`` (a local or
  shared path, or ``s3://``/``gs://``): re-running with the same name resumes the run;
- ``CheckpointConfig`` from ``checkpoint.keep_last``/``score_metric``; ``FailureConfig`` from
  ``distributed.max_failures`` (a dead worker restarts the group from the last checkpoint).

Worker side, :func:`train_worker` runs the one loop unchanged: the device comes from
``ray.train.torch.get_device()``, the strategy from the process group Ray set up, and
:class:`RayTrainRun` is the loop's checkpoint store: rank 0 writes a checkpoint into a local
temporary folder, every rank calls ``ray.train.report`` (a barrier, so only at checkpoint and
evaluation steps, and at log steps every ``logging.ray_report_every_s``) and Ray persists it under the
storage path as ``step_N``; a resumed or restarted worker group starts from the newer of
``ray.train.get_checkpoint()`` and the run directory's ``latest``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from minimind import storage
from minimind.capacity import check_placeable, cluster_limits, on_kuberay
from minimind.config import ConfigError, DistributedConfig, TrainConfig, build_config, config_to_dict
from minimind.devices import require_cuda
from minimind.model import count_parameters
from minimind.model.checkpoint import META_FILE, checkpoint_location, resolve_checkpoint
from minimind.storage import is_uri
from minimind.train.checkpointing import checkpoint_name, checkpoint_step, rng_state, write_checkpoint
from minimind.train.loop import Trainer
from minimind.train.parallel import DataParallel, SingleProcess
from minimind.train.runtime import resolve_dtype

# ray.train.report() waits for the controller's next poll; Ray's 2 s default would stall every log
# step of a small model. Propagated from the driver to the controller and the workers.
DEFAULT_POLL_INTERVAL_S = "0.5"
# Workers keep the job's working directory as their cwd (Ray would chdir them into a run folder),
# so relative paths in the config mean the same thing on every node.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
# Ray Train's print patch sends each print to both stdout and its logger: every line shows twice.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def split_run_dir(run_dir: str) -> tuple[str, str]:
    """``checkpoint.dir`` as Ray's (storage_path, name); local paths become absolute."""
    run_dir = run_dir.rstrip("/")
    if is_uri(run_dir):
        storage, _, name = run_dir.rpartition("/")
        return storage, name
    path = Path(run_dir).expanduser().resolve()
    return str(path.parent), path.name


# -- worker side --------------------------------------------------------------------------------


class RayTrainRun:
    """The loop's checkpoint store inside a Ray Train worker."""

    def __init__(self, strategy, run_dir: str, verdicts=None):
        self.strategy = strategy
        self.run_dir = run_dir
        self.verdicts = verdicts
        self._last_report = time.monotonic()

    def resume_directory(self):
        """The run's newest complete checkpoint: after a re-submit, or after Ray restarted the group.

        Ray's controller records a reported checkpoint at its next poll, after the workers have
        persisted it and rank 0 has pointed ``latest`` at it; a driver killed in between would lose
        that checkpoint if only Ray's record counted. Rank 0 decides, so every rank loads the same one.
        """
        checkpoint = ray.train.get_checkpoint()
        recorded = checkpoint_step(Path(checkpoint.path).name) if checkpoint else -1
        pointed = self._pointed_checkpoint() if self.strategy.rank == 0 else None
        pointed = self.strategy.all_gather_object(pointed)[0]
        if pointed is not None and checkpoint_step(Path(pointed).name) > recorded:
            return contextlib.nullcontext(str(resolve_checkpoint(pointed)))  # at a URI: this node's copy
        return checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)

    def _pointed_checkpoint(self) -> str | None:
        """The checkpoint the run directory's ``latest`` names (a path or a URI), when it is complete."""
        try:
            location = checkpoint_location(self.run_dir)
        except FileNotFoundError:
            return None
        return location if storage.is_file(storage.join(location, META_FILE)) else None

    def publish(self, trainer: Trainer, metrics: dict | None, save: bool, evaluated: bool = False) -> None:
        if not (save or evaluated or self._log_report_due(trainer)):
            return  # the row is printed and in metrics.jsonl (rank 0); Ray gets a later one
        self._report(trainer, metrics, save)
        self._last_report = time.monotonic()
        if self.verdicts is not None and self.strategy.rank == 0:
            self.verdicts.get()  # the sweep judged this report and lets the trial go on (other ranks wait at
            # the next collective); a paused or stopped trial never gets one, and ends here

    def _log_report_due(self, trainer: Trainer) -> bool:
        """Whether a log step's row goes to Ray: ``logging.ray_report_every_s`` after the last report, by rank
        0's clock for every rank (a report is a barrier all must join). Each report waits for the Train
        controller's poll, which at fast steps costs more than the steps between two logs."""
        interval = trainer.config.logging.ray_report_every_s
        if interval <= 0:
            return True
        due = self.strategy.rank == 0 and time.monotonic() - self._last_report >= interval
        return bool(self.strategy.all_reduce(torch.tensor(float(due), device=trainer.device), "max"))

    def _report(self, trainer: Trainer, metrics: dict | None, save: bool) -> None:
        # total_steps: whoever reads the reports (a sweep's scheduler) can tell the run's last one.
        metrics = {**(metrics or {"step": trainer.step}), "total_steps": trainer.total_steps}
        if not save:
            ray.train.report(metrics)
            return
        name = checkpoint_name(trainer.step)
        rng_states = self.strategy.all_gather_object(rng_state(trainer.device))  # every rank's dropout stream
        if self.strategy.rank != 0 and not self.strategy.sharded:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        # Rank 0 writes the checkpoint; under ZeRO every rank writes its shards, and Ray merges the
        # ranks' folders into one step_N under the storage path.
        staging = Path(tempfile.mkdtemp(prefix=f"minimind-{name}-rank{self.strategy.rank}-"))
        try:
            write_checkpoint(trainer, staging, rng_states)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(staging), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if self.strategy.sharded:
            self.strategy.all_gather_object(None)  # every rank's shards are persisted before `latest` names them
        if trainer.files:
            trainer.files.write_latest(name)  # persisted by now: the report above uploads synchronously


def build_strategy(config: TrainConfig, device: torch.device):
    """DeepSpeed ZeRO, or DDP across Ray's process group; a single DDP worker runs plainly."""
    if config.distributed.strategy == "deepspeed":
        from minimind.train.zero import DeepSpeedZero  # imports DeepSpeed: only for DeepSpeed runs

        return DeepSpeedZero(config, device, resolve_dtype(config.runtime, device))
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Every parameter gets a gradient every step, MoE experts included (one that got no token runs
        # on zero rows: a zero gradient), so DDP needs no search for unused parameters.
        return DataParallel(device)
    return SingleProcess()


def quiet_report_logs() -> None:
    """Ray Train logs every report of every rank at INFO; the progress line says it once. The
    report logger is named after its file, so it is looked up through its (loaded) module."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    reporting = sys.modules.get("ray.train.v2._internal.execution.context")
    if reporting is not None:
        logging.getLogger(reporting.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``: one worker of the run (``loop_config``: see :func:`build_trainer`)."""
    config = build_config(loop_config["config"])
    quiet_report_logs()
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    if config.distributed.use_gpu:  # Ray hands out a GPU id even where torch cannot use it (driver, CPU build)
        where = f"rank {context.get_world_rank()} on node {ray.util.get_node_ip_address()}"
        require_cuda(f"distributed.use_gpu: true ({where})", device.index if device.type == "cuda" else None)
    if not config.distributed.use_gpu or config.distributed.offload_optimizer:
        # CPU workers compute with these threads; offloaded ZeRO steps the optimizer on the host with them
        # (DeepSpeed's CPU Adam, an OpenMP op loaded later). Ray's cluster launcher starts Ray with
        # OMP_NUM_THREADS=1, which every worker would inherit: one thread, whatever the CPUs reserved.
        threads = max(1, int(config.distributed.cpus_per_worker))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    strategy = build_strategy(config, device)
    print(
        f"[worker] rank {context.get_world_rank()}/{context.get_world_size()} on node "
        f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]}) pid {os.getpid()} "
        f"device {device}",
        flush=True,
    )
    run = RayTrainRun(strategy, config.checkpoint.dir, verdicts=loop_config.get("verdicts"))
    trainer = Trainer(config, strategy=strategy, run=run, device=device)
    if strategy.rank == 0 and trainer.data.rejects.total:
        print(f"[data] {trainer.data.rejects.summary()}", flush=True)
    trainer.fit()


# -- driver side --------------------------------------------------------------------------------


def check_devices(config: TrainConfig) -> None:
    """Under Ray Train a worker's device is what Ray gives it: ``runtime.device: cuda`` without
    ``distributed.use_gpu`` would get no GPU and train on the CPU."""
    if config.runtime.device.startswith("cuda") and not config.distributed.use_gpu:
        raise ConfigError(
            f"runtime.device: {config.runtime.device} under Ray Train needs distributed.use_gpu: true (--use-gpu); "
            "without it Ray gives the workers no GPU and they would train on the CPU"
        )


def node_memory() -> list[float]:
    """Ray's schedulable memory of each live node, in bytes (a node started with --memory=0 says nothing about its
    RAM and is left out)."""
    nodes = [node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]]
    return [memory for memory in nodes if memory > 0]


def check_deepspeed(config: TrainConfig) -> None:
    """DeepSpeed runs: refuse what would fail in the workers, before any worker starts."""
    if config.distributed.strategy != "deepspeed":
        return
    try:
        from minimind.train.zero import deepspeed_config, offload_bytes
    except ImportError as error:
        raise ConfigError(
            f"distributed.strategy: deepspeed is not installed ({error}); pip install -e '.[deepspeed]'"
        ) from None
    try:
        deepspeed_config(config, torch.float32, config.distributed.num_workers)  # the template reads and fills
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.distributed.offload_optimizer:
        parameters = count_parameters(config.model)
        needed, workers = offload_bytes(parameters), config.distributed.num_workers
        nodes = node_memory()
        if needed > sum(nodes) or needed / workers > max(nodes, default=0):
            raise ConfigError(
                f"distributed.offload_optimizer: {parameters:,} parameters need {needed / 2**30:.1f} GiB of host "
                f"memory for offloaded optimizer state ({needed / workers / 2**30:.1f} GiB per worker); the cluster "
                f"has {sum(nodes) / 2**30:.1f} GiB (largest node {max(nodes, default=0) / 2**30:.1f} GiB)"
            )


def check_memory(config: TrainConfig) -> None:
    """Refuse a model whose fp32 weights alone outgrow every node's memory, before any worker starts: each worker
    builds them in host memory (then moves them to its device), so such a run could only fail, once its workers had
    started (a sweep's trial of a size too big: seconds of start-up on CPU, minutes on a GPU cluster). What else
    training holds (gradients, optimizer state, activations) is for the workers to find."""
    if not ray.is_initialized():
        return
    parameters = count_parameters(config.model)
    needed = 4 * parameters
    nodes = node_memory()
    if nodes and needed > max(nodes):
        raise ConfigError(
            f"model: {parameters:,} parameters would run out of memory before training: their fp32 weights alone take "
            f"{needed / 2**30:.1f} GiB of host memory in each worker, and the largest node has "
            f"{max(nodes) / 2**30:.1f} GiB"
        )


def check_workers_fit(config: TrainConfig) -> None:
    """Refuse workers that no node of the running cluster, nor any its autoscaler can add, would hold (``--use-gpu``
    on a cluster without GPUs, more workers than CPUs): Ray Train would retry starting them for ever."""
    if not ray.is_initialized():
        return
    if on_kuberay():
        return  # its autoscaler's limits cannot be read
    settings = config.distributed
    present = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    workers = (worker_resources(settings), settings.num_workers, settings.placement_strategy)
    check_placeable(present, cluster_limits(), *workers)


def worker_resources(settings: DistributedConfig) -> dict[str, float]:
    """One worker's Ray resources."""
    return {"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus_per_worker} if settings.use_gpu else {})}


def build_trainer(config: TrainConfig, callbacks: list | None = None, verdicts=None) -> TorchTrainer:
    """A ``TorchTrainer`` that runs ``config`` with ``distributed.num_workers`` workers.

    ``callbacks`` are Ray Train callbacks (a Tune trial passes the one that forwards its metrics).
    ``verdicts``: a ``ray.util.queue.Queue`` from which rank 0 takes one item after each report
    before training on; a sweep's callback answers each report there once Tune has judged it, so a
    trial ASHA pauses or stops trains no further than the evaluation it was judged on.
    """
    if not config.checkpoint.dir:
        raise ValueError("checkpoint.dir: a Ray Train run needs a run directory (storage_path/name)")
    check_devices(config)
    check_deepspeed(config)
    check_memory(config)
    check_workers_fit(config)
    dist_config = config.distributed
    resources = worker_resources(dist_config)
    storage_path, name = split_run_dir(config.checkpoint.dir)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", DEFAULT_POLL_INTERVAL_S)
    score = config.checkpoint.score_metric
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config_to_dict(config), "verdicts": verdicts},
        scaling_config=ScalingConfig(
            num_workers=dist_config.num_workers,
            use_gpu=dist_config.use_gpu,
            resources_per_worker=resources,
            placement_strategy=dist_config.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.checkpoint.keep_last,
                checkpoint_score_attribute=score,
                checkpoint_score_order=config.checkpoint.score_mode if score else "max",
            ),
            failure_config=FailureConfig(max_failures=dist_config.max_failures),
            callbacks=callbacks or [],
            # Ray's INFO logs repeat every report of every rank; our progress line says it once.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def paths_for_workers(config: TrainConfig) -> TrainConfig:
    """Make the config's relative paths absolute, unless the job ships a working directory.

    Under ``ray job submit --working-dir`` every worker, on every node, runs in its own copy of
    that directory, so relative paths already resolve the same everywhere; otherwise they are
    relative to the driver's cwd, which workers do not share.
    """
    if ray.get_runtime_context().runtime_env.get("working_dir"):
        return config

    def absolute(path: str | None) -> str | None:
        return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())

    data = config.data
    data.train_files = [absolute(p) for p in data.train_files]
    for source in data.mixture:
        source.files = [absolute(p) for p in source.files]
    data.tokenizer = absolute(data.tokenizer)
    config.eval.val_files = [absolute(p) for p in config.eval.val_files]
    config.checkpoint.dir = absolute(config.checkpoint.dir)
    config.checkpoint.init_from = absolute(config.checkpoint.init_from)
    config.objective.teacher = absolute(config.objective.teacher)
    return config


def run_dir_has_checkpoints(run_dir: str) -> bool:
    return any(name.startswith("step_") for name in storage.list_dir(run_dir))


def fit(config: TrainConfig):
    """Run ``config`` through Ray Train to the end; return Ray's ``Result``.

    With ``checkpoint.resume`` (the default) an existing run of the same name continues from its
    latest checkpoint; without it, an existing run is refused rather than mixed with a new one.
    """
    config = paths_for_workers(config)
    run_dir = config.checkpoint.dir
    if not config.checkpoint.resume and run_dir and run_dir_has_checkpoints(run_dir):
        raise ValueError(
            f"checkpoint.resume is false but {run_dir} already holds checkpoints; "
            "choose another --name (or remove the old run)"
        )
    trainer = build_trainer(config)
    print(f"[run] {config.stage}: checkpoints, metrics.jsonl and config.yaml in {run_dir}", flush=True)
    result = trainer.fit()
    if result.checkpoint is not None:
        # Ray gives the path within its filesystem; name it as the user named the run directory.
        latest = storage.join(run_dir, Path(result.checkpoint.path).name) if run_dir else result.checkpoint.path
        print(f"[done] latest checkpoint: {latest}", flush=True)
    return result
