"""Typed run configuration: one tree of dataclasses that YAML, the command line and Tune address.

Every field has a dotted path (``optim.lr``, ``model.moe.top_k``) that is the same in a YAML
recipe, on the command line (``--optim.lr 3e-4``) and in a Tune ``param_space``. Construction
goes through :func:`minimind.config.build_config`, which expands model presets, applies overrides
and validates, so an invalid run fails before any weights are allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

STAGES = ("pretrain", "sft", "dpo", "reasoning", "distill")
STRATEGIES = ("ddp", "deepspeed")
ZERO_STAGES = (0, 1, 2, 3)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
OFFLOAD_MIN_CPUS = 4  # CPUs per GPU worker that steps ZeRO-offloaded optimizer state (DeepSpeed's CPU Adam)
DATA_FORMATS = ("pretrain", "sft", "dpo", "r1")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "sqrt", "cosine")
PARAMETRIZATIONS = ("standard", "mup")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted field."""


def _require(condition: bool, path: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {message}")


def swiglu_hidden_size(hidden_size: int) -> int:
    """MiniMind's SwiGLU width: 8h/3 rounded up to a multiple of 64."""
    return 64 * math.ceil((8 * hidden_size // 3) / 64)


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward (MiniMind's MoE variant); off unless ``enabled``."""

    enabled: bool = False
    num_routed_experts: int = 4
    """Experts the router chooses among (MiniMind's ``num_experts``; ``n_routed_experts`` in MiniMind2)."""
    num_shared_experts: int = 1
    """Experts every token always goes through."""
    top_k: int = 2
    """Routed experts chosen per token (MiniMind's ``num_experts_per_tok``)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to one."""
    aux_loss_alpha: float = 0.1
    """Weight of the load-balancing loss (MiniMind's ``aux_loss_alpha``, ``router_aux_loss_coef`` in minimind-3)."""
    balance_over: str = "sequence"
    """Where the load-balancing loss counts each expert's share of the routed tokens: ``sequence``
    (per sequence, then averaged: MiniMind2's ``seq_aux``) or ``batch`` (over all tokens: minimind-3)."""

    def validate(self, path: str) -> None:
        if not self.enabled:
            return
        _require(self.num_routed_experts >= 1, f"{path}.num_routed_experts", "must be >= 1")
        _require(self.num_shared_experts >= 0, f"{path}.num_shared_experts", "must be >= 0")
        _require(
            1 <= self.top_k <= self.num_routed_experts,
            f"{path}.top_k",
            f"must be in [1, num_routed_experts={self.num_routed_experts}], got {self.top_k}",
        )
        _require(self.aux_loss_alpha >= 0, f"{path}.aux_loss_alpha", "must be >= 0")
        _require(
            self.balance_over in ("sequence", "batch"),
            f"{path}.balance_over",
            f"must be 'sequence' or 'batch', got {self.balance_over!r}",
        )


@dataclass
class ModelConfig:
    """Llama-style decoder with MiniMind's structure. ``preset`` names the size it started from."""

    preset: str = "minimind-26m"
    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int | None = None
    """SwiGLU width; ``None`` means MiniMind's ``64*ceil(floor(8h/3)/64)``."""
    max_seq_len: int = 32768
    """Length of the precomputed RoPE table (the longest sequence the model can see)."""
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before RoPE (minimind-3, as Qwen3)."""
    dropout: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)
    parametrization: str = "standard"
    """``standard`` (MiniMind's) or ``mup``: μP, under which the lr, init and schedule tuned at
    ``mup_base_width`` hold at other widths (``minimind/model/mup.py`` lists its changes)."""
    mup_base_width: int | None = None
    """``mup``: the hidden size hyperparameters are tuned at (μP equals standard there); None: this
    model's own ``hidden_size``. It needs as many heads as this model: a multiple of ``num_heads``."""
    depth_transfer: bool | str = False
    """``false`` or ``completep``: CompleteP (Dey et al. 2025), under which the hyperparameters tuned at
    ``depth_base_layers`` hold at other depths (each residual branch scaled by base depth / ``num_layers``;
    ``minimind/model/mup.py`` lists its changes). It extends μP: it needs ``parametrization: mup``."""
    depth_base_layers: int | None = None
    """``completep``: the depth hyperparameters are tuned at (CompleteP equals μP there); None: this
    model's own ``num_layers``."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or swiglu_hidden_size(self.hidden_size)

    def validate(self, path: str = "model") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            _require(getattr(self, name) > 0, f"{path}.{name}", f"must be positive, got {getattr(self, name)}")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"{path}.hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"{path}.num_kv_heads",
            f"{self.num_kv_heads} does not divide num_heads={self.num_heads}",
        )
        _require(self.head_dim % 2 == 0, f"{path}.hidden_size", "head_dim must be even for RoPE")
        _require(
            self.intermediate_size is None or self.intermediate_size > 0,
            f"{path}.intermediate_size",
            "must be positive",
        )
        _require(0.0 <= self.dropout < 1.0, f"{path}.dropout", "must be in [0, 1)")
        _require(
            self.parametrization in PARAMETRIZATIONS,
            f"{path}.parametrization",
            f"must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}",
        )
        if self.mup_base_width is not None:
            _require(
                self.parametrization == "mup",
                f"{path}.mup_base_width",
                f"a base width applies to parametrization: mup (this model is {self.parametrization})",
            )
            _require(
                self.mup_base_width > 0 and self.mup_base_width % self.num_heads == 0,
                f"{path}.mup_base_width",
                f"{self.mup_base_width} cannot be the width of a base model with num_heads={self.num_heads}: it must "
                f"be a positive multiple of {self.num_heads}",
            )
        _require(
            self.depth_transfer is False or self.depth_transfer == "completep",
            f"{path}.depth_transfer",
            f"must be false or 'completep', got {self.depth_transfer!r}",
        )
        if self.depth_transfer:
            # CompleteP's rules are factors on μP's (arXiv 2505.01618, Table 1: the depth factors sit
            # beside μP's width factors); the paper defines and tests them there, so this does too.
            _require(
                self.parametrization == "mup",
                f"{path}.depth_transfer",
                f"completep extends μP, and this model (preset {self.preset}) has parametrization: "
                f"{self.parametrization}; set {path}.parametrization: mup (its base width defaults to this width)",
            )
        if self.depth_base_layers is not None:
            _require(
                self.depth_transfer == "completep",
                f"{path}.depth_base_layers",
                f"a base depth applies to depth_transfer: completep (this model has depth_transfer: "
                f"{str(self.depth_transfer).lower()})",
            )
            _require(
                self.depth_base_layers > 0,
                f"{path}.depth_base_layers",
                f"must be positive, got {self.depth_base_layers}",
            )
        self.moe.validate(f"{path}.moe")


@dataclass
class LoraConfig:
    """Low-rank adapters; when enabled only the adapters train and are saved apart."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self, path: str = "lora") -> None:
        if not self.enabled:
            return
        _require(self.rank > 0, f"{path}.rank", "must be positive")
        _require(self.alpha > 0, f"{path}.alpha", "must be positive")
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        _require(not unknown, f"{path}.target_modules", f"unknown modules {unknown}; choose from {list(LORA_TARGETS)}")
        _require(bool(self.target_modules), f"{path}.target_modules", "must name at least one module")


@dataclass
class MixtureSource:
    """One dataset of a training mixture: a prepared corpus directory or jsonl files."""

    files: list[str] = field(default_factory=list)
    weight: float = 1.0
    """Share of each epoch's examples drawn from this source (weights are normalised)."""
    format: str | None = None
    """Format of jsonl files (pretrain|sft|dpo|r1); a prepared corpus states its own."""

    def validate(self, path: str) -> None:
        _require(bool(self.files), f"{path}.files", "must name a prepared directory or jsonl files")
        _require(self.weight > 0, f"{path}.weight", f"must be positive, got {self.weight}")
        _require(self.format is None or self.format in DATA_FORMATS, f"{path}.format", f"must be one of {DATA_FORMATS}")


@dataclass
class DataConfig:
    """Where training examples come from and how they are shaped."""

    train_files: list[str] = field(default_factory=list)
    """MiniMind jsonl files (pretrain ``{"text"}``, SFT ``{"conversations"}``, DPO, r1), or one prepared directory."""
    mixture: list[MixtureSource] = field(default_factory=list)
    """Several sources drawn by weight each epoch (e.g. new pretrain shards plus SFT); replaces ``train_files``."""
    format: str | None = None
    """One of pretrain|sft|dpo|r1; ``None`` derives it from the stage."""
    tokenizer: str | None = None
    """Directory or tokenizer.json; ``None`` is the tokenizer bundled with the package."""
    seq_len: int = 512
    strict: bool = False
    """Stop at the first malformed record instead of counting and skipping it."""
    packing: bool = True
    """Pretrain only: pack documents into full blocks (False pads one document per row, as MiniMind does)."""
    document_mask: bool = False
    """Pretrain only: keep attention inside each packed document."""
    group_by_length: bool = True
    """Batch conversations of similar length together (less padding; order stays seeded)."""

    def validate(self, path: str = "data") -> None:
        _require(self.seq_len > 1, f"{path}.seq_len", f"must be > 1, got {self.seq_len}")
        _require(
            not (self.mixture and self.train_files),
            f"{path}.mixture",
            "give either data.train_files or data.mixture, not both",
        )
        for index, source in enumerate(self.mixture):
            source.validate(f"{path}.mixture[{index}]")
        _require(self.format is None or self.format in DATA_FORMATS, f"{path}.format", f"must be one of {DATA_FORMATS}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine decay or warmup-stable-decay, computed per optimizer step
    (``minimind.train.schedule``)."""

    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    """The schedule's floor (its last step's lr) as a fraction of ``lr``."""
    warmup_steps: int = 0
    schedule: str = "cosine"
    """``cosine`` (MiniMind's: decay from the end of the warmup to the last step) or ``wsd``
    (warmup-stable-decay: ``lr`` held until the last ``decay_fraction`` of the steps, then decayed).
    WSD's lr does not depend on the run's length until its decay begins: such a run can be extended
    (resumed with more steps), and evaluated as if it ended early (``eval.cooldown_fraction``)."""
    decay_fraction: float = 0.2
    """``wsd``: the share of the steps, at the end, over which the lr decays."""
    decay_shape: str = "sqrt"
    """``wsd``: ``sqrt`` (1 - sqrt(progress), Hägele et al. 2024's best), ``linear`` or ``cosine``."""
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 32
    """Sequences per micro-batch per worker."""
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    """Clip threshold; 0 disables clipping."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when smaller)."""
    seed: int = 42

    def validate(self, path: str = "optim") -> None:
        _require(self.lr > 0, f"{path}.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", "must be >= 0")
        _require(self.schedule in SCHEDULES, f"{path}.schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(
            0 < self.decay_fraction <= 1, f"{path}.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}"
        )
        _require(
            self.decay_shape in DECAY_SHAPES,
            f"{path}.decay_shape",
            f"must be one of {DECAY_SHAPES}, got {self.decay_shape!r}",
        )
        _require(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0")
        _require(self.batch_size > 0, f"{path}.batch_size", f"must be positive, got {self.batch_size}")
        _require(self.grad_accum_steps > 0, f"{path}.grad_accum_steps", "must be positive")
        _require(self.max_grad_norm >= 0, f"{path}.max_grad_norm", "must be >= 0")
        _require(self.epochs > 0, f"{path}.epochs", "must be positive")
        _require(self.max_steps is None or self.max_steps > 0, f"{path}.max_steps", "must be positive")


REASONING_NORMALIZERS = ("weighted", "tokens")


@dataclass
class ObjectiveConfig:
    """Stage-specific loss settings; only the ones of the run's stage are read."""

    RENAMED: ClassVar[dict[str, str]] = {
        "distill_alpha": "renamed to distill_ce_weight, which weights cross-entropy as MiniMind's --alpha "
        "does (distill_alpha weighted the KL term: distill_ce_weight = 1 - distill_alpha)",
    }

    dpo_beta: float = 0.1
    dpo_length_normalize: bool = False
    """Average instead of sum the response log-probs in DPO."""
    reasoning_token_weight: float = 10.0
    """Extra loss weight on <think>/</think>/<answer>/</answer> inside the assistant reply."""
    reasoning_normalizer: str = "weighted"
    """What the reasoning loss's weighted sum is divided by. ``weighted``: the sum of the weights, so
    the loss is a weighted mean on the scale of SFT's whatever a batch's share of tags (our choice:
    learning rates carry over from SFT). ``tokens``: the number of labelled tokens, as MiniMind's r1
    script does, which scales a batch's loss (and its effective learning rate) up with its tags."""
    distill_ce_weight: float = 0.5
    """Weight of cross-entropy on the labels; ``1 - distill_ce_weight`` goes to the KL-to-teacher term.
    This is MiniMind's ``--alpha`` (``alpha * CE + (1 - alpha) * KL``): port it as is."""
    distill_temperature: float = 2.0
    teacher: str | None = None
    """Checkpoint directory of the distillation teacher."""

    def validate(self, path: str = "objective") -> None:
        _require(self.dpo_beta > 0, f"{path}.dpo_beta", "must be positive")
        _require(self.reasoning_token_weight > 0, f"{path}.reasoning_token_weight", "must be positive")
        _require(
            self.reasoning_normalizer in REASONING_NORMALIZERS,
            f"{path}.reasoning_normalizer",
            f"must be one of {REASONING_NORMALIZERS}, got {self.reasoning_normalizer!r}",
        )
        _require(0 <= self.distill_ce_weight <= 1, f"{path}.distill_ce_weight", "must be in [0, 1]")
        _require(self.distill_temperature > 0, f"{path}.distill_temperature", "must be positive")


@dataclass
class RuntimeConfig:
    """Device and numerics."""

    device: str = "auto"
    """auto|cpu|cuda|cuda:N; auto picks CUDA when present."""
    dtype: str = "auto"
    """auto|fp32|bf16|fp16; auto is bf16 on GPUs of compute capability >= 8.0, fp16 on older GPUs, fp32 on CPU.
    fp16 uses a GradScaler."""
    compile: bool = False
    """Wrap the model in torch.compile."""

    def validate(self, path: str = "runtime") -> None:
        _require(self.dtype in DTYPES, f"{path}.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class CheckpointConfig:
    """Where and how often training state is saved, and what a run starts from."""

    dir: str | None = None
    """Run directory for checkpoints, ``metrics.jsonl`` and ``config.yaml``; ``None`` saves nothing.
    Under Ray Train it is ``storage_path/name`` (local, NFS, ``s3://`` or ``gs://``)."""
    every_steps: int = 500
    at_steps: list[int] = field(default_factory=list)
    """Further steps to save at (a sweep's rungs: a trial paused there resumes from that step)."""
    keep_last: int = 2
    """Checkpoints kept (the newest is always kept; with ``score_metric``, the best others)."""
    score_metric: str | None = None
    """Ray Train keeps the ``keep_last`` best checkpoints by this reported metric (e.g. ``val_loss``)."""
    score_mode: str = "min"
    resume: bool = True
    """Continue from the newest checkpoint in ``dir`` when there is one."""
    init_from: str | None = None
    """Weights that start this run: a checkpoint, a run directory (its newest checkpoint), or a run name
    under the storage path (e.g. the pretrain result for SFT)."""

    def validate(self, path: str = "checkpoint") -> None:
        _require(self.every_steps > 0, f"{path}.every_steps", "must be positive")
        _require(all(step > 0 for step in self.at_steps), f"{path}.at_steps", "steps must be positive")
        _require(self.keep_last > 0, f"{path}.keep_last", "must be positive")
        _require(self.score_mode in ("min", "max"), f"{path}.score_mode", "must be min or max")


@dataclass
class LoggingConfig:
    """Metric reporting."""

    every_steps: int = 10
    """Metrics are computed, printed and written to ``metrics.jsonl`` every this many optimizer steps (the
    only point where the loop waits for the device)."""
    ray_report_every_s: float = 60.0
    """Under Ray Train, a log step's metrics also go to Ray (``ray.train.report``: a barrier across workers
    that waits for the Train controller's next poll) at most this often; checkpoint and evaluation steps
    are always reported. 0 reports every log step."""
    gpu_peak_tflops: float | None = None
    """Peak bf16 TFLOP/s for MFU when the GPU is not in the built-in table."""
    wandb: bool = False
    """Log metrics to Weights & Biases from rank 0 (offline mode when no WANDB_API_KEY is set)."""
    wandb_project: str = "minimind"

    def validate(self, path: str = "logging") -> None:
        _require(self.every_steps > 0, f"{path}.every_steps", "must be positive")
        _require(self.ray_report_every_s >= 0, f"{path}.ray_report_every_s", "must be >= 0")


@dataclass
class DistributedConfig:
    """Ray Train workers that run the loop, what each holds, and how they share the model."""

    strategy: str = "ddp"
    """How workers share the model: ddp (PyTorch DDP; one worker runs plainly) or deepspeed (ZeRO)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded), 2 (+ gradients),
    3 (+ parameters). Used with ``strategy: deepspeed``."""
    offload_optimizer: bool = False
    """ZeRO-2/3: keep the optimizer state (fp32 master weights, Adam moments) in host memory."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON template; ``None`` uses the repository's ``zero_configs/zero{stage}.json``. Batch,
    accumulation, clipping, precision and the ZeRO stage are always filled from this run config."""
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """GPUs per worker when ``use_gpu``. A fraction lets several single-worker trials of a sweep share a
    GPU; several DDP ranks (or a DeepSpeed engine, which picks its device by local rank) need one whole
    GPU each: NCCL refuses two ranks on one GPU ("Duplicate GPU detected")."""
    placement_strategy: str = "PACK"
    """Ray placement of the workers: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one per node)."""
    max_failures: int = 0
    """Times the worker group is restarted from the last checkpoint after a worker dies (-1: always)."""

    def validate(self, path: str = "distributed") -> None:
        _require(self.strategy in STRATEGIES, f"{path}.strategy", f"must be one of {STRATEGIES}, got {self.strategy!r}")
        _require(self.num_workers >= 1, f"{path}.num_workers", f"must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", "must be positive")
        _require(self.gpus_per_worker > 0, f"{path}.gpus_per_worker", "must be positive")
        _require(
            self.placement_strategy in PLACEMENT_STRATEGIES,
            f"{path}.placement_strategy",
            f"must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}",
        )
        _require(self.max_failures >= -1, f"{path}.max_failures", "must be >= -1")
        _require(
            self.zero_stage in ZERO_STAGES, f"{path}.zero_stage", f"must be one of {ZERO_STAGES}, got {self.zero_stage}"
        )
        deepspeed = self.strategy == "deepspeed"
        _require(
            not self.use_gpu or (self.num_workers == 1 and not deepspeed) or self.gpus_per_worker == 1,
            f"{path}.gpus_per_worker",
            f"{self.gpus_per_worker:g} GPU per worker: with {self.num_workers} workers under {self.strategy} every "
            "worker needs one whole GPU of its own (NCCL refuses two ranks on one GPU, a rank computes on one GPU, "
            "and DeepSpeed picks it by LOCAL_RANK); fractions suit one-worker trials",
        )
        _require(
            not self.offload_optimizer or (deepspeed and self.zero_stage >= 2),
            f"{path}.offload_optimizer",
            f"needs strategy deepspeed with zero_stage 2 or 3 (got {self.strategy}, stage {self.zero_stage})",
        )
        # GPU workers step offloaded state with DeepSpeed's CPU Adam, one OpenMP thread per reserved CPU.
        _require(
            not (self.offload_optimizer and self.use_gpu) or self.cpus_per_worker >= OFFLOAD_MIN_CPUS,
            f"{path}.cpus_per_worker",
            f"{self.cpus_per_worker:g} with offload_optimizer on GPU workers: DeepSpeed's CPU Adam steps each "
            f"worker's optimizer state on the host with one thread per reserved CPU; reserve >= {OFFLOAD_MIN_CPUS}",
        )
        _require(
            self.deepspeed_config is None or deepspeed,
            f"{path}.deepspeed_config",
            "is read only with strategy deepspeed",
        )


@dataclass
class EvalConfig:
    """Held-out evaluation, run every ``every_steps`` and at the end of training.

    It runs when there is validation data: ``val_files``, or ``val_fraction`` of the training
    records held out by a hash of each record (so the split survives the corpus growing).
    """

    val_files: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    every_steps: int = 0
    """0 evaluates only at the end of the run."""
    max_examples: int = 64
    """Size of the fixed validation subset scored for perplexity (and preference accuracy)."""
    batch_size: int = 8
    continuation_docs: int = 16
    prefix_tokens: int = 32
    continuation_tokens: int = 16
    cooldown_fraction: float = 0.0
    """Cooldown evaluations (``optim.schedule: wsd``; 0: off). At an evaluation in the stable phase,
    a branch of the model and optimizer trains on the next training batches for this fraction of
    the steps done so far, its lr decaying as the schedule's decay would, and is evaluated; then it
    is discarded and the run goes on bit for bit as without it. The row's ``val_*`` metrics are the
    branch's, the stable model's stand beside them as ``val_*_stable``. With
    ``decay_fraction / (1 - decay_fraction)`` (0.25 for the default 0.2) a branch at step t is
    exactly the decay of a run of about t * (1 + fraction) steps, so its value is that shorter
    run's. The branch's steps cost time and count in ``cooldown_tokens``."""
    cooldown_durations: list[int] = field(default_factory=list)
    """Shorter run lengths (in steps) to score exactly (a duration sweep sets them): at stable step
    ``D - d`` a branch of the ``d`` steps that a ``D``-step run decays over is that run's end, on the
    same batches. Rounding can leave a duration that no ``cooldown_fraction`` branch ends at."""
    at_steps: list[int] = field(default_factory=list)
    """Further steps to evaluate at, besides every ``every_steps`` (a sweep's durations use these)."""

    @property
    def enabled(self) -> bool:
        return bool(self.val_files) or self.val_fraction > 0

    @property
    def cools_down(self) -> bool:
        """Whether some evaluations are of cooldown branches."""
        return bool(self.cooldown_fraction or self.cooldown_durations)

    def validate(self, path: str = "eval") -> None:
        _require(0 <= self.val_fraction < 1, f"{path}.val_fraction", "must be in [0, 1)")
        _require(self.every_steps >= 0, f"{path}.every_steps", "must be >= 0")
        for name in ("max_examples", "batch_size", "prefix_tokens", "continuation_tokens"):
            _require(getattr(self, name) > 0, f"{path}.{name}", "must be positive")
        _require(self.continuation_docs >= 0, f"{path}.continuation_docs", "must be >= 0")
        _require(self.cooldown_fraction >= 0, f"{path}.cooldown_fraction", "must be >= 0")
        _require(all(step > 0 for step in self.at_steps), f"{path}.at_steps", "steps must be positive")
        _require(all(s > 0 for s in self.cooldown_durations), f"{path}.cooldown_durations", "steps must be positive")


@dataclass
class TrainConfig:
    """One training run: a stage (objective + data format) over a model."""

    stage: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def data_format(self) -> str:
        if self.data.format is not None:
            return self.data.format
        return {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "reasoning": "r1", "distill": "sft"}[self.stage]

    def validate(self) -> TrainConfig:
        _require(self.stage in STAGES, "stage", f"must be one of {STAGES}, got {self.stage!r}")
        for name in (
            "model",
            "lora",
            "data",
            "optim",
            "objective",
            "runtime",
            "checkpoint",
            "logging",
            "eval",
            "distributed",
        ):
            getattr(self, name).validate(name)
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        fmt = self.data_format
        allowed = {
            "pretrain": ("pretrain",),
            "sft": ("sft", "r1"),
            "reasoning": ("r1", "sft"),
            "dpo": ("dpo",),
            "distill": ("pretrain", "sft", "r1"),
        }[self.stage]
        _require(fmt in allowed, "data.format", f"stage {self.stage!r} reads {allowed}, got {fmt!r}")
        _require(
            self.stage != "distill" or self.objective.teacher is not None,
            "objective.teacher",
            "the distill stage needs a teacher checkpoint directory",
        )
        if self.eval.cools_down:
            _require(
                self.optim.schedule == "wsd",
                "eval.cooldown_fraction" if self.eval.cooldown_fraction else "eval.cooldown_durations",
                f"cooldown evaluations branch a warmup-stable-decay run; set optim.schedule: wsd "
                f"(it is {self.optim.schedule!r})",
            )
        if self.distributed.strategy == "deepspeed":
            self._validate_deepspeed()
        _require(
            self.stage != "dpo" or self.checkpoint.init_from is not None,
            "checkpoint.init_from",
            "DPO needs a starting checkpoint (it is also the frozen reference model)",
        )
        return self

    def _validate_deepspeed(self) -> None:
        """Combinations DeepSpeed cannot run here, refused before any worker starts."""
        _require(
            not (self.lora.enabled and self.distributed.zero_stage == 3),
            "distributed.zero_stage",
            "ZeRO-3 partitions the frozen base weights LoRA wraps; LoRA runs with zero_stage 0-2",
        )
        _require(
            not (self.runtime.dtype == "fp16" and not self.distributed.use_gpu),
            "runtime.dtype",
            "fp16 needs GPUs (DeepSpeed's loss scaling is for CUDA); on CPU use fp32 or bf16",
        )
        _require(
            not self.runtime.compile,
            "runtime.compile",
            "torch.compile is not combined with the DeepSpeed engine here; use strategy ddp to compile",
        )
        _require(
            not (self.eval.cools_down and self.distributed.zero_stage == 0),
            "distributed.zero_stage",
            "cooldown evaluations (eval.cooldown_fraction) branch the partitions of ZeRO's optimizers (stages 1-3); "
            "stage 0 is plain data parallelism: use strategy ddp",
        )
