"""The one training loop, for every stage. Plain PyTorch: a Ray Train worker calls it unchanged.

A stage is an objective plus a data format (``build_objective``). The loop owns: AdamW with warmup
and cosine decay computed from the optimizer step, gradient accumulation normalised by the true
number of targets in the step, clipping, autocast, checkpoints that resume exactly, and metrics
every ``logging.every_steps`` steps.

Data position is a function of the optimizer step (``step -> (epoch, micro-batch range)``), so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minimind.config import TrainConfig, dump_yaml
from minimind.data.dataset import build_training_data, collate
from minimind.eval.evaluator import Evaluator
from minimind.model import MiniMindLM, flops_per_token
from minimind.model.checkpoint import load_model
from minimind.model.lora import apply_lora
from minimind.tokenizer import MiniMindTokenizer, load_tokenizer
from minimind.train.checkpointing import CheckpointManager
from minimind.train.metrics import mfu, peak_flops
from minimind.train.objectives import DPO, Distillation, LanguageModeling, Objective
from minimind.train.runtime import autocast, resolve_device, resolve_dtype

Reporter = Callable[[dict], None]


def learning_rate(step: int, total_steps: int, config) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def build_objective(config: TrainConfig, tokenizer: MiniMindTokenizer, device: torch.device) -> Objective:
    objective = config.objective
    if config.stage in ("pretrain", "sft"):
        return LanguageModeling(document_mask=config.data.document_mask and config.data_format == "pretrain")
    if config.stage == "reasoning":
        return LanguageModeling(tokenizer.reasoning_ids, objective.reasoning_token_weight)
    if config.stage == "dpo":
        reference = load_model(config.checkpoint.init_from, device, merge=True)
        return DPO(reference, objective.dpo_beta, objective.dpo_length_normalize)
    if config.stage == "distill":
        teacher = load_model(objective.teacher, device, merge=True)
        return Distillation(teacher, objective.distill_alpha, objective.distill_temperature)
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


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms); fused kernels on CUDA."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2), fused=device.type == "cuda"
    )


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    rejects: str = ""
    final_eval: dict = field(default_factory=dict)
    """Validation metrics at the last step (empty without validation data)."""


class Trainer:
    """Holds the pieces of one run; :meth:`fit` trains to the end (or to ``stop_at_step``)."""

    def __init__(
        self,
        config: TrainConfig,
        rank: int = 0,
        world_size: int = 1,
        report: Reporter | None = None,
    ):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.report = report
        self.device = resolve_device(config.runtime)
        self.dtype = resolve_dtype(config.runtime, self.device)
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        self.model = build_model(config, self.device)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size={config.model.vocab_size}"
            )
        self.data = build_training_data(config, self.tokenizer)
        self.examples = self.data.examples
        self.sampler = self.data.sampler(config.optim.batch_size, config.optim.seed, rank, world_size)
        if len(self.sampler) == 0:
            raise ValueError(f"{len(self.examples)} examples make no batch for {world_size} workers")
        self.steps_per_epoch = math.ceil(len(self.sampler) / config.optim.grad_accum_steps)
        self.total_steps = config.optim.epochs * self.steps_per_epoch
        if config.optim.max_steps is not None:
            self.total_steps = min(self.total_steps, config.optim.max_steps)
        self.objective = build_objective(config, self.tokenizer, self.device)
        self.evaluator = None
        if config.eval.enabled:
            reference = self.objective.reference if isinstance(self.objective, DPO) else None
            self.evaluator = Evaluator(
                config.eval, self.tokenizer, self.data.validation, self.device, reference, config.objective.dpo_beta
            )
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.forward_model = torch.compile(self.model) if config.runtime.compile else self.model
        self.flops_per_token = flops_per_token(
            config.model, self.model.num_parameters(active_only=True), config.data.seq_len
        )
        self.peak_flops = peak_flops(self.device, config.logging.gpu_peak_tflops)
        self.checkpoints = CheckpointManager(config, rank) if config.checkpoint.dir else None
        self.step = 0

    # -- data position -------------------------------------------------------------------------

    def micro_batches(self, step: int) -> list[list[int]]:
        """The micro-batches (example indices) of optimizer step ``step``."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        accum = self.config.optim.grad_accum_steps
        first = in_epoch * accum
        batches = self.sampler.batches(epoch, start=first)
        return [indices for _, indices in zip(range(accum), batches)]

    # -- one optimizer step ---------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        config = self.config
        batches = [
            collate([self.examples[i] for i in indices], self.tokenizer.pad_id) for indices in self.micro_batches(step)
        ]
        batches = [{k: v.to(self.device, non_blocking=True) for k, v in batch.items()} for batch in batches]
        counts = [self.objective.normalizer(batch) for batch in batches]
        total = sum(counts)
        lr = learning_rate(step, self.total_steps, config.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum, aux_sum, extra = 0.0, 0.0, {}
        for batch, count in zip(batches, counts):
            with autocast(self.device, self.dtype):
                parts = self.objective(self.forward_model, batch)
            # Sum of target losses / targets in the whole step = exact mean over the step; the aux
            # loss is per micro-batch, weighted by the micro-batch's share of the targets.
            share = count / total if total else 0.0
            loss = parts.loss_sum / max(total, 1e-8) + parts.aux_loss * share
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += float(parts.loss_sum.detach())
            aux_sum += float(parts.aux_loss.detach()) * share
            for key, value in parts.metrics.items():
                extra[key] = extra.get(key, 0.0) + value * share
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = config.optim.max_grad_norm if config.optim.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        real = sum(int(batch["real_tokens"]) for batch in batches)
        padded = sum(int(batch["total_tokens"]) for batch in batches)
        return {
            "loss_sum": loss_sum,
            "targets": total,
            "aux_loss": aux_sum,
            "lr": lr,
            "grad_norm": grad_norm,
            "real_tokens": real,
            "total_tokens": padded,
            **extra,
        }

    # -- the run --------------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train from the newest checkpoint (if resuming) to the end, or up to ``stop_at_step``."""
        config = self.config
        if self.checkpoints:
            self.step = self.checkpoints.restore(self)
            if self.rank == 0:
                dump_yaml(config, Path(config.checkpoint.dir) / "config.yaml")
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        history: list[dict] = []
        window: list[dict] = []
        window_start = time.perf_counter()
        checkpoint_path = None
        final_eval: dict = {}
        while self.step < end:
            window.append(self.train_step(self.step))
            self.step += 1
            log_due = self.step % config.logging.every_steps == 0 or self.step == end
            metrics = None
            if log_due:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                metrics = self._summarise(window, time.perf_counter() - window_start)
            if self.evaluator and (
                self.step == end or (config.eval.every_steps and self.step % config.eval.every_steps == 0)
            ):
                final_eval = self.evaluator(self.model)
                metrics = {**(metrics or {"step": self.step}), **final_eval}
            if metrics is not None:
                history.append(metrics)
                self._emit(metrics)
            if log_due:
                window, window_start = [], time.perf_counter()
            if self.checkpoints and (self.step % config.checkpoint.every_steps == 0 or self.step == end):
                checkpoint_path = self.checkpoints.save(self)
        if self.checkpoints and checkpoint_path is None:
            checkpoint_path = self.checkpoints.latest_path()
        return TrainResult(self.step, history, checkpoint_path, self.data.rejects.summary(), final_eval)

    def _summarise(self, window: list[dict], seconds: float) -> dict:
        targets = sum(item["targets"] for item in window)
        real = sum(item["real_tokens"] for item in window)
        padded = sum(item["total_tokens"] for item in window)
        tokens_per_second = real * self.world_size / seconds if seconds > 0 else 0.0
        metrics = {
            "step": self.step,
            "epoch": (self.step - 1) // self.steps_per_epoch,
            "loss": sum(item["loss_sum"] for item in window) / max(targets, 1e-8),
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "tokens_per_second": tokens_per_second,
            "padding_fraction": 1.0 - real / padded if padded else 0.0,
        }
        if self.config.model.moe.enabled:
            metrics["aux_loss"] = sum(item["aux_loss"] for item in window) / len(window)
        for key in window[-1]:
            if key not in ("loss_sum", "targets", "aux_loss", "lr", "grad_norm", "real_tokens", "total_tokens"):
                metrics[key] = sum(item[key] for item in window) / len(window)
        utilisation = mfu(tokens_per_second, self.flops_per_token, self.peak_flops)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        return metrics

    def _emit(self, metrics: dict) -> None:
        if self.report:
            self.report(metrics)
        if self.rank != 0:
            return
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(f"[{self.config.stage}] {text}", flush=True)
        if self.config.checkpoint.dir:
            with open(Path(self.config.checkpoint.dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(metrics) + "\n")


def train(config: TrainConfig, report: Reporter | None = None) -> TrainResult:
    """Run one stage end to end in this process."""
    trainer = Trainer(config, report=report)
    if trainer.data.rejects.total:
        print(f"[data] {trainer.data.rejects.summary()}", flush=True)
    return trainer.fit()
