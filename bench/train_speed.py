"""Training speed, side by side: s3prl's own SuperbASV runner vs our train.py, and the compute floor.

    make bench                                         # setup + both benches
    .venv-bench/bin/python -m bench.train_speed         # this one (a few minutes)
    .venv-bench/bin/python -m bench.train_speed --quick # smoke run (a handful of updates)

Both sides train on the same prepared demo data (prepare.py --dataset demo; s3prl parses the same files
through its own stage 0), the same upstream (fbank), SUPERB's model, loss and optimizer, batch 10 x
accumulation 1, 2 DataLoader workers, fp32, each in its own child process. Updates/s comes from a
timestamp per optimizer step (bench/runner.py), measured after a warm-up, so start-up, s3prl's
first-run length scan and worker start are not counted, but every data-loading stall is. The floor
is forward + backward + clip + AdamW step of our model on pre-loaded batches of the same shape: what
a step costs when data loading is fully hidden. Last line: `ratio=<ours/s3prl>` (updates/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from bench import s3prl_shim
from bench.common import DATA_DIR, ROOT, WORK, gib, machine_banner, prepare_demo, run_child, s3prl_view

s3prl_shim.install()  # before asv.upstream: the parity check below calls the shim directly

from asv.audio import compute_vad  # noqa: E402
from asv.config import TrainConfig  # noqa: E402
from asv.datasets import EpochSampler, collate_train, load_train_set  # noqa: E402
from asv.manifest import (  # noqa: E402
    TRAIN_FIELDS,
    Utterance,
    read_train_csv,
    write_csv,
)
from asv.models import build_speaker_model  # noqa: E402
from asv.upstream import build_upstream, trainable_inputs, upstream_forward  # noqa: E402

BATCH_SIZE, WORKERS = 10, 2
# Issue targets on this CPU class (2-core Zen 3): >= 1.8x s3prl, and within 1.25x of the fp32 floor.
TARGET_VS_S3PRL, TARGET_VS_FLOOR = 1.8, 1.25


def updates_per_second(step_log: Path, warmup: int) -> tuple[float, int]:
    """(rate, counted updates) over the timestamps after the first `warmup` optimizer steps."""
    t = [float(x) for x in step_log.read_text().split()]
    if len(t) <= warmup + 1:
        raise SystemExit(f"error: {step_log} has {len(t)} optimizer steps; expected more than {warmup + 1}")
    return (len(t) - warmup) / (t[-1] - t[warmup - 1]), len(t) - warmup


def run_s3prl(work: Path, updates: int, warmup: int):
    root, cache = s3prl_view(work)
    target = work / "s3prl"
    shutil.rmtree(target / "train", ignore_errors=True)  # s3prl auto-resumes; its length cache stays
    step_log = work / "s3prl_steps.txt"
    step_log.unlink(missing_ok=True)
    total = updates + warmup
    args = [sys.executable, "-m", "bench.runner", "s3prl", "SuperbASV"]
    args += ["--target_dir", str(target), "--cache_dir", str(cache), "--prepare_data.dataset_root", str(root)]
    args += ["--build_upstream.name", "fbank", "--device", "cpu", "--num_workers", str(WORKERS)]
    args += ["--build_batch_sampler.train.batch_size", str(BATCH_SIZE), "--train.gradient_accumulate", "1"]
    args += ["--train.total_steps", str(total), "--train.log_step", str(total), "--train.save_step", str(total)]
    args += ["--stop", "2"]  # stage 3 would evaluate the checkpoint: that is bench/eval_speed.py's job
    wall, memory = run_child(args, work / "s3prl.log", env={"BENCH_STEP_LOG": str(step_log)})
    rate, counted = updates_per_second(step_log, warmup)
    return rate, counted, wall, memory


def our_python() -> str:
    """The project's own venv where it exists: our training must not need the s3prl runner extras."""
    python = ROOT / ".venv/bin/python"
    return str(python if python.exists() else sys.executable)


def run_ours(work: Path, updates: int, warmup: int):
    exp = work / "ours"
    shutil.rmtree(exp, ignore_errors=True)
    step_log = work / "ours_steps.txt"
    step_log.unlink(missing_ok=True)
    total = updates + warmup
    args = [our_python(), "-m", "bench.runner", "script", "train.py"]
    args += ["--data_dir", str(DATA_DIR), "--exp_dir", str(exp), "--upstream", "fbank"]
    args += ["--batch_size", str(BATCH_SIZE), "--gradient_accumulate", "1", "--num_workers", str(WORKERS)]
    args += ["--total_steps", str(total), "--log_step", str(total), "--save_step", str(total)]
    args += ["--mixed_precision", "no", "--wandb_mode", "disabled"]
    wall, memory = run_child(args, work / "ours.log", env={"BENCH_STEP_LOG": str(step_log)})
    rate, counted = updates_per_second(step_log, warmup)
    return rate, counted, wall, memory


def floor_updates_per_second(first_batch: int, count: int, warmup: int = 2) -> float:
    """Our training step on pre-loaded batches (no DataLoader): the compute floor, in updates/s.

    The batches are exactly the ones our timed run trained on (train.py's sampler and crops are keyed by
    seed 0, epoch 0 and the item), so the floor and our run see the same shapes; s3prl's sampler draws
    other batches of the same data.
    """
    from asv.optim import build_optimizer_and_scheduler

    cfg = TrainConfig()  # SUPERB defaults: x-vector, AM-softmax 0.4/30, AdamW 1e-4, clip 1000
    torch.manual_seed(cfg.run.seed)
    upstream = build_upstream("fbank")
    dataset, speakers, _ = load_train_set(DATA_DIR, cfg.data.min_secs, cfg.data.max_secs, cfg.run.seed)
    model = build_speaker_model(cfg.model, cfg.loss, upstream, num_classes=len(speakers))
    optimizer, _ = build_optimizer_and_scheduler(cfg.optim, model, None)
    keys = list(EpochSampler(len(dataset), cfg.run.seed))
    ranges = [range(b * BATCH_SIZE, (b + 1) * BATCH_SIZE) for b in range(first_batch, first_batch + count)]
    batches = [collate_train([dataset[keys[k]] for k in r]) for r in ranges]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    seconds = 0.0
    for i, (wav, wav_len, labels) in enumerate(batches[:warmup] + batches):  # the first `warmup` untimed
        t0 = time.perf_counter()
        hidden, hidden_len = trainable_inputs(*upstream_forward(upstream, wav, wav_len))
        loss, _ = model(hidden, hidden_len, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad()
        if i >= warmup:
            seconds += time.perf_counter() - t0
    return count / seconds


def shim_parity(files: int) -> int:
    """Files (of the first `files` training files) where the shim's sox effects keep a different number
    of samples than prepare.py's VAD intervals: both sides must train on the same audio."""
    import librosa
    from s3prl.problem.asv.superb_asv import EFFECTS

    vad = json.loads((DATA_DIR / "vad.json").read_text())
    mismatches = 0
    for utt in read_train_csv(DATA_DIR / "train.csv")[:files]:
        wav, sr = librosa.load(utt.wav_path, sr=16000)  # what s3prl's LoadAudio does
        out, _ = s3prl_shim.apply_effects_tensor(torch.from_numpy(wav)[None], sr, EFFECTS)
        mismatches += out.shape[-1] != sum(e - s for s, e in vad["intervals"][utt.id])
    return mismatches


def decode_cost_per_crop(work: Path, repeats: int, crop_secs: float = 3.0) -> dict[float, float]:
    """Median seconds of TrainDataset.__getitem__ (one crop_secs crop) for a 3 s and a 60 s file."""
    work.mkdir(parents=True, exist_ok=True)
    pieces, total = [], 0
    for utt in read_train_csv(DATA_DIR / "train.csv"):  # real demo audio, concatenated into a long file
        wav, _ = sf.read(utt.wav_path, dtype="float32")
        pieces.append(wav)
        total += len(wav)
        if total >= 60 * 16000:
            break
    long_wav = np.concatenate(pieces)
    utterances, intervals = [], {}
    for secs in (3.0, 60.0):
        path = work / f"{int(secs)}s.wav"
        sf.write(path, long_wav[: int(secs * 16000)], 16000, subtype="PCM_16")
        utt = Utterance(f"{int(secs)}s", str(path), "spk", int(secs * 16000))
        utterances.append(utt)
        intervals[utt.id] = compute_vad(str(path), -3.0)
    # A prepared-data directory (the contract load_train_set reads), so this follows TrainDataset's changes.
    data = work / "data"
    write_csv(data / "train.csv", TRAIN_FIELDS, utterances)
    (data / "speakers.json").write_text(json.dumps({"spk": 0}))
    (data / "vad.json").write_text(json.dumps({"gain_db": -3.0, "vad": "", "intervals": intervals}))
    dataset, _, _ = load_train_set(data, min_secs=0.0, max_secs=crop_secs, seed=0)
    out = {}
    for i, utt in enumerate(utterances):  # min_secs 0 keeps both, in order
        times = []
        for epoch in range(repeats + 1):
            t0 = time.perf_counter()
            dataset[(epoch, i)]
            times.append(time.perf_counter() - t0)
        out[utt.num_samples / 16000] = statistics.median(times[1:])  # the first read warms the page cache
    return out


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a few updates per side")
    parser.add_argument("--updates", type=int, default=40, help="timed optimizer updates per side")
    parser.add_argument("--warmup", type=int, default=5, help="updates before timing starts")
    parser.add_argument("--floor_json", help=argparse.SUPPRESS)  # internal: measure the floor only, write it here
    args = parser.parse_args(argv)
    updates, warmup = (4, 2) if args.quick else (args.updates, args.warmup)
    if args.floor_json:
        rate = floor_updates_per_second(args.warmup, args.updates)
        Path(args.floor_json).write_text(json.dumps({"updates_per_s": rate}))
        return rate
    work = WORK / ("train_quick" if args.quick else "train")

    print(machine_banner())
    print(
        f"train speed: fbank, SUPERB x-vector + AM-softmax, batch {BATCH_SIZE} x accumulation 1, "
        f"{WORKERS} workers, fp32; {updates} timed updates per side after {warmup} warm-up",
        flush=True,
    )
    prepare_demo()
    mismatches = shim_parity(5 if args.quick else 40)
    print(f"sox shim vs prepare.py VAD: {mismatches} length mismatches", flush=True)

    s3_rate, s3_n, s3_wall, s3_mem = run_s3prl(work, updates, warmup)
    print(
        f"s3prl SuperbASV : {s3_rate:.3f} updates/s ({1 / s3_rate:.2f} s/update over {s3_n}); "
        f"peak RSS {gib(s3_mem.peak_main)} (tree {gib(s3_mem.peak_tree)}); child wall {s3_wall:.0f} s",
        flush=True,
    )
    our_rate, our_n, our_wall, our_mem = run_ours(work, updates, warmup)
    print(
        f"ours train.py   : {our_rate:.3f} updates/s ({1 / our_rate:.2f} s/update over {our_n}); "
        f"peak RSS {gib(our_mem.peak_main)} (tree {gib(our_mem.peak_tree)}); child wall {our_wall:.0f} s",
        flush=True,
    )
    # In a child on the project's venv too, like our run: the bench process has imported librosa/numba and
    # s3prl (the shim check), and the floor should not depend on what else shares its process.
    floor_file = work / "floor.json"
    run_child(
        [our_python(), "-m", "bench.train_speed", "--floor_json", str(floor_file), "--warmup", str(warmup)]
        + ["--updates", str(updates)],
        work / "floor.log",
    )
    floor = json.loads(floor_file.read_text())["updates_per_s"]
    print(
        f"floor           : {floor:.3f} updates/s ({1 / floor:.2f} s/update: fwd+bwd+clip+step on our run's "
        f"{updates} timed batches, pre-loaded)"
    )

    decode = decode_cost_per_crop(work / "decode", 3 if args.quick else 15)
    (short, t_short), (long, t_long) = sorted(decode.items())
    grows = t_long > 1.5 * t_short
    print(
        f"decode per 3 s crop: {t_short * 1e3:.1f} ms from a {short:.0f} s file, {t_long * 1e3:.1f} ms from a "
        f"{long:.0f} s file ({t_long / t_short:.1f}x: "
        f"{'grows with the file length (whole-file decode)' if grows else 'flat in the file length'})"
    )

    ratio = our_rate / s3_rate
    print(
        f"ours/s3prl {ratio:.2f}x (target >= {TARGET_VS_S3PRL}x); ours s/update = {floor / our_rate:.2f}x the floor's "
        f"(target <= {TARGET_VS_FLOOR}x)"
    )
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
