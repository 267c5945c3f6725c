"""Typed configs shared by prepare.py, train.py and evaluate.py.

Every default is SuperbASV's `default_config` (s3prl 0.4.18, spec section 3.1) unless its comment says
otherwise. The comment above each field is its `--help` text. Flags are flat (`--upstream`, `--lr`);
`--config_path FILE.yaml` sets defaults that flags override; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from simple_parsing import ArgumentParser, DashVariant


@dataclass
class DataConfig:
    """Where the prepared data is and how training audio is read."""

    # Prepared data directory written by prepare.py (train.csv, speakers.json, vad.json, trials/).
    data_dir: str = "data/voxceleb1"
    # Drop training utterances not longer than this after VAD, in seconds.
    min_secs: float = 2.0
    # Randomly crop training utterances longer than this, in seconds (a new crop every epoch).
    max_secs: float = 8.0
    # Utterances per batch on each device.
    batch_size: int = 10
    # DataLoader worker processes per device (s3prl: 6; 0 loads in the main process).
    num_workers: int = 2
    # Batches each worker loads ahead, so reading and VAD-cropping stay hidden behind the model.
    prefetch_factor: int = 4
    # Also apply the training gain and VAD to test audio, as the SUPERB paper's legacy recipe did
    # (s3prl's current SuperbASV scores raw audio: the default).
    test_effects: bool = False
    # Augmentation is off by default (SUPERB trains on clean audio). Directory of noise .wav files,
    # searched recursively (e.g. MUSAN's noise/ music/ speech/), added at a random SNR.
    noise_dir: str | None = None
    # Lowest SNR of the added noise, in dB (drawn uniformly between the two; NeMo: 0 to 15).
    noise_snr_min_db: float = 0.0
    # Highest SNR of the added noise, in dB.
    noise_snr_max_db: float = 15.0
    # Directory of room impulse response .wav files, searched recursively (e.g. RIRS_NOISES/simulated_rirs).
    rir_dir: str | None = None
    # Probability of reverberating, and independently of adding noise, to each training crop (WeSpeaker: 0.6).
    aug_prob: float = 0.6
    # Speed perturbation: play each training utterance at 0.9, 1.0 or 1.1 times speed (uniformly), same speaker.
    speed_perturb: bool = False


@dataclass
class ModelConfig:
    """Upstream, featurizer and downstream."""

    # s3prl hub name of the frozen upstream (`python train.py --list_upstreams` prints all). Default:
    # HuBERT Base, the upstream of s3prl's own verified SuperbASV rerun (5.14 percent EER).
    upstream: str = "hubert"
    # Checkpoint path or URL for *_local / *_url / *_custom upstream names.
    upstream_ckpt: str | None = None
    # Fine-tune the upstream too (SUPERB: frozen). It then trains in train mode at --lr and its
    # weights are saved in every checkpoint.
    upstream_trainable: bool = False
    # Layer-normalise each upstream hidden state (S3PRLUpstream `normalize`).
    upstream_normalize: bool = False
    # 0-based hidden states to mix (default: all of them).
    layer_selections: list[int] | None = None
    # Layer-normalise hidden states before the weighted sum (Featurizer `normalize`; SUPERB: off).
    featurizer_normalize: bool = False
    # Downstream model by name (registry asv.models.DOWNSTREAMS): xvector (SUPERB) | ecapa (ECAPA-TDNN).
    downstream: str = "xvector"
    # Speaker embedding size (ECAPA-TDNN papers use 192).
    embed_dim: int = 512
    # Width of the projector and TDNN layers (used by: xvector).
    hidden_size: int = 512
    # Width of the last TDNN layer, before statistics pooling (used by: xvector).
    aggregation_size: int = 1500
    # Dropout after each TDNN layer (used by: xvector).
    dropout_p: float = 0.0
    # BatchNorm after each TDNN layer (used by: xvector; ecapa always has it).
    batch_norm: bool = False
    # Channels C of the SE-Res2Blocks (used by: ecapa; the paper's 512 and 1024).
    ecapa_channels: int = 512


@dataclass
class LossConfig:
    """Speaker-classification head."""

    # Loss by name (registry asv.losses.LOSSES): amsoftmax | aamsoftmax | subcenter_aam | softmax.
    loss: str = "amsoftmax"
    # Margin: additive cosine margin for amsoftmax, additive angle in radians for aamsoftmax and
    # subcenter_aam (s3prl's legacy AAM used 0.3, WeSpeaker 0.2).
    margin: float = 0.4
    # Logit scale (used by: amsoftmax, aamsoftmax, subcenter_aam).
    scale: float = 30.0
    # Apply the angular margin only where the target cosine is positive (used by: aamsoftmax, subcenter_aam).
    easy_margin: bool = False
    # Centres per speaker (used by: subcenter_aam; WeSpeaker and ESPnet use 3).
    subcenters: int = 3
    # Ramp the margin linearly from 0 to --margin over this many optimizer updates (0: fixed margin;
    # used by: amsoftmax, aamsoftmax, subcenter_aam).
    margin_warmup_steps: int = 0


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    # torch.optim class name.
    optimizer: str = "AdamW"
    # Learning rate (s3prl's maintainers advise a log-scale sweep per upstream: sweeps/lr.yaml).
    lr: float = 1e-4
    # Weight decay (torch's AdamW default, applied to every trainable tensor as in s3prl).
    weight_decay: float = 0.01
    # torch.optim.lr_scheduler class name, stepped once per optimizer update; empty = constant LR
    # (SUPERB: its ExponentialLR block is never enabled).
    scheduler: str = ""
    # Keyword arguments of the scheduler as YAML, e.g. "{gamma: 0.9999}".
    scheduler_kwargs: str = "{}"
    # Clip the global gradient norm to this value.
    gradient_clipping: float = 1000.0
    # Batches whose gradients are summed before each optimizer update.
    gradient_accumulate: int = 5
    # Keep this many utterances per update on any number of devices: sets --gradient_accumulate to
    # effective_batch / (batch_size x processes), which must divide evenly (SUPERB: 50 = 10 x 1 x 5).
    effective_batch: int | None = None
    # Learning rate of the featurizer's layer weights (default: --lr).
    featurizer_lr: float | None = None
    # Learning rate of the upstream when --upstream_trainable (default: --lr).
    upstream_lr: float | None = None


@dataclass
class RunConfig:
    """Loop length, checkpoints, logging and hardware."""

    # Run directory: checkpoints step-<N>/, config.yaml, W&B files.
    exp_dir: str = "exp/superb_asv"
    # Optimizer updates to train for.
    total_steps: int = 200_000
    # Log training loss, accuracy, LR and featurizer weights every this many updates.
    log_step: int = 500
    # Save a checkpoint every this many updates.
    save_step: int = 10_000
    # Keep only the newest N checkpoints (default: keep all).
    keep_num_ckpts: int | None = None
    # Also save the untrained model as step-0 (a reference point for evaluation).
    save_initial: bool = False
    # Resume from the newest complete checkpoint in exp_dir if there is one.
    auto_resume: bool = True
    # Resume from this checkpoint directory instead.
    resume_ckpt_dir: str | None = None
    # Seed for python, numpy, torch, the sampler and the crops.
    seed: int = 0
    # no | fp16 | bf16, for neural upstreams (signal-processing front-ends such as fbank stay fp32).
    # Keep `no` on CPUs: bf16 matmuls there are ~100x slower than fp32.
    mixed_precision: str = "no"
    # fp32 | bf16 | fp16: autocast the frozen upstream's forward alone (GPUs; fbank-like front-ends stay
    # fp32). Its hidden states are cast back to fp32, so the trained featurizer, downstream and head keep
    # --mixed_precision's precision. Evaluation uses the checkpoint's setting.
    upstream_precision: str = "fp32"
    # torch.compile the featurizer + downstream + head (inductor, dynamic shapes). Opt-in: compiling
    # takes minutes and pays off only on long GPU runs.
    compile: bool = False
    # Recompute upstream layer activations in the backward pass (with --upstream_trainable): less memory.
    gradient_checkpointing: bool = False
    # Abort after this many updates in a row are skipped (non-finite gradients or out-of-memory batches).
    max_consecutive_skips: int = 20
    # At each checkpoint, embed the prepared dev list (trials/dev.csv, prepare.py --dev_speakers) and
    # log dev/eer: the metric W&B sweeps minimise and evaluate.py selects checkpoints by.
    eval_dev: bool = True
    # W&B: auto (online when logged in, else offline) | online | offline | disabled.
    wandb_mode: str = "auto"
    # W&B project name.
    wandb_project: str = "superb-asv"


@dataclass
class TrainConfig:
    """train.py: SUPERB ASV training. Defaults are SuperbASV.default_config (s3prl 0.4.18):
    build_dataset.train.{min_secs,max_secs} -> --min_secs --max_secs; build_batch_sampler.train.batch_size
    -> --batch_size (test batch size: evaluate.py); build_upstream.{name,path_or_url,normalize} -> --upstream
    --upstream_ckpt --upstream_normalize; build_featurizer.{layer_selections,normalize} -> --layer_selections
    --featurizer_normalize; build_model.upstream_trainable -> --upstream_trainable; build_downstream -> --downstream
    --embed_dim --hidden_size --aggregation_size --dropout_p --batch_norm; build_task.{loss_type,loss_conf} ->
    --loss --margin --scale; build_optimizer.{name,conf.lr} -> --optimizer --lr; build_scheduler.{name,gamma} ->
    --scheduler --scheduler_kwargs; train.{total_steps,log_step,save_step,gradient_clipping,gradient_accumulate,
    auto_resume,resume_ckpt_dir,keep_num_ckpts} -> same names; target_dir -> --exp_dir; seed -> --seed.
    train.eval_step / valid_metric / valid_higher_better: ASV has no in-training validation (evaluate.py scores
    checkpoints); prepare_data.dataset_root and cache_dir: prepare.py; test_ckpt_steps: evaluate.py.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def parse(config_cls, argv: list[str] | None = None, extra: dict | None = None):
    """Parse `argv` into `config_cls`: defaults < --config_path YAML < flags. Unknown keys are errors.

    The YAML may be nested by section (`run: {total_steps: 10}`) or flat (`total_steps: 10`); it only
    holds deltas. `extra` adds plain argparse flags that are actions rather than settings (e.g.
    --list_upstreams). Returns (config, dict_of_extras).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = _pop_config_path(argv)
    defaults = load_yaml_config(config_path, config_cls) if config_path else config_cls()
    parser = ArgumentParser(add_option_string_dash_variants=DashVariant.UNDERSCORE)
    parser.add_argument(
        "--config_path", default=None, metavar="FILE", help="YAML file of config deltas (flags override it)"
    )
    parser.add_arguments(config_cls, dest="cfg", default=defaults)
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)  # argparse exits with a one-line error on unknown flags
    extras = {k: v for k, v in vars(args).items() if k not in ("cfg", "config_path")}
    return args.cfg, extras


def _pop_config_path(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config_path="):
            del argv[i]
            return a.split("=", 1)[1]
        if a == "--config_path" and i + 1 < len(argv):
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
    return None


def load_yaml_config(path: str, config_cls):
    """`config_cls()` with the YAML's values applied; an unknown key is an error naming file and key."""
    if not Path(path).is_file():
        raise SystemExit(f"error: config file {path} does not exist")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of config keys")
    sections = {f.name: _cls(f) for f in dataclasses.fields(config_cls) if dataclasses.is_dataclass(_cls(f))}
    values: dict[str, dict] = {name: {} for name in sections}
    top: dict = {}
    owner = {f.name: name for name, cls in sections.items() for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])}
            for sub, v in value.items():
                if sub not in names:
                    raise SystemExit(f"error: {path}: unknown key '{key}.{sub}' (valid: {', '.join(sorted(names))})")
                values[key][sub] = v
        elif key in owner:
            values[owner[key]][key] = value
        elif key in {f.name for f in dataclasses.fields(config_cls)}:
            top[key] = value
        else:
            raise SystemExit(f"error: {path}: unknown key '{key}'")
    try:
        return config_cls(**top, **{name: cls(**values[name]) for name, cls in sections.items()})
    except TypeError as err:
        raise SystemExit(f"error: {path}: {err}") from None


def _cls(f):
    if f is None:
        return None
    return f.default_factory if f.default_factory is not dataclasses.MISSING else f.type


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_train_config(path: Path) -> TrainConfig:
    """Rebuild a TrainConfig from a saved config.yaml (evaluation and resume never trust their own flags)."""
    data = yaml.safe_load(Path(path).read_text())
    sections = {f.name: _cls(f) for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: cls(**data.get(name, {})) for name, cls in sections.items()})


__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "parse",
    "save_config",
    "load_train_config",
    "to_dict",
]
