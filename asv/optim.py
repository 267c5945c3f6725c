"""Optimizer, learning-rate schedule and the batch plan that keeps the effective batch on any process count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from asv.conventions import SUPERB_EFFECTIVE_BATCH
from asv.errors import ConfigError


def build_optimizer_and_scheduler(optim_cfg, model: torch.nn.Module, upstream: torch.nn.Module | None):
    """One optimizer over the trainable tensors, with its own learning rate for the featurizer's layer
    weights (--featurizer_lr) and a fine-tuned upstream (--upstream_lr). torch's default kernels, the ones
    s3prl's runner uses (the parity tests compare losses with them)."""
    if not hasattr(torch.optim, optim_cfg.optimizer):
        raise ConfigError(f"--optimizer {optim_cfg.optimizer} is not a torch.optim class")
    featurizer = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("featurizer.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("featurizer.")]
    groups = [{"params": rest, "lr": optim_cfg.lr}]
    if featurizer:
        groups.append({"params": featurizer, "lr": optim_cfg.featurizer_lr or optim_cfg.lr})
    if upstream is not None:
        groups.append(
            {
                "params": [p for p in upstream.parameters() if p.requires_grad],
                "lr": optim_cfg.upstream_lr or optim_cfg.lr,
            }
        )
    cls = getattr(torch.optim, optim_cfg.optimizer)
    extra = yaml.safe_load(optim_cfg.optimizer_kwargs) or {}
    try:
        optimizer = cls(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay, **extra)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"--optimizer {optim_cfg.optimizer} --optimizer_kwargs {optim_cfg.optimizer_kwargs!r}: {err}"
        ) from None
    scheduler = None
    if optim_cfg.scheduler:
        if not hasattr(torch.optim.lr_scheduler, optim_cfg.scheduler):
            raise ConfigError(f"--scheduler {optim_cfg.scheduler} is not a torch.optim.lr_scheduler class")
        kwargs = yaml.safe_load(optim_cfg.scheduler_kwargs) or {}
        try:
            scheduler = getattr(torch.optim.lr_scheduler, optim_cfg.scheduler)(optimizer, **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"--scheduler {optim_cfg.scheduler} --scheduler_kwargs {optim_cfg.scheduler_kwargs!r}: {err}"
            ) from None
    if optim_cfg.warmup_steps:
        # The ramp runs first, then the scheduler from its own start (or a constant rate): each stepped once per
        # update, as train.py steps the one scheduler it is given.
        ramp = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1 / (optim_cfg.warmup_steps + 1), total_iters=optim_cfg.warmup_steps
        )
        after = scheduler or torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, after], [optim_cfg.warmup_steps])
    return optimizer, scheduler


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer update's utterances are split: `per_device` per batch on each of `processes`, summed over
    `accumulate` batches."""

    per_device: int
    processes: int
    accumulate: int

    @property
    def effective(self) -> int:
        return self.per_device * self.processes * self.accumulate

    def describe(self) -> str:
        superb = (
            "SUPERB's"
            if self.effective == SUPERB_EFFECTIVE_BATCH
            else f"opt-in: not SUPERB's {SUPERB_EFFECTIVE_BATCH}, so not SUPERB's recipe"
        )
        return (
            f"effective batch {self.effective} ({superb}) = {self.per_device} per device x {self.processes} "
            f"processes x {self.accumulate} accumulation"
        )


def plan_batches(optim_cfg, batch_size: int, processes: int) -> BatchPlan:
    """The batch plan on `processes` processes. By default an update sums SUPERB's 50 utterances on any process
    count: each process's share split into the largest batch not above --batch_size that divides it (SUPERB on one
    device: 10 x 5; on 2: 5 x 5; on 5: 10 x 1). --effective_batch sets another total the same way;
    --gradient_accumulate fixes the batch at --batch_size and the total follows. Refused, in one line naming the
    ways out, when the total cannot be split evenly."""
    fixed, target = optim_cfg.gradient_accumulate, optim_cfg.effective_batch
    if fixed:
        plan = BatchPlan(batch_size, processes, fixed)
        if target and plan.effective != target:
            raise ConfigError(
                f"--gradient_accumulate {fixed} with --batch_size {batch_size} on {processes} processes makes an "
                f"effective batch of {plan.effective}, not --effective_batch {target}; pass only one of the two"
            )
        return plan
    total = target or SUPERB_EFFECTIVE_BATCH
    if total % processes:
        counts = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        what = f"--effective_batch {total}" if target else f"SUPERB's effective batch of {total}"
        raise ConfigError(
            f"{what} cannot be split evenly over {processes} processes: launch {counts} processes, or pass "
            f"--effective_batch E with E a multiple of {processes} (results are then labelled as not SUPERB's recipe)"
        )
    share = total // processes
    per_device = max(n for n in range(1, min(batch_size, share) + 1) if share % n == 0)
    return BatchPlan(per_device, processes, share // per_device)
