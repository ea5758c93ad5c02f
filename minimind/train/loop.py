"""The one training loop, for every stage. Plain PyTorch: a Ray Train worker calls it unchanged.

A stage is an objective plus a data format (``build_objective``). The loop owns: AdamW with the lr schedule
(``schedule.py``) computed from the optimizer step, gradient accumulation normalised by the true
number of targets in the step (over all workers), clipping, autocast, checkpoints that resume
exactly, and metrics every ``logging.every_steps`` steps.

Construction is a sequence of plug-in steps: data source -> model -> optimizer -> parallelize (the
strategy: one process, DDP or a DeepSpeed ZeRO engine); where checkpoints go (a local run directory, or Ray Train's
storage) is a store handed in. The loop never branches on either.

Data position is a function of the optimizer step (``step -> (epoch, micro-batch range)``), so a
resumed run sees exactly the batches the uninterrupted run would have seen. Between log steps the
loop never waits for the device: losses and counts stay tensors until a log or checkpoint step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minimind.config import TrainConfig
from minimind.data.dataset import TrainingData, build_training_data, collate
from minimind.eval.evaluator import Evaluator
from minimind.model import MiniMindLM, mup
from minimind.model.checkpoint import load_model
from minimind.model.lora import apply_lora
from minimind.tokenizer import MiniMindTokenizer, load_tokenizer
from minimind.train.checkpointing import LocalRun, load_checkpoint
from minimind.train.compute import model_flops_per_token
from minimind.train.cooldown import cooldown_steps, cooled_evaluation
from minimind.train.metrics import mfu, peak_flops
from minimind.train.objectives import DPO, Distillation, LanguageModeling, Objective
from minimind.train.parallel import SingleProcess
from minimind.train.prefetch import StepBatches
from minimind.train.reporting import RunFiles, WandbLogger, progress_line
from minimind.train.runtime import autocast, resolve_device, resolve_dtype
from minimind.train.schedule import learning_rate, set_learning_rate


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the run stops at the step that did it."""


def build_objective(config: TrainConfig, tokenizer: MiniMindTokenizer, device: torch.device) -> Objective:
    objective = config.objective
    if config.stage in ("pretrain", "sft"):
        return LanguageModeling(document_mask=config.data.document_mask and config.data_format == "pretrain")
    if config.stage == "reasoning":
        by_tokens = objective.reasoning_normalizer == "tokens"
        return LanguageModeling(
            tokenizer.reasoning_spellings, objective.reasoning_token_weight, normalize_by_tokens=by_tokens
        )
    if config.stage == "dpo":
        reference = load_model(config.checkpoint.init_from, device, merge=True)
        return DPO(reference, objective.dpo_beta, objective.dpo_length_normalize)
    if config.stage == "distill":
        teacher = load_model(objective.teacher, device, merge=True)
        return Distillation(teacher, objective.distill_ce_weight, objective.distill_temperature)
    raise ValueError(f"unknown stage {config.stage!r}")


def build_model(config: TrainConfig, device: torch.device) -> MiniMindLM:
    """Fresh weights, or the ``init_from`` checkpoint's; then LoRA adapters when enabled."""
    if config.checkpoint.init_from:
        model = load_model(config.checkpoint.init_from, device, merge=True)
        config.model = model.config  # the checkpoint decides the architecture
    else:
        torch.manual_seed(config.optim.seed)
        model = MiniMindLM(config.model).to(device)
    if config.lora.enabled:
        apply_lora(model, config.lora)
    return model


ADAM_EPSILON = 1e-8
"""torch's default (and MiniMind's); CompleteP scales it with depth (``mup.epsilon_multiplier``)."""


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms); fused kernels on CUDA. Under μP each group
    also carries its ``lr_scale`` (``minimind/model/mup.py``), which the schedule multiplies in; every
    group has the same epsilon, which depth transfer scales (DeepSpeed keeps the groups as they are)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            key = (parameter.dim() >= 2, mup.lr_multiplier(name, config.model))
            groups.setdefault(key, []).append(parameter)
    param_groups = [
        {"params": params, "weight_decay": config.optim.weight_decay if decay else 0.0, "lr_scale": lr_scale}
        for (decay, lr_scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))
    ]
    return torch.optim.AdamW(
        param_groups,
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
        eps=ADAM_EPSILON * mup.epsilon_multiplier(config.model),
        fused=device.type == "cuda",
    )


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    rejects: str = ""
    final_eval: dict = field(default_factory=dict)
    """Validation metrics at the last step (empty without validation data)."""


# Per-step statistics summed over a log window (and over workers when logging) ...
SUMMED = ("loss_sum", "targets", "aux_loss", "real_tokens", "total_tokens")
# ... and those of which a window keeps the last step's value.
LATEST = ("lr", "grad_norm")


class Trainer:
    """Holds the pieces of one run; :meth:`fit` trains to the end (or to ``stop_at_step``).

    ``strategy`` shares the model between workers (default: one process); ``run`` stores
    checkpoints (default: ``checkpoint.dir`` when set); ``device`` defaults to ``runtime.device``.
    """

    def __init__(self, config: TrainConfig, strategy=None, run=None, device: torch.device | None = None):
        self.config = config
        self.strategy = strategy or SingleProcess()
        self.device = device or resolve_device(config.runtime)
        self.dtype = resolve_dtype(config.runtime, self.device)
        self.is_main = self.strategy.rank == 0
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        # 1. data source
        self.data: TrainingData = build_training_data(config, self.tokenizer)
        self.examples = self.data.examples
        world = self.strategy.world_size
        self.sampler = self.data.sampler(config.optim.batch_size, config.optim.seed, self.strategy.rank, world)
        if len(self.sampler) == 0:
            raise ValueError(
                f"{len(self.examples)} examples make no batch of {config.optim.batch_size} for {world} workers"
            )
        # The next step's batches are collated while this one trains (pinned for async copies to a GPU).
        self.step_batches = StepBatches(self.collate_step, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = math.ceil(len(self.sampler) / config.optim.grad_accum_steps)
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        if config.optim.max_steps is not None:
            self.total_steps = min(self.total_steps, config.optim.max_steps)
        # 2. model (identical on every worker), then per-worker randomness (dropout) from here on
        self.model = build_model(config, self.device)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size={config.model.vocab_size}"
            )
        torch.manual_seed(config.optim.seed + 1 + self.strategy.rank)
        self.objective = build_objective(config, self.tokenizer, self.device)
        # 3. optimizer, then 4. parallelize: outside the model, which stays the plain module. A
        # DeepSpeed engine wraps the optimizer too (ZeRO partitions its state).
        optimizer = build_optimizer(self.model, config, self.device)
        self.parallel_model, self.optimizer = self.strategy.parallelize(self.model, optimizer)
        self.forward_model = torch.compile(self.parallel_model) if config.runtime.compile else self.parallel_model
        loss_scaling = self.dtype == torch.float16 and not self.strategy.owns_precision
        self.scaler = torch.amp.GradScaler(self.device.type) if loss_scaling else None
        self.evaluator = None
        if config.eval.enabled and self.is_main:  # evaluated once, on rank 0, while the others wait
            reference = self.objective.reference if isinstance(self.objective, DPO) else None
            self.evaluator = Evaluator(
                config.eval, self.tokenizer, self.data.validation, self.device, reference, config.objective.dpo_beta
            )
        # From the config, not the live model: ZeRO-3 has partitioned its parameters (numel() 0) by now.
        self.flops_per_token = model_flops_per_token(config)
        self.peak_flops = peak_flops(self.device, config.logging.gpu_peak_tflops)
        self.run = run if run is not None else (LocalRun(config) if config.checkpoint.dir else None)
        self.files = RunFiles(config.checkpoint.dir) if config.checkpoint.dir and self.is_main else None
        self.step = 0
        # Real (non-padding) tokens trained, over all workers: Tune's time axis. Each worker counts its
        # own on the host; they are summed at log and checkpoint steps (rank 0 resumes with the total).
        self.local_tokens = 0.0
        self.tokens_trained = 0
        # Real tokens trained by cooldown branches (eval.cooldown_fraction), over all workers: compute
        # spent, not progress (``tokens`` stays the run's position).
        self.cooldown_tokens = 0
        self._first_bad_step = torch.full((), math.inf, device=self.device)

    # -- data position -------------------------------------------------------------------------

    def micro_batches(self, step: int) -> list[list[int]]:
        """The micro-batches (example indices) of optimizer step ``step``."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        accum = self.config.optim.grad_accum_steps
        first = in_epoch * accum
        batches = self.sampler.batches(epoch, start=first)
        return [indices for _, indices in zip(range(accum), batches)]

    def collate_step(self, step: int) -> list[dict]:
        """The micro-batches of optimizer step ``step``, collated on the host."""
        pad = self.tokenizer.pad_id
        return [collate([self.examples[i] for i in indices], pad) for indices in self.micro_batches(step)]

    # -- one optimizer step ---------------------------------------------------------------------

    def accumulate_gradients(self, step: int) -> dict:
        """Forward and backward over the step's micro-batches; gradients are left in ``.grad``.

        Each worker divides its summed loss by the step's target count over *all* workers and
        multiplies by the world size, so DDP's gradient average is the exact mean over every
        target of the step, however unevenly targets fall into micro-batches and workers.
        """
        cpu_batches = self.step_batches(step, prefetch_next=step + 1 < self.total_steps)
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in cpu_batches]
        counts = [self.objective.normalizer(batch).float() for batch in batches]
        local_targets = torch.stack(counts).sum()
        world = self.strategy.world_size
        total = self.strategy.all_reduce(local_targets).clamp(min=1e-8)
        self.model.train()
        stats = {name: torch.zeros((), device=self.device) for name in ("loss_sum", "aux_loss")}
        for index, (batch, count) in enumerate(zip(batches, counts)):
            last = index == len(batches) - 1
            with self.strategy.accumulating(self.parallel_model, last):
                with autocast(self.device, self.dtype):
                    parts = self.objective(self.forward_model, batch)
                # The aux loss is per micro-batch, weighted by the micro-batch's share of the targets.
                share = count / total
                loss = (parts.loss_sum / total + parts.aux_loss * share) * world
                self.strategy.backward(loss, self.scaler)
            stats["loss_sum"] += parts.loss_sum.detach().float()
            stats["aux_loss"] += parts.aux_loss.detach().float() * share
            for key, value in parts.metrics.items():
                stats[key] = stats.get(key, 0.0) + value.float() * share
        stats["targets"] = local_targets
        # Token counts come from the CPU batches: no device round trip.
        stats["real_tokens"] = torch.tensor(float(sum(int(b["real_tokens"]) for b in cpu_batches)))
        stats["total_tokens"] = torch.tensor(float(sum(int(b["total_tokens"]) for b in cpu_batches)))
        return stats

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step and zero the gradients; return the gradient norm (a tensor)."""
        return self.strategy.step(self.model, self.optimizer, self.config.optim.max_grad_norm, self.scaler)

    def train_step(self, step: int) -> dict:
        lr = learning_rate(step, self.total_steps, self.config.optim)
        set_learning_rate(self.optimizer, lr)
        stats = self.accumulate_gradients(step)
        self.local_tokens += float(stats["real_tokens"])  # a CPU tensor: no device sync
        grad_norm = self.optimizer_step()
        # fp16 loss scaling expects occasional inf gradients (it skips those steps): only the loss counts then.
        finite = torch.isfinite(stats["loss_sum"])
        if self.dtype != torch.float16:
            finite = finite & torch.isfinite(grad_norm)
        self._first_bad_step = torch.where(finite, self._first_bad_step, self._first_bad_step.clamp(max=step + 1))
        return {**stats, "lr": lr, "grad_norm": grad_norm.detach()}

    # -- the run --------------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train from the newest checkpoint (if resuming) to the end, or up to ``stop_at_step``."""
        config = self.config
        checkpoint_path = None
        if self.run is not None:
            with self.run.resume_directory() as directory:
                if directory is not None:
                    self.step = load_checkpoint(self, Path(directory))
                    checkpoint_path = Path(directory)  # what a finished run's re-run returns
                    if self.is_main:
                        print(f"[checkpoint] resumed from {directory} at step {self.step}", flush=True)
        if self.files:
            self.files.write_config(config)
        wandb = WandbLogger(config) if config.logging.wandb and self.is_main else None
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        history: list[dict] = []
        window: dict = {}
        window_steps, first_step = 0, self.step
        started = window_start = time.perf_counter()
        final_eval: dict = {}
        while self.step < end:
            stats = self.train_step(self.step)
            for key, value in stats.items():
                window[key] = value if key in LATEST else window.get(key, 0.0) + value
            window_steps += 1
            self.step += 1
            log_due = self.step % config.logging.every_steps == 0 or self.step == end
            save_due = self.run is not None and (
                self.step % config.checkpoint.every_steps == 0
                or self.step == end
                or self.step in config.checkpoint.at_steps
            )
            eval_due = (
                self.step == end
                or bool(config.eval.every_steps and self.step % config.eval.every_steps == 0)
                or self.step in config.eval.at_steps
            )
            evaluate = config.eval.enabled and eval_due
            if log_due or save_due or evaluate:
                self._check_finite()
                self._count_tokens()
            metrics = None
            if log_due:
                metrics = self._summarise(window, window_steps, time.perf_counter() - window_start)
                window, window_steps, window_start = {}, 0, time.perf_counter()
            if evaluate:
                evaluation_started = time.perf_counter()
                full_model = self.strategy.full_model(self.model)  # gathered under ZeRO-3: every rank calls
                final_eval = self.evaluator(full_model) if self.evaluator else {}
                if branch_steps := cooldown_steps(self, self.step):  # every rank trains the branch
                    final_eval = cooled_evaluation(self, branch_steps, final_eval)
                if self.evaluator:
                    row = metrics or {
                        "step": self.step,
                        "tokens": self.tokens_trained,
                        "budget_tokens": self.budget_tokens,
                    }
                    metrics = {**row, **final_eval, "cooldown_tokens": self.cooldown_tokens}
                window_start += time.perf_counter() - evaluation_started  # throughput counts training only
            if metrics is not None:
                history.append(metrics)
                if self.is_main:
                    elapsed = time.perf_counter() - started
                    eta = (end - self.step) * elapsed / max(1, self.step - first_step)
                    self._emit(metrics, eta, wandb)
            # Whether to publish is decided from the step alone, never from ``metrics``: evaluation
            # metrics exist on rank 0 only, and a report (Ray's) is a barrier every rank must join.
            if self.run is not None and (log_due or evaluate or save_due):
                saved = self.run.publish(self, metrics, save_due, evaluated=evaluate)
                checkpoint_path = saved or checkpoint_path
        self.step_batches.close()
        if wandb:
            wandb.close()
        return TrainResult(self.step, history, checkpoint_path, self.data.rejects.summary(), final_eval)

    def _check_finite(self) -> None:
        """Stop at the first step whose loss or gradient norm was NaN/inf (one sync, at log steps)."""
        bad = float(self.strategy.all_reduce(self._first_bad_step, "min"))
        if math.isfinite(bad):
            raise NonFiniteLoss(
                f"[{self.config.stage}] the loss or gradient norm became NaN/inf at step {int(bad)}; "
                "stopping before it reaches a checkpoint (the last saved checkpoint is intact). "
                "Lower optim.lr, raise optim.warmup_steps, or use bf16 instead of fp16."
            )

    def _count_tokens(self) -> None:
        local = torch.tensor(self.local_tokens, dtype=torch.float64, device=self.device)
        self.tokens_trained = int(self.strategy.all_reduce(local).item())

    @property
    def budget_tokens(self) -> int:
        """Tokens the steps so far hold, padding included: what a sweep's budget and rungs count (known
        from the step alone, unlike ``tokens``, the real tokens, which padding leaves short of it)."""
        optim, world = self.config.optim, self.strategy.world_size
        return self.step * optim.batch_size * optim.grad_accum_steps * world * self.config.data.seq_len

    def _summarise(self, window: dict, steps: int, seconds: float) -> dict:
        """Metrics of the window, summed over workers: the one host-device synchronisation per log."""
        names = sorted(key for key in window if key not in LATEST)
        local = torch.stack([torch.as_tensor(window[name], dtype=torch.float32).to(self.device) for name in names])
        totals = dict(zip(names, self.strategy.all_reduce(local).tolist()))
        world = self.strategy.world_size
        tokens_per_second = totals["real_tokens"] / seconds if seconds > 0 else 0.0
        metrics = {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "loss": totals["loss_sum"] / max(totals["targets"], 1e-8),
            "lr": window["lr"],
            "grad_norm": float(window["grad_norm"]),
            "tokens": self.tokens_trained,
            "budget_tokens": self.budget_tokens,
            "tokens_per_second": tokens_per_second,
            "padding_fraction": 1.0 - totals["real_tokens"] / totals["total_tokens"] if totals["total_tokens"] else 0.0,
        }
        if self.config.model.moe.enabled:
            metrics["aux_loss"] = totals["aux_loss"] / steps
        for name in names:
            if name not in SUMMED:  # objective diagnostics: per-step weighted means, summed over workers
                metrics[name] = totals[name] / steps
        # MFU is per device: each device's share of the throughput against one device's peak.
        utilisation = mfu(tokens_per_second / world, self.flops_per_token, self.peak_flops)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        return metrics

    def _emit(self, metrics: dict, eta_seconds: float, wandb) -> None:
        print(progress_line(self.config.stage, metrics, self.total_steps, eta_seconds), flush=True)
        if self.files:
            self.files.append_metrics(metrics)
        if wandb:
            wandb.log(metrics)


def train(config: TrainConfig) -> TrainResult:
    """Run one stage end to end in this process."""
    if config.distributed.strategy != "ddp" or config.distributed.num_workers > 1:
        raise ValueError(
            f"distributed.strategy={config.distributed.strategy}, num_workers={config.distributed.num_workers}: "
            "this runs one process; run the stage's Ray Train job (ray_jobs/<stage>.py) for workers and DeepSpeed"
        )
    trainer = Trainer(config)
    if trainer.data.rejects.total:
        print(f"[data] {trainer.data.rejects.summary()}", flush=True)
    if config.checkpoint.dir:
        print(f"[run] checkpoints, metrics.jsonl and config.yaml in {config.checkpoint.dir}", flush=True)
    return trainer.fit()
