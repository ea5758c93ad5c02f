"""The MiniMind model family: architecture, LoRA, generation and Hugging Face interop."""

from minimind.model.minimind import KVCache, MiniMindLM, count_parameters, flops_per_token

__all__ = ["KVCache", "MiniMindLM", "count_parameters", "flops_per_token"]
