"""Pieces of train.py's loop that are not the loop: preemption signals, the running training statistics and
their log record, the skip guard, and the dev-list EER at each checkpoint."""

from __future__ import annotations

import signal
import time

import torch

from asv.errors import AsvError


class TrainingDiverged(AsvError):
    """Too many updates in a row were skipped (non-finite gradients or out-of-memory batches)."""


class Preemption:
    """SIGTERM / SIGUSR1 (a scheduler preempting the job, `scancel`, a time limit's warning signal) only
    set a flag; the loop saves a checkpoint at the next update boundary and exits 0, and auto-resume
    continues from there."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, accelerator) -> bool:
        flag = self.signal is not None
        if accelerator.num_processes > 1:  # one rank's signal stops every rank at the same update
            flag = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0
        return flag


class RunningStats:
    """Loss and accuracy since the last log step, summed on the device (no host sync per batch), plus the
    skip counters. A NaN loss must not poison the logged mean: its batch counts nowhere."""

    def __init__(self, device, max_consecutive_skips: int, gradient_clipping: float = 1000.0):
        self.sums = torch.zeros(3, device=device)  # loss x items, correct, items
        self.gradient_clipping = gradient_clipping
        self.skipped_updates = self.oom_batches = self.consecutive_skips = 0
        self.max_consecutive_skips = max_consecutive_skips
        self.t_log = time.time()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float()
        n = len(labels) * finite
        correct = (logits.argmax(-1) == labels).sum().float() * finite
        self.sums += torch.stack([torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0) * n, correct, n])

    def update_done(self, applied: bool) -> None:
        """After each optimizer update: `applied` is False when its gradient was not finite and it was skipped."""
        self.skipped_updates += not applied
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1

    def out_of_memory(self) -> None:
        self.oom_batches += 1
        self.consecutive_skips += 1

    def check(self, step: int) -> None:
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{self.consecutive_skips} updates in a row skipped at step {step} (non-finite gradients or out of "
                "memory): the run has diverged or does not fit; lower --lr, --batch_size or --max_secs, or restart "
                "from an earlier checkpoint with --resume_ckpt_dir"
            )

    def record(self, accelerator, updates: int, lr: float, grad_norm, unreadable_files: int, layer_weights) -> dict:
        """The log record for the last `updates` updates (reduced over processes), then start counting afresh."""
        totals = accelerator.reduce(self.sums, reduction="sum")
        now = time.time()
        record = {
            "train/loss": (totals[0] / totals[2].clamp(min=1)).item(),
            "train/acc": (totals[1] / totals[2].clamp(min=1)).item(),
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/skipped_updates": self.skipped_updates,
            "train/oom_batches": self.oom_batches,
            # Training files that failed to load since this process started (each was replaced).
            "train/unreadable_files": unreadable_files,
            "train/updates_per_s": updates / max(now - self.t_log, 1e-9),
        }
        if layer_weights is not None:
            record.update({f"featurizer/layer_{i}": w for i, w in enumerate(layer_weights.tolist())})
        self.sums.zero_()
        self.t_log = now
        return record


def train_step(
    accelerator,
    model,
    upstream,
    optimizer,
    scheduler,
    batch,
    finetune: bool,
    precision,
    stats,
    upstream_precision="fp32",
    trim_padding=True,
):
    """One batch of train.py's loop (and of the s3prl parity test, which runs exactly this).

    Upstream features under `precision` (a frozen upstream autocast alone to `upstream_precision`), the model's
    (loss, logits), Accelerate's backward (the loss divided by the accumulation), and on the batch that
    completes an update: the gradient norm clipped to stats.gradient_clipping, then the optimizer and scheduler
    step, skipped when the norm is not finite, as s3prl does (counted in `stats`, which gives up when it keeps
    happening: the run has diverged). Returns (loss, gradient norm or None)."""
    from asv.upstream import upstream_features

    wav, wav_len, labels = batch
    grad_norm = None
    with accelerator.accumulate(model, *([upstream] if finetune else [])):
        # A frozen upstream runs in inference mode, so no autograd graph goes through it.
        hidden, hidden_len = upstream_features(
            upstream, wav, wav_len, finetune, precision, upstream_precision, trim_padding
        )
        loss, logits = model(hidden, hidden_len, labels)
        accelerator.backward(loss)
        stats.add(loss, logits, labels)
        if accelerator.sync_gradients:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = accelerator.clip_grad_norm_(params, stats.gradient_clipping)
            applied = bool(torch.isfinite(grad_norm))
            if applied:
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            stats.update_done(applied)
        optimizer.zero_grad()
    return loss.detach(), grad_norm


def unreadable_files(accelerator, dataset) -> int:
    """Failed training-file loads summed over processes (TrainDataset counts them in shared memory)."""
    count = torch.tensor(dataset.num_unreadable.value, device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum"))


def dev_eer(
    accelerator, upstream, model, dev_trials, lengths: dict[str, int], test_effects: bool, upstream_precision="fp32"
) -> float:
    """EER (percent) of the model being trained on the held-out dev list, embedding sharded across processes."""
    from asv.extract import ModelEmbedder, trial_list_eer

    net = accelerator.unwrap_model(model)
    net.eval()
    embedder = ModelEmbedder(upstream, net, upstream_precision)
    eer, _ = trial_list_eer(embedder, dev_trials, lengths, None, test_effects, accelerator)
    net.train()
    return 100.0 * eer
