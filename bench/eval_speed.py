"""Evaluation speed, side by side in one process: s3prl's own SuperbASV stage 3 vs our evaluate.py machinery.

    make bench                                        # setup + both benches
    .venv-bench/bin/python -m bench.eval_speed         # this one (a few minutes)
    .venv-bench/bin/python -m bench.eval_speed --quick # smoke run (300 trials, one repetition)
    .venv-bench/bin/python -m bench.eval_speed --ckpt_dir exp/<run>/step-<N>   # trained weights

Same data (the demo trial list's unique test utterances, raw audio as SuperbASV scores them), same
upstream (fbank), the same x-vector weights in both models (ours are copied into s3prl's SuperbXvector
and AM-softmax, whose parameter names match), 2 DataLoader workers each. s3prl runs its real stage 3
(`SuperbASV().run(start=3)`: batch 1, per-trial cosine loop); ours runs Embedder + length_sorted_batches
+ embed_all (length-sorted batches of at most --eval_max_frames samples, sharded over processes: one
here) + cosine_scores + metrics. Each side's time covers building the model, reading the audio and
scoring the trials. The floor is our model's forward alone on pre-loaded, pre-batched audio. Both EERs
are printed (same weights: they must agree within 0.1 point). Last line: `ratio=<ours/s3prl>` (utterances/s).
"""

from __future__ import annotations

import os

# s3prl's test loop iterates a tqdm bar per checkpoint and per trial; a disabled bar still iterates.
# (Not in training: s3prl's training loop counts its steps on the bar itself, see bench/train_speed.py.)
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench import s3prl_shim  # noqa: E402
from bench.common import DATA_DIR, TRIAL_LIST, WORK, machine_banner, prepare_demo, run_child, s3prl_view  # noqa: E402

s3prl_shim.install()  # before the first s3prl / asv.upstream import

from accelerate import Accelerator  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from s3prl.problem import SuperbASV  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from asv.config import TrainConfig, load_train_config, parse, save_config  # noqa: E402
from asv.datasets import EvalDataset, collate_eval  # noqa: E402

# Our evaluation machinery (asv/extract.py), imported in this one place.
from asv.extract import Embedder, audio_lengths, embed_all, length_sorted_batches  # noqa: E402
from asv.manifest import read_trials_csv, unique_utterances  # noqa: E402
from asv.metrics import metrics  # noqa: E402
from asv.models import build_speaker_model  # noqa: E402
from asv.scoring import cosine_scores  # noqa: E402
from asv.upstream import build_upstream  # noqa: E402

WORKERS = 2
# Issue targets on this CPU class (2-core Zen 3): >= 1.6x s3prl, and within 1.25x of the floor.
TARGET_VS_S3PRL, TARGET_VS_FLOOR = 1.6, 1.25
EER_TOLERANCE = 0.1  # percentage points, for the same weights


def our_checkpoint(work: Path, ckpt_dir: str | None) -> tuple[Path, TrainConfig, dict]:
    """A checkpoint directory evaluate.py's Embedder reads (config.yaml + embedder.safetensors), and its
    full state (with the AM-softmax head). Default: SUPERB's model on fbank, seeded random weights."""
    if ckpt_dir:
        cfg = load_train_config(Path(ckpt_dir) / "config.yaml")
        state = load_file(Path(ckpt_dir) / "embedder.safetensors")
        head_file = Path(ckpt_dir) / "model.safetensors"  # the head only matters for the copy's completeness
        if head_file.is_file():
            state.update({k: v for k, v in load_file(head_file).items() if k.startswith("head.")})
    else:
        cfg, _ = parse(TrainConfig, ["--upstream", "fbank", "--data_dir", str(DATA_DIR)])
        num_classes = len(read_speakers())
        torch.manual_seed(0)
        model = build_speaker_model(cfg.model, cfg.loss, build_upstream("fbank"), num_classes)
        state = model.state_dict()
    if cfg.model.upstream != "fbank":
        raise SystemExit(f"error: the bench compares on fbank; {ckpt_dir} was trained on {cfg.model.upstream}")
    out = work / "ours_ckpt"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}, out / "embedder.safetensors")
    return out, cfg, state


def read_speakers() -> dict:
    return json.loads((DATA_DIR / "speakers.json").read_text())


def s3prl_checkpoint(problem: SuperbASV, target: Path, cfg: TrainConfig, state: dict) -> None:
    """target/train/step_0 in s3prl's checkpoint format (model/ + task/), holding our weights."""
    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    m = cfg.model
    model_args = dict(
        build_model=dict(upstream_trainable=False),
        model_output_size=len(encoder),
        build_upstream=dict(name="fbank"),
        build_featurizer=dict(layer_selections=m.layer_selections, normalize=m.featurizer_normalize),
        build_downstream=dict(
            output_size=m.embed_dim,
            hidden_size=m.hidden_size,
            aggregation_size=m.aggregation_size,
            dropout_p=m.dropout_p,
            batch_norm=m.batch_norm,
        ),
    )
    model = problem.build_model(**model_args)
    # Our SpeakerModel's featurizer/downstream/head are s3prl-named; strict loads prove the copy is complete.
    for name, module in (("featurizer", model.featurizer), ("downstream", model.downstream)):
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
    task_args = dict(
        build_task=dict(loss_type=cfg.loss.loss, loss_conf=dict(margin=cfg.loss.margin, scale=cfg.loss.scale)),
        encoder=encoder,
    )
    task = problem.build_task(model=model, **task_args)
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    if head and head["W"].shape == task.loss.W.shape:
        task.loss.load_state_dict(head)
    ckpt = target / "train" / "step_0"
    shutil.rmtree(ckpt, ignore_errors=True)
    problem.save_model({}, ckpt / "model", model_args, model)
    problem.save_task({}, ckpt / "task", task_args, task)


def time_s3prl(problem: SuperbASV, target: Path, cache: Path, root: Path) -> tuple[float, float]:
    """(seconds, EER %) of s3prl's stage 3 (+ its trivial stage-4 report) on step_0, as main() would run it."""
    overrides = dict(
        target_dir=str(target),
        cache_dir=str(cache),
        start=3,
        device="cpu",
        num_workers=WORKERS,
        test_ckpt_steps=[0],
        prepare_data=dict(dataset_root=str(root)),
        build_upstream=dict(name="fbank"),
    )
    config = OmegaConf.merge(OmegaConf.create(problem.default_config()), overrides)
    config = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    t0 = time.perf_counter()
    problem.run(**config)
    seconds = time.perf_counter() - t0
    result = yaml.safe_load((target / "evaluate/test_trial/step_0/result.yaml").read_text())
    return seconds, 100.0 * result["EER"]


def time_ours(ckpt: Path, utts, trials, accelerator, max_frames: int) -> tuple[float, float]:
    """(seconds, EER %) of our evaluation of one checkpoint: what evaluate.py's main does per checkpoint."""
    t0 = time.perf_counter()
    embedder = Embedder(ckpt, accelerator.device, {})
    lengths = audio_lengths([p for _, p in utts])
    batches = length_sorted_batches([lengths[p] for _, p in utts], max_frames)
    dataset = EvalDataset(utts, effects=False, min_samples=embedder.min_samples)
    emb = embed_all(embedder, dataset, batches, accelerator, WORKERS)
    index = {p: i for i, (_, p) in enumerate(utts)}
    scores = cosine_scores(emb[[index[t.wav_path1] for t in trials]], emb[[index[t.wav_path2] for t in trials]])
    eer = metrics(scores, np.array([t.label for t in trials]))["eer"]
    return time.perf_counter() - t0, eer


def preload(ckpt: Path, utts, accelerator, max_frames: int):
    """(embedder, batches) for the floor: every test utterance read and collated in our batches up front."""
    embedder = Embedder(ckpt, accelerator.device, {})
    dataset = EvalDataset(utts, effects=False, min_samples=embedder.min_samples)
    lengths = audio_lengths([p for _, p in utts])
    batches = length_sorted_batches([lengths[p] for _, p in utts], max_frames)
    loaded = [collate_eval([dataset[i] for i in b]) for b in batches]
    embedder(loaded[0][1], loaded[0][2])  # warm-up
    return embedder, loaded


def time_floor(embedder, loaded) -> float:
    """Seconds of our model's forward over all pre-loaded test batches (no data loading at all)."""
    t0 = time.perf_counter()
    for _, wav, wav_len in loaded:
        embedder(wav, wav_len)
    return time.perf_counter() - t0


def resolve_ckpt(path: str) -> str:
    """A step-<N> checkpoint directory, or a run directory (its newest checkpoint)."""
    from asv.rundir import list_checkpoints

    if (Path(path) / "train_state.json").is_file():
        return path
    ckpts = list_checkpoints(Path(path))
    if not ckpts:
        raise SystemExit(f"error: {path} is neither a checkpoint nor a run directory with checkpoints")
    return str(ckpts[-1][1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 trials, one repetition")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    parser.add_argument(
        "--ckpt_dir", default=None, help="train.py checkpoint or run dir, on fbank (default: random weights)"
    )
    parser.add_argument("--eval_max_frames", type=int, default=400_000, help="our batch budget (evaluate.py's)")
    args = parser.parse_args(argv)
    max_trials, repeats = (300, 1) if args.quick else (None, args.repeats)
    work = WORK / ("eval_quick" if args.quick else "eval")

    print(machine_banner())
    prepare_demo()
    root, cache = s3prl_view(work, max_trials)
    target = work / "s3prl"
    # s3prl's stages 0-1 (its csv files and speaker encoder) in a child, as its CLI runs them.
    run_child(
        [sys.executable, "-m", "bench.runner", "s3prl", "SuperbASV", "--target_dir", str(target)]
        + ["--cache_dir", str(cache), "--prepare_data.dataset_root", str(root), "--build_upstream.name", "fbank"]
        + ["--device", "cpu", "--stop", "1"],
        work / "s3prl_prepare.log",
    )
    trials = read_trials_csv(DATA_DIR / "trials" / f"{TRIAL_LIST}.csv")[:max_trials]
    utts = unique_utterances(trials)
    ckpt_dir = resolve_ckpt(args.ckpt_dir) if args.ckpt_dir else None
    ckpt, cfg, state = our_checkpoint(work, ckpt_dir)
    problem = SuperbASV()
    s3prl_checkpoint(problem, target, cfg, state)
    print(
        f"eval speed: {len(trials)} trials, {len(utts)} unique test utterances (raw audio), fbank, "
        f"{'weights of ' + ckpt_dir if ckpt_dir else 'seeded random weights'} in both models; "
        f"{WORKERS} workers; s3prl batch 1, ours length-sorted batches of <= {args.eval_max_frames} samples",
        flush=True,
    )
    for _, path in utts:  # neither side pays the first disk read
        Path(path).read_bytes()
    accelerator = Accelerator(mixed_precision="no")
    embedder, loaded = preload(ckpt, utts, accelerator, args.eval_max_frames)

    s3_times, our_times, floor_times = [], [], []
    for r in range(repeats):  # interleaved, so drifting background load hits all three alike
        seconds, s3_eer = time_s3prl(problem, target, cache, root)
        s3_times.append(seconds)
        print(f"  run {r + 1}: s3prl {len(utts) / seconds:.1f} utt/s ({seconds:.1f} s)", flush=True)
        seconds, our_eer = time_ours(ckpt, utts, trials, accelerator, args.eval_max_frames)
        our_times.append(seconds)
        print(f"  run {r + 1}: ours  {len(utts) / seconds:.1f} utt/s ({seconds:.1f} s)", flush=True)
        seconds = time_floor(embedder, loaded)
        floor_times.append(seconds)
        print(f"  run {r + 1}: floor {len(utts) / seconds:.1f} utt/s ({seconds:.1f} s)", flush=True)
        print(
            f"  run {r + 1}: ours/s3prl {s3_times[-1] / our_times[-1]:.2f}x, "
            f"ours time {our_times[-1] / floor_times[-1]:.2f}x the floor's",
            flush=True,
        )

    s3_rate, our_rate, floor_rate = (len(utts) / min(t) for t in (s3_times, our_times, floor_times))
    print(f"s3prl SuperbASV stage 3 : {s3_rate:6.1f} utterances/s  EER {s3_eer:.3f}%")
    print(f"ours (evaluate.py)      : {our_rate:6.1f} utterances/s  EER {our_eer:.3f}%")
    print(f"floor (forward only)    : {floor_rate:6.1f} utterances/s  (pre-loaded, pre-batched audio)")
    gap = abs(s3_eer - our_eer)
    verdict = "match" if gap <= EER_TOLERANCE else "MISMATCH"
    print(f"EER difference {gap:.3f} points ({verdict}: tolerance {EER_TOLERANCE})")
    ratio = our_rate / s3_rate
    print(
        f"ours/s3prl {ratio:.2f}x (target >= {TARGET_VS_S3PRL}x); ours time = {floor_rate / our_rate:.2f}x the floor's "
        f"(target <= {TARGET_VS_FLOOR}x)"
    )
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
