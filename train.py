"""Stage 2 of SUPERB ASV: train the x-vector + AM-softmax head on a frozen upstream's layer mix.

    python train.py --upstream wav2vec2 --data_dir data/voxceleb1 --exp_dir exp/wav2vec2
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train.py --upstream wavlm_large ...
    python train.py --config_path configs/demo.yaml            # the embedded demo
    python train.py --list_upstreams

Defaults are SuperbASV's (s3prl 0.4.18): AdamW 1e-4, batch 10 x accumulation 5, clip 1000, 200,000
optimizer updates, a checkpoint every 10,000. Each checkpoint exp_dir/step-<N>/ holds the trainable
weights only (embedder.safetensors for evaluation, model.safetensors with the loss head for resuming),
Accelerate's optimizer/scheduler/RNG state, train_state.json and the resolved config.yaml (asv/rundir.py
describes the run directory).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader

from asv.adapters import add_adapters, describe_adapters, keep_adapters_only, tuned_state_dict
from asv.augment import build_augmenter
from asv.config import TrainConfig, load_train_config, parse, save_config, to_dict
from asv.datasets import EpochSampler, TrainDataset, collate_train, load_train_set
from asv.errors import AsvError, ConfigError, describe
from asv.extract import audio_lengths
from asv.manifest import DEV_LIST, Trial, read_trials_csv
from asv.models import SpeakerModel, build_speaker_model
from asv.optim import BatchPlan, build_optimizer_and_scheduler, plan_batches
from asv.progress import UpdateBar
from asv.rundir import (
    TrainState,
    check_resumable,
    check_weights_match,
    list_checkpoints,
    load_initial_weights,
    read_train_state,
    remove_interrupted_saves,
    save_checkpoint,
    step_dir,
    usable,
    verify_checkpoint,
)
from asv.tracking import JsonLog, start_tracking, wandb_mode
from asv.training import Preemption, RunningStats, Trainee, dev_eer, train_step, unreadable_files
from asv.upstream import (
    build_upstream,
    disable_layerdrop,
    enable_gradient_checkpointing,
    list_upstreams,
)


def main(argv: list[str] | None = None) -> Path | None:
    try:
        cfg, extra = parse(
            TrainConfig,
            argv,
            extra={"--list_upstreams": dict(action="store_true", help="print every s3prl upstream name and exit")},
        )
        if extra["list_upstreams"]:
            print("\n".join(list_upstreams()))
            return None
        return train(cfg)
    except AsvError as err:  # the library explains in one line; the script exits with it
        # A configuration error is the same on every process of a launch: the first one says it.
        quiet = isinstance(err, ConfigError) and int(os.environ.get("RANK", "0")) > 0
        raise SystemExit(1 if quiet else f"error: {describe(err)}") from None


def train(cfg: TrainConfig) -> Path:
    exp_dir = Path(cfg.run.exp_dir)
    if os.environ.get("WANDB_SWEEP_ID"):  # every sweep trial trains in its own directory
        exp_dir = exp_dir / f"sweep-{os.environ['WANDB_SWEEP_ID']}-{os.environ.get('WANDB_RUN_ID', int(time.time()))}"
    # Before anything loads: the batch plan on this many processes (every launcher, accelerate launch, torchrun,
    # SLURM through them, exports WORLD_SIZE), and a sweep trial's metric.
    plan = plan_batches(cfg.optim, cfg.data.batch_size, int(os.environ.get("WORLD_SIZE", 1)))
    dev_path = Path(cfg.data.data_dir) / "trials" / f"{DEV_LIST}.csv"
    if os.environ.get("WANDB_SWEEP_ID") and not (cfg.run.eval_dev and dev_path.is_file()):
        raise ConfigError(
            f"this W&B sweep minimises dev/eer, which needs {dev_path} and --eval_dev true: prepare the data with "
            "held-out dev speakers (python prepare.py ... --dev_speakers 40) and point --data_dir at it"
        )
    mode = wandb_mode(cfg.run.wandb_mode)
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        # We step the scheduler once per update ourselves; Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if cfg.run.compile else None,
        log_with=None if mode == "disabled" else "wandb",
        project_dir=str(exp_dir),
    )
    if accelerator.num_processes != plan.processes:  # a launcher that does not export WORLD_SIZE
        raise AsvError(
            f"WORLD_SIZE says {plan.processes} processes, Accelerate runs {accelerator.num_processes}: launch with "
            "accelerate launch or torchrun, which export it"
        )
    if cfg.run.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        accelerator.print("warning: bf16 on a CPU is about 100x slower than fp32 here; use --mixed_precision no")
    set_seed(cfg.run.seed)
    preemption = Preemption()
    run = build_run(cfg, accelerator, plan.per_device, dev_path)
    state, resumed = resume_or_start(cfg, accelerator, run.model, run.upstream, exp_dir)
    log = open_logs(cfg, accelerator, exp_dir, state, mode)
    model, upstream, optimizer, loader = run.model, run.upstream, run.optimizer, run.loader
    finetune = cfg.model.tunes_upstream
    trainee = Trainee(model, upstream, optimizer, run.scheduler, finetune, cfg.run.upstream_precision, plan.accumulate)
    print_banner(cfg, accelerator, run, plan, state, resumed)
    state.effective_batch = plan.effective

    def checkpoint() -> None:
        # SUPERB's "best over checkpoints" is over the scheduled saves: evaluate.py sets the others aside.
        state.scheduled = state.step > 0 and state.step % cfg.run.save_step == 0
        weights = lambda: embedder_weights(accelerator, model, upstream if finetune else None)  # noqa: E731
        save_checkpoint(accelerator, weights, lambda p: save_config(cfg, p), state, exp_dir, cfg.run.keep_num_ckpts)
        if run.dev_trials:
            eer = dev_eer(
                accelerator,
                upstream,
                model,
                run.dev_trials,
                run.dev_lengths,
                cfg.data.test_effects,
                cfg.run.upstream_precision,
            )
            accelerator.log({"dev/eer": eer}, step=state.step)
            bar.write(f"step {state.step}: dev EER {eer:.2f}%")
            log.write({"step": state.step, "dev/eer": eer})

    bar = UpdateBar(cfg.run.total_steps, state.step, enabled=accelerator.is_main_process)
    if cfg.run.save_initial and state.step == 0 and resumed is None:
        checkpoint()

    # ---- the loop: one optimizer update every `accumulate` batches
    stats = RunningStats(accelerator.device, cfg.run.max_consecutive_skips, cfg.optim.gradient_clipping)
    t_start, last_saved = time.time(), state.step
    model.train()
    upstream.train(finetune)
    head = accelerator.unwrap_model(model).head  # its margin schedule follows the global step
    while state.step < cfg.run.total_steps:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            state.batch_in_epoch += 1
            head.set_step(state.step)
            # Forward, backward and, on the batch that completes an update, clip + optimizer step. A batch that
            # runs out of memory is dropped without a trace (s3prl's OOM check is inverted and never fires).
            loss, grad_norm = train_step(accelerator, trainee, batch, stats)
            stats.check(state.step, due=loss is None)
            if grad_norm is None:
                continue  # not an update: the step counter only counts real ones
            state.step += 1
            bar.update()

            if state.step % cfg.run.log_step == 0 or state.step == cfg.run.total_steps:
                stats.check(state.step, due=True)  # on a GPU the skip guard reads its counters here
                lr = optimizer.param_groups[0]["lr"]
                weights = accelerator.unwrap_model(model).layer_weights()
                record = stats.record(
                    accelerator, cfg.run.log_step, lr, grad_norm, unreadable_files(accelerator, run.dataset), weights
                )
                accelerator.log(record, step=state.step)
                log.write({"step": state.step, **record})
                bar.set_loss(record["train/loss"])
                bar.write(
                    f"step {state.step}/{cfg.run.total_steps} epoch {state.epoch} loss {record['train/loss']:.4f} "
                    f"acc {record['train/acc']:.3f} lr {lr:.2e} grad_norm {record['train/grad_norm']:.2f}"
                )
            if state.step % cfg.run.save_step == 0 or state.step == cfg.run.total_steps:
                checkpoint()
                last_saved = state.step
            if preemption.requested(accelerator, state.step):
                if last_saved != state.step:
                    checkpoint()
                bar.write(
                    f"received signal {preemption.signal or 'on another rank'}: saved step {state.step} and stopped; "
                    "run the same command again to resume"
                )
                return finish(accelerator, bar, exp_dir)
            if state.step >= cfg.run.total_steps:
                break
        else:  # the epoch ran out before total_steps: next epoch, from its first batch
            state.epoch += 1
            state.batch_in_epoch = 0

    if last_saved != state.step and state.step > 0:
        checkpoint()
    if accelerator.is_main_process:
        # This run's last save, not whatever has the highest number.
        shutil.copy(step_dir(exp_dir, state.step) / "embedder.safetensors", exp_dir / "embedder.safetensors")
        summary = {
            "steps": state.step,
            "skipped_updates": stats.skipped_updates,
            "oom_batches": stats.oom_batches,
            "effective_batch": plan.effective,
            "unreadable_files": run.dataset.num_unreadable.value,
            "train_seconds": round(time.time() - t_start, 1),
            **run.stats,
        }
        (exp_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    finish(accelerator, bar, exp_dir)
    accelerator.print(f"done: {state.step} updates; checkpoints in {exp_dir}")
    return exp_dir


@dataclass
class Run:
    """What build_run sets up: the prepared model, optimizer, scheduler and loader, and the data they read."""

    upstream: torch.nn.Module
    model: SpeakerModel
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    loader: DataLoader
    dataset: TrainDataset
    stats: dict
    dev_trials: list[Trial] | None
    dev_lengths: dict[str, int]


def build_run(cfg: TrainConfig, accelerator: Accelerator, batch_size: int, dev_path: Path) -> Run:
    """Upstream, data, model, optimizer and loader (`batch_size` per device), through one accelerator.prepare."""
    upstream = build_upstream(cfg.model.upstream, cfg.model.upstream_ckpt, cfg.model.upstream_normalize)
    augment = build_augmenter(cfg.data)  # None unless an augmentation flag is set
    upstream.to(accelerator.device)
    finetune = cfg.model.tunes_upstream
    upstream.requires_grad_(cfg.model.upstream_trainable)  # with adapters, they alone train
    if cfg.model.upstream_adapter != "none":
        add_adapters(upstream, cfg.model, check_reached=True)
        accelerator.print(describe_adapters(upstream, cfg.model))
    if finetune:
        disable_layerdrop(upstream)
        if cfg.run.gradient_checkpointing:
            accelerator.print(f"gradient checkpointing on {enable_gradient_checkpointing(upstream)} upstream layers")
    dataset, speakers, stats = load_train_set(
        Path(cfg.data.data_dir), cfg.data.min_secs, cfg.data.max_secs, cfg.run.seed, augment
    )
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes=len(speakers))
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, model, upstream if finetune else None)
    workers = cfg.data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), cfg.run.seed),
        collate_fn=collate_train,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        pin_memory=accelerator.device.type == "cuda",
    )
    # The loader's batches stay on the host: train_step copies them without blocking and keeps their lengths there.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader, device_placement=[True, True, False])
    if finetune:  # a frozen upstream stays outside DDP and outside the checkpoints
        upstream = accelerator.prepare(upstream)
        if cfg.model.upstream_adapter != "none":
            keep_adapters_only(accelerator, upstream)  # and so does an adapted one's frozen base
    if scheduler is not None:
        scheduler = accelerator.prepare(scheduler)
    dev_trials = read_trials_csv(dev_path) if cfg.run.eval_dev and dev_path.is_file() else None
    dev_lengths = {}
    if dev_trials:
        dev_lengths = audio_lengths([p for t in dev_trials for p in (t.wav_path1, t.wav_path2)])
    return Run(upstream, model, optimizer, scheduler, loader, dataset, stats, dev_trials, dev_lengths)


def resume_or_start(
    cfg: TrainConfig, accelerator: Accelerator, model, upstream, exp_dir: Path
) -> tuple[TrainState, Path | None]:
    """The loop position: from --resume_ckpt_dir, else the newest usable checkpoint in exp_dir, else step 0 (from
    --init_from's weights when given).
    The position lives in train_state.json, not registered with Accelerate: its custom_checkpoint_*.pkl would be
    unpickled with weights_only=False on load."""
    if accelerator.is_main_process:
        for stale in remove_interrupted_saves(exp_dir):
            accelerator.print(f"cleaned up {stale.name}, left by a save that was interrupted")
    accelerator.wait_for_everyone()
    state, existing = TrainState(), list_checkpoints(exp_dir)
    resume = Path(cfg.run.resume_ckpt_dir) if cfg.run.resume_ckpt_dir else None
    if resume is None and existing:
        if not cfg.run.auto_resume:
            raise AsvError(
                f"{exp_dir} already has checkpoints (newest {existing[-1][1].name}); "
                "use --auto_resume true to continue, or a new --exp_dir"
            )
        newest = usable(existing, for_resume=True, newest_only=True)  # warns about each corrupt newer one
        if not newest:  # never silently restart from step 0 over a run's checkpoints
            raise AsvError(
                f"none of the {len(existing)} checkpoints in {exp_dir} is usable (warnings above); "
                "move them away to start over, or use a new --exp_dir"
            )
        resume = newest[0][1]
    elif resume is not None:
        verify_checkpoint(resume)
    if resume is None and cfg.run.init_from:
        what = load_initial_weights(
            Path(cfg.run.init_from),
            accelerator.unwrap_model(model),
            accelerator.unwrap_model(upstream) if cfg.model.tunes_upstream else None,
        )
        accelerator.print(f"initialised from {cfg.run.init_from}: {what} (a new optimizer and schedule)")
    if resume is not None:
        check_resumable(load_train_config(resume / "config.yaml"), cfg, resume)
        # The prepared (possibly DDP-wrapped) model's names: what save_state wrote and load_state expects.
        check_weights_match(resume / "model.safetensors", model.state_dict(), "this model")
        accelerator.load_state(str(resume))
        state.load_state_dict(read_train_state(resume))
    return state, resume


def open_logs(cfg: TrainConfig, accelerator: Accelerator, exp_dir: Path, state: TrainState, mode: str) -> JsonLog:
    """config.yaml and train_log.jsonl in exp_dir (log lines past the resumed step dropped), and W&B."""
    log = JsonLog(exp_dir / "train_log.jsonl", enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir / "config.yaml")
        log.drop_after(state.step)
    accelerator.wait_for_everyone()
    start_tracking(accelerator, cfg.run.wandb_project, to_dict(cfg), exp_dir, mode, exp_dir.name, resume=True)
    return log


def print_banner(cfg: TrainConfig, accelerator: Accelerator, run: Run, plan: BatchPlan, state: TrainState, resumed):
    """The banner: what trains on what, the effective batch, and where the run starts."""
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    accelerator.print(
        f"training {cfg.model.upstream} -> {cfg.model.downstream} + {cfg.loss.loss} on {run.stats['utterances']} "
        f"utterances ({run.stats['dropped_short']} dropped as <= {cfg.data.min_secs}s after VAD), "
        f"{run.stats['classes']} speakers; {trainable / 1e6:.2f} M trainable parameters\n"
        f"{plan.describe()}; {len(run.loader)} batches per epoch per process; {cfg.run.total_steps} updates on "
        f"{accelerator.device} (mixed precision: {cfg.run.mixed_precision})"
        + (f"; dev list: {len(run.dev_trials)} trials (opt-in dev selection)" if run.dev_trials else "")
    )
    if resumed:
        accelerator.print(
            f"resumed from {resumed} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        )


def embedder_weights(accelerator: Accelerator, model, finetuned_upstream) -> dict[str, torch.Tensor]:
    """What evaluation loads: featurizer + downstream, and a fine-tuned upstream or its adapters (a frozen upstream,
    an adapted one's base included, is never copied)."""
    weights = accelerator.unwrap_model(model).embedder_state_dict()
    if finetuned_upstream is not None:
        tuned = tuned_state_dict(accelerator.unwrap_model(finetuned_upstream))
        weights |= {f"upstream.{k}": v for k, v in tuned.items()}
    return weights


def finish(accelerator: Accelerator, bar: UpdateBar, exp_dir: Path) -> Path:
    """End the bar, the trackers and the process group after a barrier. The barrier lets gloo's worker thread
    finish destroying the last collectives (they hold Python tensors, so it needs the GIL); without it, tearing
    the group down as train() returns could deadlock against that thread (seen in the 2-process test)."""
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exp_dir


if __name__ == "__main__":
    main(sys.argv[1:])
