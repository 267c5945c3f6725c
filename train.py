"""Stage 2 of SUPERB ASV: train the x-vector + AM-softmax head on a frozen upstream's layer mix.

    python train.py --upstream wav2vec2 --data_dir data/voxceleb1 --exp_dir exp/wav2vec2
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py --upstream wavlm_large ...
    python train.py --config_path configs/demo.yaml            # the embedded demo
    python train.py --list_upstreams

Defaults are SuperbASV's (s3prl 0.4.18): AdamW 1e-4, batch 10 x accumulation 5, clip 1000, 200,000
optimizer updates, a checkpoint every 10,000. Each checkpoint exp_dir/step-<N>/ holds the trainable
weights only (embedder.safetensors for evaluation, model.safetensors with the loss head for resuming),
Accelerate's optimizer/scheduler/RNG state, train_state.json and the resolved config.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin, set_seed
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from asv.augment import AugmentError, build_augmenter
from asv.checkpoint import (
    CheckpointError,
    check_weights_match,
    list_checkpoints,
    newest_usable,
    read_train_state,
    remove_interrupted_saves,
    verify_checkpoint,
)
from asv.config import TrainConfig, load_train_config, parse, save_config, to_dict
from asv.data import DEV_LIST, EpochSampler, collate_train, load_train_set, read_trials_csv, unique_utterances
from asv.errors import AsvError
from asv.models import build_speaker_model
from asv.optim import build_optimizer_and_scheduler, gradient_accumulation
from asv.tracking import wandb_mode
from asv.upstream import (
    WEIGHT_FREE,
    UpstreamError,
    build_upstream,
    check_upstream_precision,
    disable_layerdrop,
    enable_gradient_checkpointing,
    list_upstreams,
    trainable_inputs,
    upstream_forward,
)


class TrainState:
    """Loop position, checkpointed as train_state.json (JSON, so loading it runs no code)."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = d["step"], d["epoch"], d["batch_in_epoch"]


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


def too_many_skips(consecutive: int, cfg: TrainConfig, state: TrainState) -> None:
    if consecutive >= cfg.run.max_consecutive_skips:
        raise SystemExit(
            f"error: {consecutive} updates in a row skipped at step {state.step} (non-finite gradients or out of "
            "memory): the run has diverged or does not fit; lower --lr, --batch_size or --max_secs, or restart "
            "from an earlier checkpoint with --resume_ckpt_dir"
        )


def dev_eer(accelerator, upstream, model, cfg: TrainConfig, dev_trials, lengths) -> float:
    """EER (percent) of the model being trained on the held-out dev list, embedding sharded across processes."""
    from asv.extract import ModelEmbedder, embed_cached
    from asv.metrics import compute_eer
    from asv.scoring import trial_scores

    net = accelerator.unwrap_model(model)
    net.eval()
    items = unique_utterances(dev_trials)
    embedder = ModelEmbedder(upstream, net, cfg.run.upstream_precision)
    vectors = embed_cached(embedder, items, lengths, None, cfg.data.test_effects, accelerator, num_workers=0)
    net.train()
    return 100.0 * compute_eer(trial_scores(vectors, dev_trials), [t.label for t in dev_trials])[0]


def save_checkpoint(accelerator, model, upstream, cfg: TrainConfig, state: TrainState, exp_dir: Path) -> Path:
    """Write exp_dir/step-<N>/ through a temporary directory so a crash never leaves a half checkpoint."""
    final = exp_dir / f"step-{state.step}"
    tmp = exp_dir / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model (trainable parts only), optimizer, scheduler, RNG
        accelerator.wait_for_everyone()  # every rank has written its RNG state before the rename
        if accelerator.is_main_process:
            weights = accelerator.unwrap_model(model).embedder_state_dict()
            if cfg.model.upstream_trainable:  # a fine-tuned upstream is part of the embedder
                weights.update({f"upstream.{k}": v for k, v in accelerator.unwrap_model(upstream).state_dict().items()})
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "embedder.safetensors")
            save_config(cfg, tmp / "config.yaml")
            # The loop position as JSON, written last: its presence marks a complete checkpoint.
            (tmp / "train_state.json").write_text(json.dumps(state.state_dict()))
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, quota, I/O error (torch says RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(exp_dir)
        kept = f"{previous[-1][1]} is untouched" if previous else "no earlier checkpoint exists"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(
            f"error: could not write checkpoint {final} ({msg}); {kept}. Free disk space and rerun "
            "the same command: it resumes from the newest checkpoint"
        ) from None
    if accelerator.is_main_process:
        # Renames only, so a kill at any point leaves either the old or the new step-N complete
        # (remove_interrupted_saves puts a stranded .old-step-N back).
        old = exp_dir / f".old-step-{state.step}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        # Pruning only after the new checkpoint is in place: a failed save never costs an old one.
        if cfg.run.keep_num_ckpts:
            for _, stale in list_checkpoints(exp_dir)[: -cfg.run.keep_num_ckpts]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def unreadable_files(accelerator, dataset) -> int:
    """Failed training-file loads summed over processes (TrainDataset counts them in shared memory)."""
    count = torch.tensor(dataset.num_unreadable.value, device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum"))


def check_resumable(saved_cfg: TrainConfig, cfg: TrainConfig, ckpt: Path) -> None:
    """The model and loss must match the checkpoint's; everything else may change on resume."""
    for section in ("model", "loss"):
        old, new = to_dict(getattr(saved_cfg, section)), to_dict(getattr(cfg, section))
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise SystemExit(
                f"error: {ckpt} was trained with {k}={old.get(k)!r}, this run has {k}={new[k]!r}; "
                "use the same setting or a new --exp_dir"
            )


def train(cfg: TrainConfig) -> Path:
    exp_dir = Path(cfg.run.exp_dir)
    if os.environ.get("WANDB_SWEEP_ID"):  # every sweep trial trains in its own directory
        exp_dir = exp_dir / f"sweep-{os.environ['WANDB_SWEEP_ID']}-{os.environ.get('WANDB_RUN_ID', int(time.time()))}"
    mode = wandb_mode(cfg.run.wandb_mode)
    # The plugin needs the accumulation before Accelerator exists; every launcher (accelerate launch,
    # torchrun, SLURM through them) exports WORLD_SIZE.
    accumulate = gradient_accumulation(cfg.optim, int(os.environ.get("WORLD_SIZE", 1)), cfg.data.batch_size)
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        # Accumulation runs across epoch ends (s3prl counts backward passes globally), so an update
        # always sums exactly gradient_accumulate batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulate, sync_with_dataloader=False),
        # We step the scheduler once per update ourselves; Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if cfg.run.compile else None,
        log_with=None if mode == "disabled" else "wandb",
        project_dir=str(exp_dir),
    )
    if cfg.run.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        accelerator.print("warning: bf16 on a CPU is about 100x slower than fp32 here; use --mixed_precision no")
    set_seed(cfg.run.seed)
    preemption = Preemption()

    # ---- data, model, optimizer
    try:
        upstream = build_upstream(cfg.model.upstream, cfg.model.upstream_ckpt, cfg.model.upstream_normalize)
        augment = build_augmenter(cfg.data)  # None unless an augmentation flag is set
    except (UpstreamError, AugmentError) as err:
        raise SystemExit(f"error: {err}") from None
    upstream.to(accelerator.device)
    finetune = cfg.model.upstream_trainable
    check_upstream_precision(cfg.run.upstream_precision, finetune)
    upstream.requires_grad_(finetune)
    if finetune:
        disable_layerdrop(upstream)
        if cfg.run.gradient_checkpointing:
            accelerator.print(f"gradient checkpointing on {enable_gradient_checkpointing(upstream)} upstream layers")
    try:
        dataset, speakers, stats = load_train_set(
            Path(cfg.data.data_dir), cfg.data.min_secs, cfg.data.max_secs, cfg.run.seed, augment
        )
    except (OSError, ValueError) as err:  # a missing or malformed manifest: the message names file and line
        raise SystemExit(f"error: {err}") from None
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes=len(speakers))
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, model, upstream if finetune else None)
    sampler = EpochSampler(len(dataset), cfg.run.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        collate_fn=collate_train,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        pin_memory=accelerator.device.type == "cuda",
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if finetune:  # a frozen upstream stays outside DDP and outside the checkpoints
        upstream = accelerator.prepare(upstream)
    if scheduler is not None:
        scheduler = accelerator.prepare(scheduler)
    # The loop position is kept in train_state.json, not registered with Accelerate: its
    # custom_checkpoint_*.pkl would be unpickled with weights_only=False on load.
    state = TrainState()
    dev_path = Path(cfg.data.data_dir) / "trials" / f"{DEV_LIST}.csv"
    dev_trials = read_trials_csv(dev_path) if cfg.run.eval_dev and dev_path.is_file() else None
    if dev_trials:
        from asv.extract import audio_lengths

        dev_lengths = audio_lengths([p for t in dev_trials for p in (t.wav_path1, t.wav_path2)])

    # ---- resume: an explicit directory, else the newest complete checkpoint in exp_dir
    if accelerator.is_main_process:
        for stale in remove_interrupted_saves(exp_dir):
            accelerator.print(f"cleaned up {stale.name}, left by a save that was interrupted")
    accelerator.wait_for_everyone()
    existing = list_checkpoints(exp_dir)
    resume = Path(cfg.run.resume_ckpt_dir) if cfg.run.resume_ckpt_dir else None
    try:
        if resume is None and existing:
            if not cfg.run.auto_resume:
                raise SystemExit(
                    f"error: {exp_dir} already has checkpoints (newest {existing[-1][1].name}); "
                    "use --auto_resume true to continue, or a new --exp_dir"
                )
            resume = newest_usable(existing)  # warns about each corrupt newer one it skips
            if resume is None:  # never silently restart from step 0 over a run's checkpoints
                raise SystemExit(
                    f"error: none of the {len(existing)} checkpoints in {exp_dir} is usable (warnings above); "
                    "move them away to start over, or use a new --exp_dir"
                )
        elif resume is not None:
            verify_checkpoint(resume)
        if resume is not None:
            check_resumable(load_train_config(resume / "config.yaml"), cfg, resume)
            # The prepared (possibly DDP-wrapped) model's names: what save_state wrote and load_state expects.
            check_weights_match(resume / "model.safetensors", model.state_dict(), "this model")
            accelerator.load_state(str(resume))
            state.load_state_dict(read_train_state(resume))
    except CheckpointError as err:
        raise SystemExit(f"error: cannot resume: {err}") from None
    if resume is not None:
        accelerator.print(
            f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        )

    log_path = exp_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir / "config.yaml")
        if log_path.is_file():  # a killed run may have logged past its last checkpoint: drop those lines
            kept = [r for r in log_path.read_text().splitlines() if json.loads(r)["step"] <= state.step]
            log_path.write_text("".join(r + "\n" for r in kept))
    run_id_file = exp_dir / "wandb_id.txt"
    if accelerator.is_main_process and not run_id_file.exists():
        run_id_file.write_text(os.environ.get("WANDB_RUN_ID") or f"{exp_dir.name}-{int(time.time())}")
    accelerator.wait_for_everyone()
    accelerator.init_trackers(
        cfg.run.wandb_project,
        config=to_dict(cfg),
        init_kwargs={
            "wandb": {
                "mode": mode,
                "dir": str(exp_dir),
                "name": exp_dir.name,
                "id": run_id_file.read_text(),
                "resume": "allow",
            }
        },
    )

    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    effective = cfg.data.batch_size * accelerator.num_processes * accumulate
    accelerator.print(
        f"training {cfg.model.upstream} -> {cfg.model.downstream} + {cfg.loss.loss} "
        f"on {stats['utterances']} utterances "
        f"({stats['dropped_short']} dropped as <= {cfg.data.min_secs}s after VAD), {stats['classes']} speakers; "
        f"{num_trainable / 1e6:.2f} M trainable parameters\n"
        f"effective batch {effective} = {cfg.data.batch_size} per device x {accelerator.num_processes} processes x "
        f"{accumulate} accumulation; {len(loader)} batches per epoch per process; "
        f"{cfg.run.total_steps} updates on {accelerator.device} (mixed precision: {cfg.run.mixed_precision})"
        + (f"; dev list: {len(dev_trials)} trials" if dev_trials else "")
    )

    def checkpoint() -> None:
        save_checkpoint(accelerator, model, upstream, cfg, state, exp_dir)
        if dev_trials:
            eer = dev_eer(accelerator, upstream, model, cfg, dev_trials, dev_lengths)
            accelerator.log({"dev/eer": eer}, step=state.step)
            accelerator.print(f"step {state.step}: dev EER {eer:.2f}%")
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": state.step, "dev/eer": eer}) + "\n")

    if cfg.run.save_initial and state.step == 0 and resume is None:
        checkpoint()

    # ---- the loop: one optimizer update every `accumulate` batches
    # bf16/fp16 only pays off for neural upstreams; signal-processing front-ends stay in fp32.
    upstream_autocast = cfg.model.upstream not in WEIGHT_FREE
    sums = torch.zeros(3, device=accelerator.device)  # loss, correct, count since the last log
    skipped_updates = oom_batches = consecutive_skips = 0
    t_log, t_start, last_saved = time.time(), time.time(), state.step
    model.train()
    upstream.train(finetune)
    head = accelerator.unwrap_model(model).head  # its margin schedule follows the global step
    while state.step < cfg.run.total_steps:
        loader.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for wav, wav_len, labels in epoch_loader:
            state.batch_in_epoch += 1
            head.set_step(state.step)
            try:
                with accelerator.accumulate(model, *([upstream] if finetune else [])):
                    with (
                        accelerator.autocast() if upstream_autocast else torch.autocast(wav.device.type, enabled=False)
                    ):
                        if finetune:
                            hidden, hidden_len = upstream(wav, wav_len)
                        else:
                            hidden, hidden_len = trainable_inputs(
                                *upstream_forward(upstream, wav, wav_len, cfg.run.upstream_precision)
                            )
                    loss, logits = model(hidden, hidden_len, labels)
                    accelerator.backward(loss)
                    finite = torch.isfinite(loss.detach()).float()  # a NaN loss must not poison the logged mean
                    sums += torch.stack(
                        [
                            torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0) * len(labels) * finite,
                            (logits.argmax(-1) == labels).sum().float() * finite,
                            len(labels) * finite,
                        ]
                    )
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(
                            [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.gradient_clipping
                        )
                        # s3prl skips the update when the gradient is not finite; so do we, count it, and
                        # give up when it keeps happening (the run has diverged).
                        if torch.isfinite(grad_norm):
                            optimizer.step()
                            if scheduler is not None:
                                scheduler.step()
                            consecutive_skips = 0
                        else:
                            skipped_updates += 1
                            consecutive_skips += 1
                    optimizer.zero_grad()
            except torch.OutOfMemoryError:
                # s3prl's OOM check is inverted and never fires; here the batch is dropped and counted.
                if accelerator.num_processes > 1:  # the other ranks would wait for this one's gradients forever
                    raise SystemExit(
                        f"error: out of memory at step {state.step} (batch {state.batch_in_epoch} of epoch "
                        f"{state.epoch}); lower --batch_size or --max_secs"
                    ) from None
                optimizer.zero_grad()
                torch.cuda.empty_cache()
                oom_batches += 1
                consecutive_skips += 1
                too_many_skips(consecutive_skips, cfg, state)
                continue  # not an update: the step counter only counts real ones
            too_many_skips(consecutive_skips, cfg, state)
            if not accelerator.sync_gradients:
                continue
            state.step += 1

            if state.step % cfg.run.log_step == 0 or state.step == cfg.run.total_steps:
                totals = accelerator.reduce(sums, reduction="sum")
                lr = optimizer.param_groups[0]["lr"]
                record = {
                    "train/loss": (totals[0] / totals[2].clamp(min=1)).item(),
                    "train/acc": (totals[1] / totals[2].clamp(min=1)).item(),
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/skipped_updates": skipped_updates,
                    "train/oom_batches": oom_batches,
                    # Training files that failed to load since this process started (each was replaced).
                    "train/unreadable_files": unreadable_files(accelerator, dataset),
                    "train/updates_per_s": cfg.run.log_step / max(time.time() - t_log, 1e-9),
                }
                weights = accelerator.unwrap_model(model).layer_weights()
                if weights is not None:
                    record.update({f"featurizer/layer_{i}": w for i, w in enumerate(weights.tolist())})
                accelerator.log(record, step=state.step)
                accelerator.print(
                    f"step {state.step}/{cfg.run.total_steps} epoch {state.epoch} loss {record['train/loss']:.4f} "
                    f"acc {record['train/acc']:.3f} lr {lr:.2e} grad_norm {record['train/grad_norm']:.2f}"
                )
                if accelerator.is_main_process:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": state.step, **record}) + "\n")
                sums.zero_()
                t_log = time.time()
            if state.step % cfg.run.save_step == 0 or state.step == cfg.run.total_steps:
                checkpoint()
                last_saved = state.step
            if preemption.requested(accelerator):
                if last_saved != state.step:
                    checkpoint()
                accelerator.print(
                    f"received signal {preemption.signal or 'on another rank'}: saved step {state.step} and stopped; "
                    "run the same command again to resume"
                )
                finish(accelerator)
                return exp_dir
            if state.step >= cfg.run.total_steps:
                break
        else:  # the epoch ran out before total_steps: next epoch, from its first batch
            state.epoch += 1
            state.batch_in_epoch = 0

    if last_saved != state.step and state.step > 0:
        checkpoint()
    if accelerator.is_main_process:
        final = exp_dir / f"step-{state.step}"  # this run's last save, not whatever has the highest number
        shutil.copy(final / "embedder.safetensors", exp_dir / "embedder.safetensors")
        (exp_dir / "train_summary.json").write_text(
            json.dumps(
                {
                    "steps": state.step,
                    "skipped_updates": skipped_updates,
                    "oom_batches": oom_batches,
                    "unreadable_files": dataset.num_unreadable.value,
                    "train_seconds": round(time.time() - t_start, 1),
                    **stats,
                },
                indent=1,
            )
        )
    finish(accelerator)
    accelerator.print(f"done: {state.step} updates; checkpoints in {exp_dir}")
    return exp_dir


def finish(accelerator) -> None:
    """End trackers and the process group after a barrier. The barrier lets gloo's worker thread finish
    destroying the last collectives (they hold Python tensors, so it needs the GIL); without it, tearing
    the group down as train() returns could deadlock against that thread (seen in the 2-process test)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> Path | None:
    cfg, extra = parse(
        TrainConfig,
        argv,
        extra={"--list_upstreams": dict(action="store_true", help="print every s3prl upstream name and exit")},
    )
    if extra["list_upstreams"]:
        print("\n".join(list_upstreams()))
        return None
    try:
        return train(cfg)
    except AsvError as err:  # the library explains; the script exits with that one line
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
