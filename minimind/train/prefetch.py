"""Host-side input: the next optimizer step's micro-batches are collated while this step trains.

Collation (reading rows, padding, stacking) is Python work on the host; done in the training thread
it sits between two steps, where a GPU waits for it. :class:`StepBatches` collates step ``s + 1`` on
one background thread while step ``s`` runs (PyTorch releases the GIL inside its kernels and CUDA
launches), and on a GPU pins the batches' host memory so the copies to the device are asynchronous.

Which batches a step trains on is a function of the step alone (``Trainer.micro_batches``), so
prefetching changes no number: a step that was not the one prefetched (a cooldown branch's steps, a
resume) is collated on the spot. Only one thread reads the data at a time: a step waits for any
collation in flight before it reads the data itself.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

Batch = dict[str, torch.Tensor]


class StepBatches:
    """``batches(step)``: the step's collated micro-batches, on the host (pinned on a GPU run)."""

    def __init__(self, collate_step: Callable[[int], list[Batch]], pin_memory: bool):
        self._collate_step = collate_step
        self._pin_memory = pin_memory
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future] | None = None

    def __call__(self, step: int, prefetch_next: bool = True) -> list[Batch]:
        ahead, self._ahead = self._ahead, None
        batches = None
        if ahead is not None:
            ahead_step, future = ahead
            collated = future.result()  # waited for even when unused: the data is read by one thread at a time
            if ahead_step == step:
                batches = collated
        if batches is None:
            batches = self._collate(step)
        if prefetch_next:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minimind-batches")
            self._ahead = (step + 1, self._pool.submit(self._collate, step + 1))
        return batches

    def _collate(self, step: int) -> list[Batch]:
        batches = self._collate_step(step)
        if self._pin_memory:
            batches = [{name: tensor.pin_memory() for name, tensor in batch.items()} for batch in batches]
        return batches

    def close(self) -> None:
        """Wait for a collation in flight and end the thread (a later call starts another)."""
        if self._ahead is not None:
            wait([self._ahead[1]])  # its error, if any, is not this call's to raise
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
