"""A fixed, cheap evaluation subset that training calls every N steps (and Tune optimises)."""

from __future__ import annotations

import torch

from minimind.config import EvalConfig
from minimind.data.dataset import collate
from minimind.eval.metrics import continuation_score, perplexity, preference_accuracy


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id spells (byte-level BPE: one vocabulary character per byte)."""
    lengths = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    specials = {token.content for token in tokenizer.backend.get_added_tokens_decoder().values()}
    for token, index in tokenizer.backend.get_vocab().items():
        lengths[index] = len(token.encode("utf-8")) if token in specials else len(token)
    return lengths


class Evaluator:
    """Scores a model on the first ``max_examples`` validation examples (always the same ones).

    Language-modelling stages get perplexity, bits per byte and the continuation score; DPO gets
    the implicit-reward accuracy and margin against ``reference``.
    """

    def __init__(
        self,
        config: EvalConfig,
        tokenizer,
        examples: list[dict],
        device: torch.device,
        reference=None,
        beta: float = 0.1,
    ):
        if not examples:
            raise ValueError("the validation split is empty: add eval.val_files or raise eval.val_fraction")
        self.config = config
        self.device = device
        self.reference = reference
        self.beta = beta
        subset = examples[: config.max_examples]
        self.batches = [
            {k: v.to(device) for k, v in collate(subset[i : i + config.batch_size], tokenizer.pad_id).items()}
            for i in range(0, len(subset), config.batch_size)
        ]
        self.documents = [] if reference is not None else [e["input_ids"] for e in examples]
        self.token_bytes = token_byte_lengths(tokenizer)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        try:
            if self.reference is not None:
                return preference_accuracy(model, self.reference, self.batches, self.beta)
            metrics = perplexity(model, self.batches, self.token_bytes)
            config = self.config
            if config.continuation_docs:
                metrics.update(
                    continuation_score(
                        model,
                        self.documents,
                        config.prefix_tokens,
                        config.continuation_tokens,
                        config.continuation_docs,
                    )
                )
            return metrics
        finally:
            model.train(was_training)
