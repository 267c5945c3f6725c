"""Pieces of train.py's loop that are not the loop: preemption signals, the running training statistics and
their log record, the skip guard, and the dev-list EER at each checkpoint."""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from asv.errors import AsvError
from asv.extract import ModelEmbedder, trial_list_eer
from asv.forward import ieee_fp32, training_features


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
        # Updates skipped in all; updates skipped and batches dropped in a row now, and the longest such run since
        # the last check.
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
        """A dropped batch: not a skipped update (the update sums other batches), but one more failure in a row for
        the guard, so a run where nothing fits stops."""
        self.oom_batches += 1
        self._skipped(torch.ones((), device=self.skips.device), an_update=False)

    def _skipped(self, skip: torch.Tensor, an_update: bool = True) -> None:
        run = (self.skips[1] + 1) * skip  # back to 0 at the first applied update
        total = self.skips[0] + skip if an_update else self.skips[0]
        self.skips.copy_(torch.stack([total, run, torch.maximum(self.skips[2], run)]))

    def check(self, step: int, due: bool = False) -> None:
        """Give up once max_consecutive_skips updates were skipped or batches dropped in a row (checked every batch
        on a CPU, when `due` on a GPU)."""
        if not (self.check_every_batch or due):
            return
        longest = int(self.skips[2])
        self.skips[2] = self.skips[1]
        if longest >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{longest} updates skipped or batches dropped in a row by step {step} (non-finite gradients or out of "
                "memory): the "
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


class OutOfMemoryInBackward(AsvError):
    """The device ran out of memory during a backward pass: the update's gradients are incomplete."""


@dataclass
class Trainee:
    """What a training step runs and updates: the (prepared) model, its upstream, and their optimizer and scheduler.
    `finetune`: the upstream trains too (--upstream_trainable or --upstream_adapter); a frozen one runs at
    `upstream_precision`.
    `accumulate`: batches whose gradients one optimizer update sums; `pending` counts those summed so far."""

    model: torch.nn.Module
    upstream: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    finetune: bool = False
    upstream_precision: str = "fp32"
    accumulate: int = 1
    pending: int = 0


def train_step(accelerator, trainee: Trainee, batch, stats: RunningStats):
    """One batch of train.py's loop (and of the s3prl parity harness, which runs exactly this).

    The upstream's hidden states (asv.forward.training_features; a neural upstream under --mixed_precision's
    autocast), the model's (loss, logits) and the backward pass of the loss divided by the accumulation, the
    downstream in IEEE fp32 (asv.forward.ieee_fp32). On the batch that completes an update: the gradient norm
    clipped to stats.gradient_clipping, then the optimizer step, skipped when the norm is not finite, and the
    scheduler step, taken either way, as s3prl's runner does (skips are counted in `stats`, which gives up when they
    keep happening: the run has diverged).

    The accumulation is counted here, not by Accelerate: a batch whose forward pass runs out of memory is dropped
    as if the loader had never given it (its slot is not counted, and every process drops it, agreed in a
    collective, so DDP's gradient sync stays matched), and the update sums the next `accumulate` batches that
    succeed. An out-of-memory backward pass leaves some gradients half-summed with no way back: the run stops
    (OutOfMemoryInBackward) and resumes from its last checkpoint. Returns (loss, or None for a dropped batch;
    gradient norm, or None when this batch did not complete an update)."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("train_step counts the accumulation itself: build the Accelerator without accumulation")
    # train.py's loader leaves batches on the host: audio and labels go to the device without blocking (from pinned
    # memory on GPUs); the lengths stay on the host for the upstream, whose S3PRLUpstream takes their max and slices
    # each utterance by them (each a host sync on a GPU tensor), and its output lengths follow the audio.
    wav, wav_len, labels = batch
    device = accelerator.device
    wav, labels = _to(wav, device), _to(labels, device)
    t = trainee
    completes = t.pending + 1 == t.accumulate
    # DDP syncs gradients in the backward pass of a forward taken outside no_sync: only the update's last batch.
    modules = [t.model, *([t.upstream] if t.finetune else [])]
    sync = nullcontext() if completes else _no_sync(accelerator, modules)
    # bf16/fp16 only pays off for neural upstreams; signal-processing front-ends stay in fp32.
    autocast = None if getattr(t.upstream, "weight_free", False) else accelerator.autocast()
    with sync:
        # Two agreements: a DDP forward may broadcast the model's buffers, so every process must reach the model's
        # forward when any does.
        features = _unless_out_of_memory(
            lambda: training_features(
                t.upstream,
                wav,
                wav_len,
                trainable=t.finetune,
                autocast=autocast,
                upstream_precision=t.upstream_precision,
            )
        )
        if _any_process(accelerator, features is None):
            return _dropped(device, stats)
        hidden, hidden_len = features
        hidden_len = [_to(n, device) for n in hidden_len]
        with ieee_fp32():
            out = _unless_out_of_memory(lambda: t.model(hidden, hidden_len, labels))
        if _any_process(accelerator, out is None):
            return _dropped(device, stats)
        loss, logits = out
        try:
            with ieee_fp32():
                accelerator.backward(loss / t.accumulate)
        except torch.OutOfMemoryError:
            raise OutOfMemoryInBackward(
                "out of memory in a backward pass: lower --batch_size or --max_secs (or use --gradient_checkpointing "
                "with --upstream_trainable), then run the same command again to resume from the last checkpoint"
            ) from None
    stats.add(loss, logits, labels)
    t.pending += 1
    grad_norm = None
    if completes:
        grad_norm = update(accelerator, t.optimizer, t.scheduler, stats)
        t.optimizer.zero_grad()
        t.pending = 0
    return loss.detach(), grad_norm


def _unless_out_of_memory(compute):
    """compute(), or None when the device runs out of memory in it (the partial graph is freed on return)."""
    try:
        return compute()
    except torch.OutOfMemoryError:
        return None


def _dropped(device, stats: RunningStats):
    """A batch that ran out of memory on some process: nothing of it stays, and it is counted."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stats.out_of_memory()
    return None, None


def _no_sync(accelerator, modules):
    """DDP's no_sync on every prepared module at once (a plain module's no_sync does nothing)."""
    stack = ExitStack()
    for m in modules:
        stack.enter_context(accelerator.no_sync(m))
    return stack


def _any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process: one process's dropped batch is every process's, so that all of them take
    the same backward passes (DDP's gradient sync waits for each rank's). One process decides alone."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0


def update(accelerator, optimizer, scheduler, stats) -> torch.Tensor:
    """The end of an update: clip, optimizer step unless the norm is not finite, scheduler step, skip count.
    Returns the gradient norm."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = accelerator.clip_grad_norm_(params, stats.gradient_clipping)
    applied = torch.isfinite(grad_norm)
    if bool(applied):  # s3prl's runner reads the norm on the host too
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    stats.update_done(applied)
    return grad_norm


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
    net = accelerator.unwrap_model(model)
    net.eval()
    embedder = ModelEmbedder(upstream, net, upstream_precision)
    eer, _ = trial_list_eer(
        embedder, dev_trials, lengths, cache_file=None, effects=test_effects, accelerator=accelerator
    )
    net.train()
    return 100.0 * eer
