"""Optimizer, learning-rate schedule and the accumulation that keeps the effective batch."""

from __future__ import annotations

import torch
import yaml

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
    optimizer = cls(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
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
    return optimizer, scheduler


def gradient_accumulation(optim_cfg, num_processes: int, batch_size: int) -> int:
    """Batches per optimizer update: --gradient_accumulate, or what --effective_batch implies."""
    if not optim_cfg.effective_batch:
        return optim_cfg.gradient_accumulate
    per_update = batch_size * num_processes
    if optim_cfg.effective_batch % per_update:
        raise ConfigError(
            f"--effective_batch {optim_cfg.effective_batch} is not a multiple of --batch_size {batch_size} x "
            f"{num_processes} processes = {per_update}; change --batch_size"
        )
    return optim_cfg.effective_batch // per_update
