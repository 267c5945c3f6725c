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
import netrc
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from asv.augment import AugmentError, build_augmenter
from asv.config import TrainConfig, load_train_config, parse, save_config, to_dict
from asv.data import EpochSampler, collate_train, load_train_set
from asv.models import build_speaker_model
from asv.upstream import WEIGHT_FREE, UpstreamError, build_upstream, list_upstreams, upstream_forward


class TrainState:
    """Loop position, checkpointed with Accelerate's state (register_for_checkpointing)."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = d["step"], d["epoch"], d["batch_in_epoch"]


def wandb_mode(requested: str) -> str:
    """'auto' means online for a logged-in user (API key in the environment or ~/.netrc), else offline."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def build_optimizer_and_scheduler(optim_cfg, modules: list[torch.nn.Module]):
    if not hasattr(torch.optim, optim_cfg.optimizer):
        raise ValueError(f"--optimizer {optim_cfg.optimizer} is not a torch.optim class")
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = getattr(torch.optim, optim_cfg.optimizer)(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    scheduler = None
    if optim_cfg.scheduler:
        if not hasattr(torch.optim.lr_scheduler, optim_cfg.scheduler):
            raise ValueError(f"--scheduler {optim_cfg.scheduler} is not a torch.optim.lr_scheduler class")
        kwargs = yaml.safe_load(optim_cfg.scheduler_kwargs) or {}
        scheduler = getattr(torch.optim.lr_scheduler, optim_cfg.scheduler)(optimizer, **kwargs)
    return optimizer, scheduler


def list_checkpoints(exp_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, dir), oldest first. train_state.json is written last, so a
    directory without it is an interrupted save and is ignored; the step is read from it, not the name."""
    found = []
    for d in Path(exp_dir).glob("step-*"):
        marker = d / "train_state.json"
        if marker.is_file():
            found.append((json.loads(marker.read_text())["step"], d))
    return sorted(found)


def save_checkpoint(accelerator, model, upstream, cfg: TrainConfig, state: TrainState, exp_dir: Path) -> Path:
    """Write exp_dir/step-<N>/ through a temporary directory so a crash never leaves a half checkpoint."""
    final = exp_dir / f"step-{state.step}"
    tmp = exp_dir / f".tmp-step-{state.step}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model (trainable parts only), optimizer, scheduler, RNG, TrainState
    accelerator.wait_for_everyone()  # every rank has written its RNG state before the rename
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).embedder_state_dict()
        if cfg.model.upstream_trainable:  # a fine-tuned upstream is part of the embedder
            weights.update({f"upstream.{k}": v for k, v in accelerator.unwrap_model(upstream).state_dict().items()})
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "embedder.safetensors")
        save_config(cfg, tmp / "config.yaml")
        (tmp / "train_state.json").write_text(json.dumps(state.state_dict()))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if cfg.run.keep_num_ckpts:
            for _, old in list_checkpoints(exp_dir)[: -cfg.run.keep_num_ckpts]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


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
    mode = wandb_mode(cfg.run.wandb_mode)
    accelerator = Accelerator(
        mixed_precision=cfg.run.mixed_precision,
        # Accumulation runs across epoch ends (s3prl counts backward passes globally), so an update
        # always sums exactly gradient_accumulate batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.optim.gradient_accumulate, sync_with_dataloader=False
        ),
        # We step the scheduler once per update ourselves; Accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
        log_with=None if mode == "disabled" else "wandb",
        project_dir=str(exp_dir),
    )
    set_seed(cfg.run.seed)

    # ---- data, model, optimizer
    try:
        upstream = build_upstream(cfg.model.upstream, cfg.model.upstream_ckpt, cfg.model.upstream_normalize)
        augment = build_augmenter(cfg.data)  # None unless an augmentation flag is set
    except (UpstreamError, AugmentError) as err:
        raise SystemExit(f"error: {err}") from None
    upstream.to(accelerator.device)
    finetune = cfg.model.upstream_trainable
    upstream.requires_grad_(finetune)
    dataset, speakers, stats = load_train_set(
        Path(cfg.data.data_dir), cfg.data.min_secs, cfg.data.max_secs, cfg.run.seed, augment
    )
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes=len(speakers))
    optimizer, scheduler = build_optimizer_and_scheduler(cfg.optim, [model, upstream] if finetune else [model])
    sampler = EpochSampler(len(dataset), cfg.run.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        collate_fn=collate_train,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if finetune:  # a frozen upstream stays outside DDP and outside the checkpoints
        upstream = accelerator.prepare(upstream)
    if scheduler is not None:
        scheduler = accelerator.prepare(scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # ---- resume: an explicit directory, else the newest complete checkpoint in exp_dir
    existing = list_checkpoints(exp_dir)
    resume = Path(cfg.run.resume_ckpt_dir) if cfg.run.resume_ckpt_dir else None
    if resume is None and existing:
        if not cfg.run.auto_resume:
            raise SystemExit(
                f"error: {exp_dir} already has checkpoints (newest {existing[-1][1].name}); "
                "use --auto_resume true to continue, or a new --exp_dir"
            )
        resume = existing[-1][1]
    if resume is not None:
        if not (resume / "train_state.json").is_file():
            raise SystemExit(f"error: {resume} is not a complete checkpoint (no train_state.json)")
        check_resumable(load_train_config(resume / "config.yaml"), cfg, resume)
        accelerator.load_state(str(resume))
        accelerator.print(
            f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        )

    if accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, exp_dir / "config.yaml")
    run_id_file = exp_dir / "wandb_id.txt"
    if accelerator.is_main_process and not run_id_file.exists():
        run_id_file.write_text(f"{exp_dir.name}-{int(time.time())}")
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
    effective = cfg.data.batch_size * accelerator.num_processes * cfg.optim.gradient_accumulate
    accelerator.print(
        f"training {cfg.model.upstream} -> {cfg.model.downstream} + {cfg.loss.loss} "
        f"on {stats['utterances']} utterances "
        f"({stats['dropped_short']} dropped as <= {cfg.data.min_secs}s after VAD), {stats['classes']} speakers; "
        f"{num_trainable / 1e6:.2f} M trainable parameters\n"
        f"effective batch {effective} = {cfg.data.batch_size} per device x {accelerator.num_processes} processes x "
        f"{cfg.optim.gradient_accumulate} accumulation; {len(loader)} batches per epoch per process; "
        f"{cfg.run.total_steps} updates on {accelerator.device} (mixed precision: {cfg.run.mixed_precision})"
    )
    if cfg.run.save_initial and state.step == 0 and resume is None:
        save_checkpoint(accelerator, model, upstream, cfg, state, exp_dir)

    # ---- the loop: one optimizer update every gradient_accumulate batches
    # bf16/fp16 only pays off for neural upstreams; signal-processing front-ends stay in fp32.
    upstream_autocast = cfg.model.upstream not in WEIGHT_FREE
    log_path = exp_dir / "train_log.jsonl"
    sums = torch.zeros(3, device=accelerator.device)  # loss, correct, count since the last log
    skipped_updates, t_log, t_start, last_saved = 0, time.time(), time.time(), state.step
    model.train()
    upstream.train(finetune)
    head = accelerator.unwrap_model(model).head  # its margin schedule follows the global step
    while state.step < cfg.run.total_steps:
        loader.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for wav, wav_len, labels in epoch_loader:
            state.batch_in_epoch += 1
            head.set_step(state.step)
            with accelerator.accumulate(model, *([upstream] if finetune else [])):
                with accelerator.autocast() if upstream_autocast else torch.autocast(wav.device.type, enabled=False):
                    if finetune:
                        hidden, hidden_len = upstream(wav, wav_len)
                    else:
                        hidden, hidden_len = upstream_forward(upstream, wav, wav_len)
                loss, logits = model(hidden, hidden_len, labels)
                accelerator.backward(loss)
                sums += torch.stack(
                    [
                        loss.detach().float() * len(labels),
                        (logits.argmax(-1) == labels).sum().float(),
                        torch.tensor(float(len(labels)), device=sums.device),
                    ]
                )
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], cfg.optim.gradient_clipping
                    )
                    # s3prl skips the update when the gradient is not finite; so do we, and count it.
                    if torch.isfinite(grad_norm):
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                    else:
                        skipped_updates += 1
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            state.step += 1

            if state.step % cfg.run.log_step == 0 or state.step == cfg.run.total_steps:
                totals = accelerator.reduce(sums, reduction="sum")
                lr = optimizer.param_groups[0]["lr"]
                record = {
                    "train/loss": (totals[0] / totals[2]).item(),
                    "train/acc": (totals[1] / totals[2]).item(),
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/skipped_updates": skipped_updates,
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
                save_checkpoint(accelerator, model, upstream, cfg, state, exp_dir)
                last_saved = state.step
            if state.step >= cfg.run.total_steps:
                break
        else:  # the epoch ran out before total_steps: next epoch, from its first batch
            state.epoch += 1
            state.batch_in_epoch = 0

    if last_saved != state.step and state.step > 0:
        save_checkpoint(accelerator, model, upstream, cfg, state, exp_dir)
    if accelerator.is_main_process:
        final = list_checkpoints(exp_dir)[-1][1]
        shutil.copy(final / "embedder.safetensors", exp_dir / "embedder.safetensors")
        (exp_dir / "train_summary.json").write_text(
            json.dumps(
                {
                    "steps": state.step,
                    "skipped_updates": skipped_updates,
                    "train_seconds": round(time.time() - t_start, 1),
                    **stats,
                },
                indent=1,
            )
        )
    accelerator.end_training()
    accelerator.print(f"done: {state.step} updates; checkpoints in {exp_dir}")
    return exp_dir


def main(argv: list[str] | None = None) -> Path | None:
    cfg, extra = parse(
        TrainConfig,
        argv,
        extra={"--list_upstreams": dict(action="store_true", help="print every s3prl upstream name and exit")},
    )
    if extra["list_upstreams"]:
        print("\n".join(list_upstreams()))
        return None
    return train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
