"""Low-rank adapters on the model's linear projections.

``apply_lora`` swaps each targeted ``nn.Linear`` for a :class:`LoRALinear` holding the frozen base
weight plus ``lora_A``/``lora_B``; ``adapter_state_dict`` is what a LoRA run saves (the base is
unchanged); ``merge_lora`` folds the adapters back into plain ``nn.Linear`` weights for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minimind.config import LoraConfig


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        # B starts at zero so the adapted model equals the base model before training.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x) @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()
        return self.base(x) + update * self.scale

    def merged(self) -> nn.Linear:
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=False, device=self.base.weight.device)
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            merged.weight.copy_((self.base.weight.float() + delta).to(self.base.weight.dtype))
        return merged


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the targeted projections in place, freeze everything else; return the wrapped names."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in config.target_modules and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, config.rank, config.alpha, config.dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"lora.target_modules {config.target_modules} matched no nn.Linear in the model")
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if "lora_" in name}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their plain (un-wrapped) names, adapters excluded."""
    return {name.replace(".base.", "."): tensor for name, tensor in model.state_dict().items() if "lora_" not in name}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with its merged nn.Linear, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
