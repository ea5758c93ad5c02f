"""Cooldown branches under DeepSpeed ZeRO: each rank copies its own partition of the training state and puts it back.

A cooldown evaluation (``minimind/train/cooldown.py``) trains a branch of the run through the engine's
usual backward and step, then restores the run so it goes on bit for bit. Under ZeRO no rank holds the
whole state, so each rank copies only its own partition, in the memory where it lives (host memory under
ZeRO-Offload), without communicating:

- the fp32 master weights the rank's optimizer updates: one flat partition per param group (stages 1
  and 2; DeepSpeed's BF16 optimizer, which stage 1 uses with bf16 weights) or per sub-group (stage 3);
- the base optimizer's state, which only ever holds this rank's partitions (Adam's moments and step
  counts), and its param groups' hyperparameters (the lr, with μP's ``lr_scale`` per group);
- under offload, the host gradient buffers DeepSpeed keeps from step to step (a parameter that gets no
  gradient in a step, an MoE expert no token reached, is stepped with the buffer's old contents);
- the loss scaler (fp16), the engine's step and sample counters and its lr scheduler, if any.

The module's weights are not copied. Every optimizer step writes them as the cast of the master weights:
stage 1/2 into the rank's slice of each flat group, then all-gathered; stage 3 into the rank's
``ds_tensor`` partitions, after releasing every gathered parameter and before gathering again the
persistent ones, which stay gathered between steps. Restoring repeats that write with DeepSpeed's own
code, which gives back exactly the weights the last step left (the initial weights too: the masters
start as their exact copy). That write all-gathers, so every rank restores, as every rank trains the
branch. The copy costs each rank its partition's master weights and moments (12 bytes per parameter
over the world size, more with offload's gradient buffers), where they live.

State that is not in memory (NVMe offload) and optimizer wrappers other than ZeRO's (stage 0's fp16/bf16
optimizer) are refused when the engine is built, by :func:`master_partitions`.
"""

from __future__ import annotations

import copy

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def master_partitions(optimizer) -> list[torch.Tensor]:
    """This rank's fp32 master weights in the engine's ``optimizer``; refuses state a branch cannot copy."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        if optimizer.swap_optimizer or optimizer.params_in_nvme_and_cpu:
            raise ValueError(
                "eval.cooldown_fraction: cooldown branches copy the optimizer state in memory; NVMe offload "
                "(distributed.deepspeed_config) keeps it on disk"
            )
        return optimizer.fp32_partitioned_groups_flat
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return optimizer.single_partition_of_fp32_groups
    if isinstance(optimizer, BF16_Optimizer):
        return optimizer.fp32_groups_flat_partition
    raise ValueError(
        f"eval.cooldown_fraction: cooldown branches copy the state of ZeRO's optimizers (stages 1-3); "
        f"this engine steps a {type(optimizer).__name__}"
    )


def snapshot_partition(engine) -> dict:
    """A copy of this rank's partition of what training changes, for :func:`restore_partition`."""
    optimizer = engine.optimizer
    masters = master_partitions(optimizer)
    base = optimizer.optimizer
    return {
        "masters": [_copy(master) for master in masters],
        "master_grads": [_copy(master.grad) for master in masters],  # persistent buffers under offload
        "optimizer_state": _copy(dict(base.state)),
        "hyperparameters": [_copy({k: v for k, v in group.items() if k != "params"}) for group in base.param_groups],
        "offload_gradients": _copy(getattr(optimizer, "accumulated_grads_in_cpu", {})),
        "loss_scaler": copy.deepcopy(getattr(optimizer, "loss_scaler", None)),
        "counters": {name: getattr(engine, name) for name in ENGINE_COUNTERS},
        "lr_scheduler": None if engine.lr_scheduler is None else _copy(engine.lr_scheduler.state_dict()),
        "run_cpu_adam": _give_branch_its_own_cpu_adam(base),
    }


@torch.no_grad()
def restore_partition(engine, saved: dict) -> None:
    """Put back what :func:`snapshot_partition` copied; every rank calls this (the weights are all-gathered)."""
    optimizer = engine.optimizer
    base = optimizer.optimizer
    _return_cpu_adam_to_the_run(base, saved["run_cpu_adam"])
    for master, weights, grad in zip(master_partitions(optimizer), saved["masters"], saved["master_grads"]):
        master.data.copy_(weights)
        if grad is None or master.grad is None:
            master.grad = grad
        else:
            master.grad.copy_(grad)
    _put_back(base.state, saved["optimizer_state"])
    for group, hyperparameters in zip(base.param_groups, saved["hyperparameters"]):
        group.update(hyperparameters)
    if hasattr(optimizer, "accumulated_grads_in_cpu"):
        _put_back(optimizer.accumulated_grads_in_cpu, saved["offload_gradients"])
    if saved["loss_scaler"] is not None:
        optimizer.loss_scaler = saved["loss_scaler"]
    for name, value in saved["counters"].items():
        setattr(engine, name, value)
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    _rewrite_module_weights(optimizer)


def _rewrite_module_weights(optimizer) -> None:
    """The module's weights cast from the master weights and gathered, by the code the optimizer step runs."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        # As stage 3's step: release every gathered parameter (the persistent ones too, which a gather
        # would otherwise skip as available), write this rank's ds_tensor partitions, gather the persistent.
        optimizer._partition_all_parameters()
        for sub_group in range(len(optimizer.fp16_groups)):
            optimizer._reassign_or_swap_out_partitioned_parameters(sub_group)
        if optimizer.persistent_parameters:
            optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
    else:
        optimizer.update_lp_params()  # this rank's slice of each flat group, then all-gathered


def _give_branch_its_own_cpu_adam(base) -> int | None:
    """DeepSpeed's CPU Adam (offload on GPUs) keeps beta1^t and beta2^t in C++, advanced by a multiplication
    each step; after a branch the run's next step would find its count behind and recompute them with pow,
    an ulp apart. The branch steps on a C++ optimizer of its own and the run's is left as it was. Returns
    the run's optimizer id (None for other optimizers, whose state is all in ``state``)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    if not isinstance(base, DeepSpeedCPUAdam):
        return None
    run_id, base.opt_id = base.opt_id, DeepSpeedCPUAdam.optimizer_id
    DeepSpeedCPUAdam.optimizer_id += 1
    defaults = base.defaults
    beta1, beta2 = defaults["betas"]
    base.ds_opt_adam.create_adam(
        base.opt_id, defaults["lr"], beta1, beta2, defaults["eps"], defaults["weight_decay"], base.adam_w_mode, False
    )
    return run_id


def _return_cpu_adam_to_the_run(base, run_id: int | None) -> None:
    if run_id is not None:
        base.ds_opt_adam.destroy_adam(base.opt_id)
        base.opt_id = run_id


def _copy(value):
    """A deep copy; tensors cloned where they are (a dict's tensor keys, optimizer state's, kept as they are)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return copy.deepcopy(value)


def _put_back(live: dict, saved: dict) -> None:
    """``live`` made equal to ``saved``, its tensors overwritten in place: DeepSpeed holds views of them
    (the optimizer state linked to each parameter's ``_hp_mapping``, offload's gradient buffers)."""
    for key in [key for key in live if key not in saved]:
        del live[key]
    for key, value in saved.items():
        current = live.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _put_back(current, value)
        elif _same_layout(current, value):
            current.copy_(value)
        else:
            live[key] = _copy(value)


def _same_layout(current, value) -> bool:
    return (
        torch.is_tensor(current)
        and torch.is_tensor(value)
        and (current.shape, current.dtype, current.device) == (value.shape, value.dtype, value.device)
    )
