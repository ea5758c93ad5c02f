"""The MiniMind decoder: RMSNorm, RoPE, grouped-query attention (QK-norm in minimind-3), SwiGLU or
MoE, tied embeddings.

Parameter names follow Hugging Face Llama (``model.layers.0.self_attn.q_proj.weight``) so a dense
checkpoint exports with no renaming. The model knows nothing about training: it maps token ids to
logits (plus the MoE load-balancing loss) and optionally extends a key/value cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimind.config import ModelConfig
from minimind.model import mup
from minimind.model.grouped_gemm import grouped_linear

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations do not lose the mean-square.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [length, head_dim] in the rotate-half layout Llama uses."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = mup.attention_scale(config)  # None: 1/sqrt(head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        new_cache = (k, v)
        # GQA: each key/value head serves num_heads / num_kv_heads query heads.
        repeats = self.num_heads // self.num_kv_heads
        k_full = k.repeat_interleave(repeats, dim=1) if repeats > 1 else k
        v_full = v.repeat_interleave(repeats, dim=1) if repeats > 1 else v
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None and cache is None:
            out = F.scaled_dot_product_attention(q, k_full, v_full, dropout_p=dropout, is_causal=True, scale=self.scale)
        else:
            if attn_mask is None:
                # New queries sit at the end of the cached sequence: query i sees keys <= past + i.
                past = k.shape[2] - length
                attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
            out = F.scaled_dot_product_attention(
                q, k_full, v_full, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale
            )
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out), new_cache


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Routed experts (softmax router, top-k) plus always-on shared experts: MiniMind2-MoE, or
    minimind-3's MoE with no shared expert and the load balanced over the batch.

    Dispatch has no data-dependent shape and no host synchronisation of its own: each token's top-k
    (token, expert) pairs are sorted by expert into a fixed ``tokens * top_k`` rows, the experts run as
    one grouped matrix multiply whose group boundaries stay on the device (``grouped_gemm``; on a GPU
    in bf16 the host never waits for it), and every row goes back to its token weighted by its router
    probability. The experts keep their own modules (``experts.N.gate_proj.weight``, as in MiniMind's
    checkpoints); their weights are stacked per forward.
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.top_k = moe.top_k
        self.num_experts = moe.num_routed_experts
        self.norm_topk_prob = moe.norm_topk_prob
        self.aux_loss_alpha = moe.aux_loss_alpha
        self.balance_over = moe.balance_over
        self.gate = nn.Linear(config.hidden_size, moe.num_routed_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.ffn_size) for _ in range(moe.num_routed_experts)
        )
        self.shared_experts = nn.ModuleList(
            FeedForward(config.hidden_size, config.ffn_size) for _ in range(moe.num_shared_experts)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = self.gate(flat).float().softmax(dim=-1)
        weights, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:  # with top-1 the chosen expert's weight becomes 1, as in minimind-3
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = self.routed_experts(flat, chosen, weights)
        for expert in self.shared_experts:
            out = out + expert(flat)
        aux_loss = flat.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_loss_alpha > 0 and self.balance_over == "batch":
            # minimind-3: over all tokens, each top-k slot's share per expert times the expert's mean
            # router probability, scaled so uniform routing gives top_k.
            load = F.one_hot(chosen, self.num_experts).float().mean(0)
            aux_loss = (load * scores.mean(0)).sum() * self.num_experts * self.aux_loss_alpha
        elif self.training and self.aux_loss_alpha > 0:
            # Sequence-level balance: per sequence, the fraction of routed slots each expert got
            # (scaled so uniform = 1) times its mean router probability.
            counts = torch.zeros(batch, self.num_experts, device=x.device)
            counts.scatter_add_(1, chosen.view(batch, -1), torch.ones(batch, length * self.top_k, device=x.device))
            load = counts / (length * self.top_k / self.num_experts)
            aux_loss = (load * scores.view(batch, length, -1).mean(dim=1)).sum(dim=1).mean() * self.aux_loss_alpha
        return out.view(batch, length, hidden), aux_loss

    def routed_experts(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(token): ``flat`` [tokens, hidden],
        ``chosen`` and ``weights`` [tokens, top_k]."""
        tokens, hidden = flat.shape
        pair_expert = chosen.reshape(-1)  # the expert of each (token, slot) pair, token by token
        # Stable: within an expert its pairs stay in token order, the order the experts saw them in
        # when each ran on its own tokens.
        order = torch.argsort(pair_expert, stable=True)
        rows = flat[order // self.top_k]
        # Rows per expert counted into a fixed-length tensor (bincount's length would depend on the data).
        per_expert = torch.zeros(self.num_experts, dtype=torch.int32, device=flat.device)
        per_expert.scatter_add_(0, pair_expert, torch.ones_like(pair_expert, dtype=torch.int32))
        ends = per_expert.cumsum(0, dtype=torch.int32)
        expert_out = self.experts_on_sorted_rows(rows, ends)
        pair_out = expert_out[torch.argsort(order)].view(tokens, self.top_k, hidden)
        # Summed in slot order; with two slots that is the sum the experts' index order gives, exactly.
        return (pair_out * weights[..., None].to(flat.dtype)).sum(dim=1)

    def experts_on_sorted_rows(self, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` applied to ``rows[ends[e-1]:ends[e]]``, for every expert."""
        if not all(isinstance(getattr(e, name), nn.Linear) for e in self.experts for name in self.PROJECTIONS):
            # LoRA adapters wrap the projections: each expert's own modules run on its rows, whose
            # bounds the host reads (one synchronisation per layer).
            bounds = [0, *ends.tolist()]
            return torch.cat([e(rows[a:b]) for e, a, b in zip(self.experts, bounds, bounds[1:])])
        # grouped_mm is outside autocast's op lists: cast to the dtype autocast gives nn.Linear.
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
        gate, up, down = (
            torch.stack([getattr(e, name).weight for e in self.experts]).to(dtype) for name in self.PROJECTIONS
        )
        rows = rows.to(dtype)
        return grouped_linear(F.silu(grouped_linear(rows, gate, ends)) * grouped_linear(rows, up, ends), down, ends)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.moe.enabled else FeedForward(config.hidden_size, config.ffn_size)
        self.residual_multiplier = mup.residual_multiplier(config)  # CompleteP's base/L; 1 otherwise

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        attended, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        x = x + self._scaled(attended)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if isinstance(mlp_out, tuple):
            mlp_out, aux_loss = mlp_out  # the balance loss is the router's, not the stream's: unscaled
        else:
            aux_loss = None
        return x + self._scaled(mlp_out), new_cache, aux_loss

    def _scaled(self, branch: torch.Tensor) -> torch.Tensor:
        return branch if self.residual_multiplier == 1.0 else branch * self.residual_multiplier


class Decoder(nn.Module):
    """Embeddings, blocks and the final norm; ``MiniMindLM.model`` (HF Llama's ``model``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MiniMindLM(nn.Module):
    """Causal language model. ``forward`` returns logits [batch, seq, vocab] and the MoE aux loss."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied, as in MiniMind
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.output_multiplier = mup.output_multiplier(config)
        if config.parametrization == "mup":  # the same draws, rescaled: std 0.02 * mup's factor
            with torch.no_grad():
                for name, parameter in self.named_parameters():
                    parameter.mul_(mup.init_std_multiplier(name, config))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, active_only: bool = False) -> int:
        """Unique parameters (the tied embedding once); ``active_only`` counts top-k experts only."""
        total = sum(p.numel() for p in self.parameters())
        if active_only and self.config.moe.enabled:
            moe = self.config.moe
            per_expert = 3 * self.config.hidden_size * self.config.ffn_size
            total -= self.config.num_layers * (moe.num_routed_experts - moe.top_k) * per_expert
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """Logits, summed MoE aux loss (0 for dense), and the extended cache.

        ``cache`` holds keys/values of earlier positions (generation). ``document_ids``
        [batch, seq] restricts attention to tokens of the same packed document. ``key_mask``
        [batch, cached + seq] marks the real tokens of rows padded on the left (batched generation):
        no query attends to a padding position, whose own query sees only itself. RoPE scores depend
        only on the distance between positions, so a row shifted right by its padding scores as unpadded.
        """
        length = input_ids.shape[1]
        start = cache[0][0].shape[2] if cache else 0
        if start + length > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        cos = self.rope_cos[start : start + length]
        sin = self.rope_sin[start : start + length]
        attn_mask = None
        if document_ids is not None:
            same_doc = document_ids[:, :, None] == document_ids[:, None, :]
            causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = (same_doc & causal)[:, None]
        elif key_mask is not None:
            ones = torch.ones(length, start + length, dtype=torch.bool, device=input_ids.device)
            causal = ones.tril(start)
            itself = causal & ~ones.tril(start - 1)  # query i's own position, start + i
            attn_mask = ((causal & key_mask[:, None, :]) | itself)[:, None]
        x = self.model.dropout(self.model.embed_tokens(input_ids))
        aux_loss = x.new_zeros((), dtype=torch.float32)
        new_cache: KVCache = []
        for index, layer in enumerate(self.model.layers):
            x, layer_cache, layer_aux = layer(x, cos, sin, attn_mask, cache[index] if cache else None)
            new_cache.append(layer_cache)
            if layer_aux is not None:
                aux_loss = aux_loss + layer_aux
        logits = self.lm_head(self.model.norm(x))
        if self.output_multiplier != 1.0:
            logits = logits * self.output_multiplier
        return logits, aux_loss, new_cache


def flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*d*T for attention scores/values."""
    return 6.0 * num_params + 12.0 * config.num_layers * config.hidden_size * seq_len


def count_parameters(config: ModelConfig) -> int:
    """Parameter count of ``config`` without allocating it (meta device)."""
    with torch.device("meta"):
        return MiniMindLM(config).num_parameters()


__all__ = ["KVCache", "MiniMindLM", "count_parameters", "flops_per_token"]
