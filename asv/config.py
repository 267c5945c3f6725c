"""Typed configs of prepare.py, train.py and evaluate.py, parsed by simple-parsing.

Every default is SuperbASV's `default_config` (s3prl 0.4.18, spec section 3.1) unless its comment says
otherwise. The comment above each field is its `--help` text. Flags are flat (`--upstream`, `--lr`).
Precedence is simple-parsing's: defaults < `--config_path FILE.yaml` < flags. A config file holds only
deltas, nested by section like the config.yaml a run saves (`run: {total_steps: 10}`); a flat key
(`total_steps: 10`) is accepted too and filed under its section. Unknown keys, flags and values outside a
field's choices are `ConfigError`s naming them, raised while parsing, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from simple_parsing import ArgumentParser, DashVariant, choice

from asv.errors import ConfigError, one_line

# The torch.optim classes --optimizer chooses from (asv.optim builds them by name): those in every supported torch
# (tests/test_config.py checks them against the installed one) that step without a closure on dense gradients,
# as the training loop needs (not LBFGS, SparseAdam). Named here, not read from torch.optim: settings load without
# torch (prepare.py's decode workers each import them).
OPTIMIZERS = (
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD"
)  # fmt: skip
WANDB_MODES = ("auto", "online", "offline", "disabled")

# The names --downstream, --loss and --dataset accept. Settings import no runtime code, so the registries that
# map each name to its constructor (asv.models.DOWNSTREAMS, asv.losses.LOSSES, asv.corpora.CORPORA) are built with
# `registry`, which refuses at import a registry whose names differ from these.
DOWNSTREAM_NAMES = ("xvector", "ecapa", "mhfa")
LOSS_NAMES = ("amsoftmax", "aamsoftmax", "subcenter_aam", "softmax")
CORPUS_NAMES = ("demo", "voxceleb1", "voxceleb2", "manifest")
# The names --upstream_adapter accepts (asv/adapters.py builds them).
UPSTREAM_ADAPTERS = ("none", "lora")


def registry(names: tuple[str, ...], entries: dict) -> dict:
    """`entries` (name -> constructor), checked to offer exactly `names`, the choices its flag accepts."""
    if tuple(entries) != names:
        raise TypeError(f"registry {tuple(entries)} differs from the names asv.config accepts {names}: edit both")
    return entries


class _Checked:
    """Values outside a field's choices are refused however they arrive (flag, config file, saved config.yaml)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("custom_args", {}).get("choices")
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"{f.name}: {value!r} is not one of: {', '.join(map(str, allowed))}")


@dataclass
class DataConfig(_Checked):
    """Where the prepared data is and how training audio is read."""

    # Prepared data directory written by prepare.py (train.csv, speakers.json, vad.json, trials/).
    data_dir: str = "data/voxceleb1"
    # Drop training utterances not longer than this after VAD, in seconds.
    min_secs: float = 2.0
    # Randomly crop training utterances longer than this, in seconds (a new crop every epoch).
    max_secs: float = 8.0
    # Most utterances per batch on each device: the batch is the largest divisor of each process's share of
    # --effective_batch not above it (SUPERB: 10; on 2 processes 5 x accumulation 5), or exactly this with
    # --gradient_accumulate.
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
class ModelConfig(_Checked):
    """Upstream, featurizer and downstream."""

    # s3prl hub name of the frozen upstream (`python train.py --list_upstreams` prints all). Default:
    # HuBERT Base, the upstream of s3prl's own verified SuperbASV rerun (5.14 percent EER).
    upstream: str = "hubert"
    # Checkpoint path or URL for *_local / *_url / *_custom upstream names.
    upstream_ckpt: str | None = None
    # Fine-tune the upstream too (SUPERB: frozen). It then trains in train mode at --lr and its
    # weights are saved in every checkpoint.
    upstream_trainable: bool = False
    # Parameter-efficient fine-tuning of the upstream with peft: none (SUPERB: frozen, or all of it with
    # --upstream_trainable) | lora (low-rank adapters on its Linear layers train at --upstream_lr, in train mode
    # with layerdrop off, and are saved in every checkpoint; its own weights stay frozen and are not copied).
    upstream_adapter: str = choice(*UPSTREAM_ADAPTERS, default="none")
    # Rank r of each adapter (used by: lora; peft's default).
    lora_rank: int = 8
    # The adapters' update is scaled by lora_alpha / lora_rank (used by: lora; peft's default, a scale of 1).
    lora_alpha: float = 8.0
    # Dropout on each adapter's input (used by: lora; peft's default). s3prl's wav2vec 2.0 / HuBERT / WavLM attention
    # never passes its input through q/k/v/out_proj, so it needs 0 when those are targets.
    lora_dropout: float = 0.0
    # Linear layers that get adapters, by name or name ending (used by: lora). Default per upstream family, every
    # Linear layer of each transformer layer: q_proj k_proj v_proj out_proj fc1 fc2 for s3prl's wav2vec 2.0 /
    # HuBERT / WavLM; q_proj k_proj v_proj out_proj intermediate_dense output_dense for hf_wav2vec2 / hf_hubert.
    lora_target_modules: list[str] | None = None
    # Layer-normalise each upstream hidden state (S3PRLUpstream `normalize`).
    upstream_normalize: bool = False
    # 0-based hidden states to mix (default: all of them).
    layer_selections: list[int] | None = None
    # Layer-normalise hidden states before the weighted sum (Featurizer `normalize`; SUPERB: off).
    featurizer_normalize: bool = False
    # Downstream model by name (registry asv.models.DOWNSTREAMS): xvector (SUPERB) | ecapa (ECAPA-TDNN) | mhfa
    # (multi-head factorized attentive pooling over two layer weightings of the hidden states, Peng et al. 2022).
    downstream: str = choice(*DOWNSTREAM_NAMES, default="xvector")
    # Speaker embedding size (used by: xvector, ecapa; ECAPA-TDNN papers use 192; mhfa's is --mhfa_embed_dim).
    embed_dim: int = 512
    # Width of the projector, the TDNN stack's input (used by: xvector).
    hidden_size: int = 512
    # Width of TDNN layers 1-4 (used by: xvector; s3prl hard-codes 512).
    tdnn_size: int = 512
    # Width of the last TDNN layer, before statistics pooling (used by: xvector).
    aggregation_size: int = 1500
    # Dropout after each TDNN layer (used by: xvector).
    dropout_p: float = 0.0
    # BatchNorm after each TDNN layer (used by: xvector; ecapa always has it).
    batch_norm: bool = False
    # Channels C of the SE-Res2Blocks (used by: ecapa; the paper's 512 and 1024).
    ecapa_channels: int = 512
    # Attention heads, each pooling the compressed values with its own weights over frames (used by: mhfa; the
    # paper's and BUT's WeSpeaker recipe's 64).
    mhfa_heads: int = 64
    # Size keys and values are compressed to before attention and pooling (used by: mhfa; the paper's 128).
    mhfa_compression_dim: int = 128
    # Speaker embedding size (used by: mhfa; the paper's and BUT's WeSpeaker recipe's 256).
    mhfa_embed_dim: int = 256

    @property
    def tunes_upstream(self) -> bool:
        """Whether the upstream trains (all of it, or its adapters): it then runs with autograd in train mode, and
        what trains of it is saved in every checkpoint."""
        return self.upstream_trainable or self.upstream_adapter != "none"

    def __post_init__(self):
        super().__post_init__()
        if self.upstream_adapter != "none" and self.upstream_trainable:
            raise ConfigError(
                f"--upstream_adapter {self.upstream_adapter} trains adapters on a frozen upstream, "
                "--upstream_trainable true all of its weights: choose one"
            )
        lora = [f.name for f in dataclasses.fields(self) if f.name.startswith("lora_")]
        changed = [n for n in lora if getattr(self, n) != getattr(type(self), n, None)]
        if self.upstream_adapter != "lora" and changed:
            raise ConfigError(f"--{changed[0]} applies to --upstream_adapter lora (this run: {self.upstream_adapter})")
        if self.lora_rank < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                f"--lora_rank {self.lora_rank} --lora_dropout {self.lora_dropout}: needs a rank >= 1 and a dropout in "
                "[0, 1)"
            )
        # mhfa has its own size field (its default differs from the x-vector's, and simple-parsing takes every
        # default from one default instance, so no default can depend on --downstream): a changed --embed_dim
        # with mhfa would silently do nothing.
        if self.downstream == "mhfa" and self.embed_dim != type(self).embed_dim:
            raise ConfigError(
                f"--embed_dim {self.embed_dim} sizes the xvector and ecapa embeddings; mhfa's is --mhfa_embed_dim"
            )


@dataclass
class LossConfig(_Checked):
    """Speaker-classification head."""

    # Loss by name (registry asv.losses.LOSSES): amsoftmax | aamsoftmax | subcenter_aam | softmax.
    loss: str = choice(*LOSS_NAMES, default="amsoftmax")
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
class OptimConfig(_Checked):
    """Optimizer and learning-rate schedule."""

    # torch.optim class name.
    optimizer: str = choice(*OPTIMIZERS, default="AdamW")
    # Learning rate (s3prl's maintainers advise a log-scale sweep per upstream: sweeps/lr.yaml).
    lr: float = 1e-4
    # Weight decay (torch's AdamW default, applied to every trainable tensor as in s3prl).
    weight_decay: float = 0.01
    # More keyword arguments of the optimizer as YAML, e.g. "{momentum: 0.9, nesterov: true}" for SGD.
    optimizer_kwargs: str = "{}"
    # torch.optim.lr_scheduler class name, stepped once per optimizer update; empty = constant LR
    # (SUPERB: its ExponentialLR block is never enabled).
    scheduler: str = ""
    # Keyword arguments of the scheduler as YAML, e.g. "{gamma: 0.9999}".
    scheduler_kwargs: str = "{}"
    # Ramp the learning rate linearly from ~0 over this many updates before --scheduler takes over
    # (0: none, as SUPERB).
    warmup_steps: int = 0
    # Clip the global gradient norm to this value.
    gradient_clipping: float = 1000.0
    # Batches whose gradients are summed before each optimizer update (default: what --effective_batch
    # needs). Setting it fixes the batch at --batch_size: the effective batch is then batch_size x processes
    # x this, labelled in the results when it is not SUPERB's 50.
    gradient_accumulate: int | None = None
    # Utterances per optimizer update over all processes (default: SUPERB's 50, i.e. 10 x 5 on one device,
    # kept on any process count that divides it; train.py stops on one that does not). Another value is
    # labelled in the results as not SUPERB's recipe.
    effective_batch: int | None = None
    # Learning rate of the featurizer's layer weights (default: --lr).
    featurizer_lr: float | None = None
    # Learning rate of the upstream (or its adapters) when it trains: --upstream_trainable or
    # --upstream_adapter (default: --lr).
    upstream_lr: float | None = None

    def __post_init__(self):
        super().__post_init__()
        for name in ("gradient_accumulate", "effective_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} {value}: needs a positive count")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps {self.warmup_steps}: needs 0 or a positive count")
        for name in ("optimizer_kwargs", "scheduler_kwargs"):
            text = getattr(self, name)
            try:
                kwargs = yaml.safe_load(text)
            except yaml.YAMLError as err:
                kwargs = err
            glued = isinstance(kwargs, dict) and any(":" in str(k) and v is None for k, v in kwargs.items())
            if kwargs is not None and (not isinstance(kwargs, dict) or glued):
                raise ConfigError(
                    f"--{name} {text!r} is not a YAML mapping; write it as "
                    '"{name: value, ...}" (a space after each colon)'
                )


@dataclass
class RunConfig(_Checked):
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
    # Start from the weights of another run's checkpoint (exp/<run>/step-<N>): featurizer, downstream, loss
    # head and a fine-tuned upstream; the optimizer, schedule and step start afresh. Staged training
    # (frozen -> joint fine-tuning -> large-margin fine-tuning: configs/beyond_superb/). Ignored once this
    # run has its own checkpoints (it resumes from those).
    init_from: str | None = None
    # Seed for python, numpy, torch, the sampler and the crops.
    seed: int = 0
    # no | fp16 | bf16, for neural upstreams (signal-processing front-ends such as fbank stay fp32).
    # Keep `no` on CPUs: bf16 matmuls there are ~100x slower than fp32.
    mixed_precision: str = choice("no", "fp16", "bf16", default="no")
    # fp32 | bf16 | fp16: autocast the frozen upstream's forward alone (GPUs; fbank-like front-ends stay
    # fp32). Its hidden states are cast back to fp32, so the trained featurizer, downstream and head keep
    # --mixed_precision's precision. Evaluation uses the checkpoint's setting.
    upstream_precision: str = choice("fp32", "bf16", "fp16", default="fp32")
    # torch.compile the featurizer + downstream + head (inductor, dynamic shapes). Opt-in: compiling
    # takes minutes and pays off only on long GPU runs.
    compile: bool = False
    # Recompute upstream layer activations in the backward pass (with --upstream_trainable or
    # --upstream_adapter): less memory.
    gradient_checkpointing: bool = False
    # Abort after this many updates in a row are skipped (non-finite gradients or out-of-memory batches).
    max_consecutive_skips: int = 20
    # At each checkpoint, embed the prepared dev list (trials/dev.csv, prepare.py --dev_speakers) and
    # log dev/eer: the metric W&B sweeps minimise and evaluate.py selects checkpoints by.
    eval_dev: bool = True
    # W&B: auto (online when logged in, else offline) | online | offline | disabled.
    wandb_mode: str = choice(*WANDB_MODES, default="auto")
    # W&B project name.
    wandb_project: str = "superb-asv"


@dataclass
class TrainConfig(_Checked):
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

    def __post_init__(self):
        super().__post_init__()
        if self.model.tunes_upstream and self.run.upstream_precision != "fp32":
            raise ConfigError(
                f"--upstream_precision {self.run.upstream_precision} applies to a frozen upstream; to fine-tune it in "
                f"{self.run.upstream_precision}, use --mixed_precision instead"
            )


@dataclass
class PrepareConfig(_Checked):
    """prepare.py: build train.csv, speakers.json, vad.json and trials/*.csv."""

    # demo (generated here) | voxceleb1 (official layout) | voxceleb2 (dev .m4a, tested on VoxCeleb1) |
    # manifest (any corpus, from your CSV).
    dataset: str = choice(*CORPUS_NAMES, default="demo")
    # Corpus root: voxceleb1 reads DIR/dev/wav and DIR/test/wav; voxceleb2 reads DIR/dev/aac (or DIR/aac);
    # demo generates the corpus there (default data/demo_corpus); manifest resolves relative trial paths against it.
    dataset_root: str | None = None
    # voxceleb2: the VoxCeleb1 root (DIR/test/wav and DIR/dev/wav, or DIR/wav): all of VoxCeleb1 is the test set
    # of a VoxCeleb2-trained model, scored with the cleaned Vox1-O/E/H lists.
    voxceleb1_root: str | None = None
    # voxceleb2: where the .m4a files are decoded once to 16 kHz mono FLAC (default <out_dir>/decoded;
    # 130-175 GB for VoxCeleb2-dev). Files already there are reused, so an interrupted prepare.py resumes.
    decoded_dir: str | None = None
    # Trial lists in VoxCeleb format ('<1|0> <utt1> <utt2>'). voxceleb1 default: voxceleb1_test_v2.txt
    # (SUPERB, 37,720 trials) and veri_test2.txt (cleaned Vox1-O, 37,611); voxceleb2 default: the cleaned
    # veri_test2.txt, list_test_all2.txt and list_test_hard2.txt as voxceleb1_{o,e,h}_clean; each from the
    # corpus root, the cache or the web.
    trials: list[str] | None = None
    # manifest only: CSV with columns wav_path,spk (and optionally id) listing the training utterances.
    train_csv: str | None = None
    # Output directory (default data/<dataset>).
    out_dir: str | None = None
    # Where downloaded trial lists are kept.
    cache_dir: str = "~/.cache/superb-asv"
    # Gain applied before the VAD, in dB (SUPERB's sox `gain -3`); train.py applies the same value.
    gain_db: float = -3.0
    # Processes decoding the audio (lengths, VAD, unusable files) and generating the demo corpus (default: the
    # cores this process may run on, os.sched_getaffinity; saved as given, so prepare.json fits any machine).
    num_workers: int | None = None
    # Redo everything even if the outputs exist (decoded VoxCeleb2 audio is kept: delete --decoded_dir to redo it).
    force: bool = False
    # Opt-in honest model selection, which CHANGES THE TRAINING SET: hold this many training speakers out
    # (a fraction if < 1, else a count) to form trials/dev.csv, on which train.py logs dev/eer and evaluate.py
    # selects the checkpoint. Default 0: every Vox1-dev speaker trains, exactly as SUPERB (its numbers are then
    # comparable to the paper and leaderboard, which select on test). 0.05 holds out 61 of 1,211.
    dev_speakers: float = 0.0
    # Dev trials (half target, half non-target), over at most --dev_utts_per_speaker utterances per speaker.
    dev_trials: int = 10_000
    # Dev utterances kept per held-out speaker (bounds the extra embedding work per checkpoint).
    dev_utts_per_speaker: int = 30
    # Seed of the dev split (and of the demo corpus).
    seed: int = 0
    # demo: number of training speakers.
    demo_train_speakers: int = 80
    # demo: number of test speakers (disjoint from training).
    demo_test_speakers: int = 20
    # demo: recordings (videos, each its own channel) per speaker.
    demo_videos: int = 3
    # demo: utterances per recording.
    demo_utts_per_video: int = 5
    # demo: number of trials (balanced targets / non-targets).
    demo_trials: int = 3000


@dataclass
class EvalConfig(_Checked):
    """evaluate.py: score checkpoints on prepared trial lists."""

    # One checkpoint directory (exp/<run>/step-<N>).
    ckpt_dir: str | None = None
    # A run directory: evaluate all its checkpoints (or --test_ckpt_steps).
    exp_dir: str | None = None
    # With --exp_dir, only these steps (default: every checkpoint).
    test_ckpt_steps: list[int] | None = None
    # Prepared data directory holding trials/*.csv (default: the one the checkpoint was trained on).
    data_dir: str | None = None
    # Prepared trial lists to score, by name (file stem in data_dir/trials; default: all of them).
    trial_names: list[str] | None = None
    # Text trial lists to score as well, without prepare.py: VoxCeleb '<1|0> <wav1> <wav2>' or Kaldi
    # '<wav1> <wav2> target|nontarget' per line (asv/lists.py).
    trials: list[str] | None = None
    # Root for relative paths in --trials files (tried as ROOT/p, ROOT/wav/p, ROOT/test/wav/p, ROOT/dev/wav/p);
    # default: the list's own directory, then the prepared corpus root.
    wav_root: str | None = None
    # Apply the training gain + VAD to test audio (default: as the checkpoint was trained, i.e. raw unless set).
    test_effects: bool | None = None
    # Also report AS-norm scores: top-N cohort of training-speaker mean embeddings (off: SUPERB scores raw cosine).
    asnorm: bool = False
    # AS-norm: cohort scores kept per side (clipped to the number of training speakers).
    asnorm_top_n: int = 300
    # AS-norm: training utterances embedded per cohort speaker (whole utterances, first by id).
    asnorm_utts_per_speaker: int = 3
    # Batch budget in padded samples (items x longest): utterances are length-sorted into batches of at
    # most this much audio (400,000 = 25 s at 16 kHz; raise it on GPUs; 1 = one utterance at a time, as s3prl).
    # Padding never changes an embedding: the upstream runs batch-exact (asv/batch_exact.py).
    eval_max_frames: int = 400_000
    # DataLoader worker processes reading test audio (default: 2 on GPUs; none on a CPU, where reading costs a
    # hundredth of the forward and a forked worker makes the embedding process copy each heap page it writes again).
    num_workers: int | None = None
    # Reuse and write step-<N>/embeddings.npz (false: always re-embed, write nothing).
    cache: bool = True
    # Trial list whose scores fit each checkpoint's cosine -> LLR calibration (a prepared list name or a
    # text trial list file, scored too). Default: the held-out dev list when it is scored; 'none': off. Cllr and
    # actDCF are reported on every other list, never on this one (they would not be held-out there).
    calibration_list: str | None = None
    # Let off-schedule checkpoints (saved at a preemption signal, at a last step that is no multiple of
    # save_step, or as step 0 by --save_initial) compete for best_result.json and the dev selection. Default: only
    # the scheduled saves compete, as in SUPERB's best over its 20 checkpoints; the others are scored either way.
    include_off_schedule: bool = False
    # Write a self-contained model directory here (weights, config, calibration, model card; asv/modeldir.py)
    # of --ckpt_dir's checkpoint, or with --exp_dir of the checkpoint selected on the dev list.
    export_model: str | None = None
    # Write DET curves, score histograms and layer-weight plots (PNG, and to W&B).
    plots: bool = True
    # Where results go (default: <exp_dir>/evaluate).
    out_dir: str | None = None
    # W&B: auto | online | offline | disabled; EER is logged at each checkpoint's step.
    wandb_mode: str = choice(*WANDB_MODES, default="auto")


class _Parser(ArgumentParser):
    """argparse reports a bad flag with its whole usage block and exits; here it is one ConfigError line."""

    def error(self, message: str):
        raise ConfigError(f"{message} (--help lists every flag and its choices)")


def parse(config_cls, argv: list[str] | None = None, extra: dict | None = None):
    """Parse `argv` into `config_cls`: defaults < --config_path YAML < flags. Bad input is a ConfigError.

    `extra` adds plain argparse flags that are actions rather than settings (e.g. --list_upstreams).
    Returns (config, dict_of_extras).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(add_option_string_dash_variants=DashVariant.UNDERSCORE)
    parser.add_argument(
        "--config_path", default=None, metavar="FILE", help="YAML file of config deltas (flags override it)"
    )
    parser.add_arguments(config_cls, dest="cfg")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    known, _ = _ConfigPathOnly().parse_known_args(argv)
    if known.config_path:
        path = known.config_path
        parser.set_defaults(cfg=_nested(_read_yaml(path), config_cls, path))
    args = parser.parse_args(argv)
    extras = {k: v for k, v in vars(args).items() if k not in ("cfg", "config_path")}
    return args.cfg, extras


class _ConfigPathOnly(_Parser):
    """Reads --config_path ahead of the real parse, so the file's values can become the parser's defaults."""

    def __init__(self):
        super().__init__(add_help=False)
        self.add_argument("--config_path", default=None)


def _read_yaml(path: str) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def _nested(data: dict, config_cls, path: str) -> dict:
    """File flat keys (`lr: 0.1`) under their section (`optim: {lr: 0.1}`); the rest is simple-parsing's."""
    sections = {
        f.name: f.default_factory for f in dataclasses.fields(config_cls) if dataclasses.is_dataclass(f.default_factory)
    }
    owner = {f.name: name for name, cls in sections.items() for f in dataclasses.fields(cls)}
    nested: dict = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])}
            for sub in value:
                if sub not in names:
                    raise ConfigError(f"{path}: unknown key '{key}.{sub}' (valid: {', '.join(sorted(names))})")
            nested.setdefault(key, {}).update(value)
        elif key in owner:
            nested.setdefault(owner[key], {})[key] = value
        elif key in {f.name for f in dataclasses.fields(config_cls)} and key not in sections:
            nested[key] = value
        else:
            raise ConfigError(f"{path}: unknown key '{key}'")
    for name, values in nested.items():  # choices checked here too, with the file named
        if name in sections:
            _check_choices(sections[name], values, path, name)
    if not sections:
        _check_choices(config_cls, nested, path, None)
    return nested


def _check_choices(cls, values: dict, path: str, section: str | None) -> None:
    for f in dataclasses.fields(cls):
        allowed = f.metadata.get("custom_args", {}).get("choices")
        if allowed and f.name in values and values[f.name] not in allowed:
            key = f"{section}.{f.name}" if section else f.name
            raise ConfigError(f"{path}: {key}: {values[f.name]!r} is not one of: {', '.join(map(str, allowed))}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_train_config(path: Path) -> TrainConfig:
    """Rebuild a TrainConfig from a saved config.yaml (evaluation and resume never trust their own flags)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
        sections = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{name: cls(**(data.get(name) or {})) for name, cls in sections.items()})
    except (OSError, TypeError, ValueError, AttributeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} is not a train.py config ({one_line(err)})") from None
