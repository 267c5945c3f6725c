"""Pieces of train.py's loop that are not the loop: preemption signals, the running training statistics and
their log record, the skip guard, and the dev-list EER at each checkpoint."""

from __future__ import annotations

import itertools
import signal
import time

import torch

from asv.errors import AsvError


class TrainingDiverged(AsvError):
    """Too many updates in a row were skipped (non-finite gradients or out-of-memory batches)."""


AGREE_EVERY_ON_GPU = 10


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

    def requested(self, accelerator, step: int) -> bool:
        """Whether to save and stop after update `step`. With several processes one rank's signal stops every rank
        at the same update, agreed in a collective; reading its result drains a GPU's queue, so on GPUs the ranks
        meet every AGREE_EVERY_ON_GPU updates (a second or two of a job's grace period), on CPUs at every one."""
        flag = self.signal is not None
        if accelerator.num_processes > 1:
            if accelerator.device.type == "cuda" and step % AGREE_EVERY_ON_GPU:
                return False
            flag = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0
        return flag


class RunningStats:
    """Loss and accuracy since the last log step, and the skip counters, kept on the device: a training step never
    waits for the GPU to report them. A NaN loss must not poison the logged mean: its batch counts nowhere."""

    def __init__(self, device, max_consecutive_skips: int, gradient_clipping: float = 1000.0):
        self.sums = torch.zeros(3, device=device)  # loss x items, correct, items
        # Updates skipped in all, skipped in a row now, and the longest such run since the last check.
        self.skips = torch.zeros(3, device=device)
        self.gradient_clipping = gradient_clipping
        self.oom_batches = 0
        self.max_consecutive_skips = max_consecutive_skips
        # On a CPU reading the counters costs nothing, so the guard checks them after every batch; a GPU's queue
        # would drain at each read, so there they are read at log steps (check(..., due=True)).
        self.check_every_batch = torch.device(device).type == "cpu"
        self.t_log = time.time()

    @property
    def skipped_updates(self) -> int:
        return int(self.skips[0])

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).float()
        n = len(labels) * finite
        correct = (logits.argmax(-1) == labels).sum().float() * finite
        self.sums += torch.stack([torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0) * n, correct, n])

    def update_done(self, applied: torch.Tensor) -> None:
        """After each optimizer update: `applied` (a bool tensor) is False when its gradient was not finite and the
        update was skipped."""
        self._skipped((~applied).to(self.skips.dtype))

    def out_of_memory(self) -> None:
        self.oom_batches += 1
        self._skipped(torch.ones((), device=self.skips.device))

    def _skipped(self, skip: torch.Tensor) -> None:
        run = (self.skips[1] + 1) * skip  # back to 0 at the first applied update
        self.skips.copy_(torch.stack([self.skips[0] + skip, run, torch.maximum(self.skips[2], run)]))

    def check(self, step: int, due: bool = False) -> None:
        """Give up once max_consecutive_skips updates in a row were skipped (checked every batch on a CPU, when
        `due` on a GPU)."""
        if not (self.check_every_batch or due):
            return
        longest = int(self.skips[2])
        self.skips[2] = self.skips[1]
        if longest >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{longest} updates in a row skipped by step {step} (non-finite gradients or out of memory): the "
                "run has diverged or does not fit; lower --lr, --batch_size or --max_secs, or restart from an "
                "earlier checkpoint with --resume_ckpt_dir"
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


def skips_on_device(optimizer, accelerator) -> bool:
    """Whether the optimizer can skip a non-finite update by itself, with no host sync: torch's fused Adam/AdamW/
    SGD kernels read a `found_inf` tensor (GradScaler's mechanism) and leave parameters, moments and step counts
    as they were where it is 1. Used on GPUs (asv.optim builds fused optimizers there); under fp16 loss scaling
    Accelerate's GradScaler already skips such updates and owns that attribute."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps torch's
    return bool(inner.defaults.get("fused")) and getattr(accelerator, "scaler", None) is None


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
    features=None,
):
    """One batch of train.py's loop (and of the s3prl parity test, which runs exactly this).

    Upstream features under `precision` (a frozen upstream autocast alone to `upstream_precision`), the model's
    (loss, logits), Accelerate's backward (the loss divided by the accumulation), and on the batch that
    completes an update: the gradient norm clipped to stats.gradient_clipping, then the optimizer step, skipped
    when the norm is not finite, and the scheduler step, taken either way, as s3prl's runner does (skips are
    counted in `stats`, which gives up when they keep happening: the run has diverged). On a GPU nothing here
    waits for the device (skips_on_device). `features`: the batch's upstream (hidden, hidden_len), computed already
    (upstream_groups). Returns (loss, gradient norm or None)."""
    from asv.upstream import upstream_features

    # train.py's loader leaves batches on the host: audio and labels go to the device without blocking (from pinned
    # memory on GPUs); the lengths stay on the host for the upstream, whose S3PRLUpstream takes their max and slices
    # each utterance by them (each a host sync on a GPU tensor), and its output lengths follow the audio.
    wav, wav_len, labels = batch
    device = accelerator.device
    wav, labels = _to(wav, device), _to(labels, device)
    grad_norm = None
    with accelerator.accumulate(model, *([upstream] if finetune else [])):
        # A frozen upstream runs in inference mode, so no autograd graph goes through it.
        hidden, hidden_len = features or upstream_features(
            upstream, wav, wav_len, finetune, precision, upstream_precision, trim_padding
        )
        hidden_len = [_to(n, device) for n in hidden_len]
        loss, logits = model(hidden, hidden_len, labels)
        accelerator.backward(loss)
        stats.add(loss, logits, labels)
        if accelerator.sync_gradients:
            grad_norm = update(accelerator, optimizer, scheduler, stats)
        optimizer.zero_grad()
    return loss.detach(), grad_norm


def update(accelerator, optimizer, scheduler, stats) -> torch.Tensor:
    """The end of an update: clip, optimizer step unless the norm is not finite, scheduler step, skip count.
    Returns the gradient norm (a device tensor: nothing here reads it where skips_on_device)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = accelerator.clip_grad_norm_(params, stats.gradient_clipping)
    applied = torch.isfinite(grad_norm)
    if skips_on_device(optimizer, accelerator):
        getattr(optimizer, "optimizer", optimizer).found_inf = (~applied).float()
        optimizer.step()
    elif bool(applied):  # reads the norm: a host sync, which costs nothing on a CPU
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats.update_done(applied)
    return grad_norm


def upstream_groups(
    batches, upstream, n: int, device, precision, upstream_precision: str = "fp32", trim_padding: bool = True
):
    """(batch, features or None) for each batch of `batches`, in order. With n > 1, a frozen wav2vec 2.0 / HuBERT /
    WavLM's forward of n batches at a time runs as one (asv.padding_trim.grouped_upstream_forward: each batch's own
    features); `precision` makes the autocast context train_step would use. Batches the padding trim serves (a
    CPU: cheaper still) and a joint forward that runs out of memory (not retried) get None: train_step then
    computes their features one batch at a time."""
    from asv.padding_trim import groupable, grouped_upstream_forward, trimmable
    from asv.upstream import trainable_inputs

    if n <= 1:
        yield from ((batch, None) for batch in batches)
        return
    it, fits = iter(batches), True
    while chunk := list(itertools.islice(it, n)):
        pairs = [(_to(wav, device), wav_len) for wav, wav_len, _ in chunk]
        features = [None] * len(chunk)
        trimmed = trim_padding and any(trimmable(upstream, wav, wav_len) for wav, wav_len in pairs)
        if fits and not trimmed and groupable(upstream, pairs):
            try:
                with precision():
                    features = [
                        trainable_inputs(*f) for f in grouped_upstream_forward(upstream, pairs, upstream_precision)
                    ]
            except torch.OutOfMemoryError:
                fits = False
                torch.cuda.empty_cache()
                print(f"note: {n} batches do not fit one upstream forward here; one per batch from now on", flush=True)
        yield from (((*pairs[i], chunk[i][2]), f) for i, f in enumerate(features))


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without making the host wait: a host tensor headed for a GPU is pinned first (from
    torch's caching host allocator) so that the copy is asynchronous."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


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
