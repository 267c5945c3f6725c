"""Stages 0-1 of SUPERB ASV: turn a corpus into the manifests train.py and evaluate.py read.

    python prepare.py                                    # generate + prepare the embedded demo corpus
    python prepare.py --dataset voxceleb1 --dataset_root /data/VoxCeleb1
    python prepare.py --dataset manifest --train_csv my_train.csv --trials my_trials.txt

Writes --out_dir (default data/<dataset>): train.csv, speakers.json, vad.json, trials/<name>.csv and
bad_files.txt (formats in asv/data.py and the README). Every training and trial file is decoded once:
unusable ones are listed, not fatal. A second run reuses what is there; --force redoes it.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asv.audio import SAMPLE_RATE, BadAudioError, load_audio
from asv.config import parse
from asv.data import (
    DEV_LIST,
    TRAIN_FIELDS,
    TRIAL_FIELDS,
    VAD_DESCRIPTION,
    ManifestError,
    Trial,
    Utterance,
    compute_vad,
    hold_out_speakers,
    make_trials,
    read_voxceleb_trials,
    speaker_map,
    write_csv,
)


@dataclass
class PrepareConfig:
    """prepare.py: build train.csv, speakers.json, vad.json and trials/*.csv."""

    # demo (generated here) | voxceleb1 (official layout) | manifest (any corpus, from your CSV).
    dataset: str = "demo"
    # Corpus root: voxceleb1 reads DIR/dev/wav and DIR/test/wav; demo generates the corpus there
    # (default data/demo_corpus); manifest resolves relative trial paths against it.
    dataset_root: str | None = None
    # Trial lists in VoxCeleb format ('<1|0> <utt1> <utt2>'). voxceleb1 default: voxceleb1_test_v2.txt
    # (SUPERB, 37,720 trials) and veri_test2.txt (cleaned Vox1-O, 37,611), from DIR, the cache or the web.
    trials: list[str] | None = None
    # manifest only: CSV with columns wav_path,spk (and optionally id) listing the training utterances.
    train_csv: str | None = None
    # Output directory (default data/<dataset>).
    out_dir: str | None = None
    # Where downloaded trial lists are kept.
    cache_dir: str = "~/.cache/superb-asv"
    # Gain applied before the VAD, in dB (SUPERB's sox `gain -3`); train.py applies the same value.
    gain_db: float = -3.0
    # Processes used to read lengths and run the VAD over the training set.
    num_workers: int = 2
    # Redo everything even if the outputs exist.
    force: bool = False
    # Training speakers held out for model selection (a fraction if < 1, else a count): their utterances
    # leave train.csv and form trials/dev.csv. 0 = exact SUPERB parity (all Vox1-dev speakers train).
    dev_speakers: float = 0.05
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


TRIAL_URLS = {
    "voxceleb1_test_v2.txt": [
        "https://openslr.magicdatatech.com/resources/49/voxceleb1_test_v2.txt",
        "https://www.openslr.org/resources/49/voxceleb1_test_v2.txt",
    ],
    "veri_test2.txt": [
        "https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/veri_test2.txt",
        "https://mm.kaist.ac.kr/datasets/voxceleb/meta/veri_test2.txt",
    ],
}
EXPECTED_TRIALS = {"voxceleb1_test_v2.txt": 37_720, "veri_test2.txt": 37_611}


def die(msg: str) -> None:
    raise SystemExit(f"error: {msg}")


def read_trials_or_die(path: Path) -> list[tuple[int, str, str]]:
    try:
        return read_voxceleb_trials(path)
    except (ManifestError, OSError) as err:
        die(str(err))


def walk_wavs(root: Path) -> set[str]:
    """Relative paths of every .wav under root, in one directory walk (not a glob per file)."""
    found = set()
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in files:
            if name.endswith(".wav"):
                found.add(name if rel == "." else f"{rel}/{name}")
    return found


def fetch_trial_list(name: str, dataset_root: Path, cache_dir: Path) -> Path:
    """A default trial list from the dataset root, the cache, or the web (into the cache)."""
    for candidate in (dataset_root / name, cache_dir / name):
        if candidate.is_file():
            return candidate
    cache_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in TRIAL_URLS[name]:
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                data = r.read()
            (cache_dir / (name + ".tmp")).write_bytes(data)
            (cache_dir / (name + ".tmp")).replace(cache_dir / name)
            print(f"downloaded {url} -> {cache_dir / name}")
            return cache_dir / name
        except Exception as err:  # urllib raises several types; all mean "not downloadable"
            errors.append(f"{url}: {getattr(err, 'reason', err)}")
    die(
        f"cannot download trial list {name} ({errors[0]}); place it at {dataset_root / name} "
        f"or {cache_dir / name}, or pass --trials FILE"
    )


@dataclass
class Probe:
    """What prepare.py learns from decoding one file once."""

    num_samples: int = 0  # at 16 kHz, after any resampling
    intervals: list | None = None  # VAD intervals (training files only)
    sample_rate: int = SAMPLE_RATE  # as stored
    channels: int = 1
    bad: str | None = None  # BadAudioError reason; the file is excluded
    detail: str = ""


def probe(path: str, gain_db: float, vad: bool = True) -> Probe:
    """Decode `path` once: its length and VAD intervals, or why it is unusable. Never raises for a bad file,
    so one corrupt utterance among 150,000 is reported instead of ending the pool."""
    try:
        wav = load_audio(path)
        info = sf.info(path)
    except BadAudioError as err:
        return Probe(bad=err.reason, detail=str(err))
    intervals = compute_vad(wav, gain_db) if vad else None
    return Probe(len(wav), intervals, info.samplerate, info.channels)


def probe_all(paths: list[str], gain_db: float, vad: bool, num_workers: int) -> list[Probe]:
    if num_workers > 1 and len(paths) > 1:
        # spawn, not fork: a forked child of a process whose torch/OpenMP threads already ran can deadlock
        # in resample (seen when prepare.main runs inside a larger program, e.g. the tests).
        with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(probe, paths, [gain_db] * len(paths), [vad] * len(paths), chunksize=64))
    return [probe(p, gain_db, vad) for p in paths]


def audio_report(probes: dict[str, Probe]) -> tuple[list[str], dict]:
    """Summary lines and counts for the probed files: bad ones by reason (first few named), resampled, downmixed."""
    bad = {p: r for p, r in probes.items() if r.bad}
    by_reason: dict[str, list[str]] = {}
    for path, r in sorted(bad.items()):
        by_reason.setdefault(r.bad, []).append(path)
    lines = []
    if bad:
        lines.append(f"warning: {len(bad)} unusable audio files, excluded (all listed in bad_files.txt):")
        for reason, paths in sorted(by_reason.items()):
            lines.append(f"  {len(paths)} {reason}: " + ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else ""))
    rates: dict[int, int] = {}
    for r in probes.values():
        if not r.bad and r.sample_rate != SAMPLE_RATE:
            rates[r.sample_rate] = rates.get(r.sample_rate, 0) + 1
    if rates:
        lines.append(
            f"warning: {sum(rates.values())} files are not {SAMPLE_RATE} Hz ("
            + ", ".join(f"{n} at {sr} Hz" for sr, n in sorted(rates.items()))
            + "): they are resampled on every load; resample them once offline to save time"
        )
    downmixed = sum(1 for r in probes.values() if not r.bad and r.channels > 1)
    if downmixed:
        lines.append(f"note: {downmixed} multi-channel files are downmixed to mono (channel mean) on load")
    counts = {
        "bad_files": len(bad),
        "bad_by_reason": {k: len(v) for k, v in sorted(by_reason.items())},
        "resampled_files": sum(rates.values()),
        "downmixed_files": downmixed,
    }
    return lines, counts


def voxceleb_layout(root: Path, trial_files: list[Path]) -> tuple[list[tuple[str, str, str]], dict[str, list[Trial]]]:
    """(training (id, path, spk), trials by name) for a VoxCeleb1-layout tree."""
    dev, test = root / "dev" / "wav", root / "test" / "wav"
    if not dev.is_dir():
        die(f"{dev} does not exist: --dataset_root must contain dev/wav/<spk>/<video>/<utt>.wav (VoxCeleb1 layout)")
    dev_files = walk_wavs(dev)
    test_files = walk_wavs(test) if test.is_dir() else set()
    trials, trial_speakers = {}, set()
    for path in trial_files:
        rows, missing = [], []
        for label, a, b in read_trials_or_die(path):
            resolved = []
            for utt in (a, b):
                base = test if utt in test_files else dev if utt in dev_files else None
                if base is None:
                    missing.append(utt)
                resolved.append(str(base / utt) if base else "")
                trial_speakers.add(utt.split("/")[0])
            rows.append(Trial(a, b, resolved[0], resolved[1], label))
        if missing:
            uniq = sorted(set(missing))
            die(
                f"{path}: {len(uniq)} trial utterances are not under {test} or {dev} "
                f"(first: {', '.join(uniq[:3])}); is --dataset_root the VoxCeleb1 root?"
            )
        trials[Path(path).stem] = rows
    # Training = every dev utterance whose speaker is in no trial list (SUPERB: Vox1-dev minus test speakers).
    train = [
        (rel, str(dev / rel), rel.split("/")[0]) for rel in sorted(dev_files) if rel.split("/")[0] not in trial_speakers
    ]
    return train, trials


def manifest_layout(train_csv: Path, trial_files: list[Path], root: Path | None):
    if not train_csv.is_file():
        die(f"--train_csv {train_csv} does not exist")
    with open(train_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not {"wav_path", "spk"} <= set(reader.fieldnames or []):
            die(f"{train_csv}: needs columns wav_path,spk (and optionally id); found {reader.fieldnames}")
        rows = list(reader)
    train = [(r.get("id") or r["wav_path"], r["wav_path"], r["spk"]) for r in rows]
    missing = [p for _, p, _ in train if not Path(p).is_file()]
    if missing:
        die(f"{train_csv}: {len(missing)} wav_path entries do not exist (first: {', '.join(missing[:3])})")
    trials = {}
    for path in trial_files:
        base = root or Path(path).parent
        rows, missing = [], []
        for label, a, b in read_trials_or_die(path):
            pa, pb = (str(Path(u) if Path(u).is_absolute() else base / u) for u in (a, b))
            missing += [p for p in (pa, pb) if not Path(p).is_file()]
            rows.append(Trial(a, b, pa, pb, label))
        if missing:
            uniq = sorted(set(missing))
            die(
                f"{path}: {len(uniq)} trial files do not exist (first: {', '.join(uniq[:3])}); "
                "relative paths resolve against --dataset_root, else the trial file's directory"
            )
        trials[Path(path).stem] = rows
    return train, trials


def corpus_version(cfg: PrepareConfig) -> int | None:
    """The generator version behind a demo corpus: a newer generator means the prepared data is stale."""
    if cfg.dataset != "demo":
        return None
    from asv.synth import CORPUS_VERSION

    return CORPUS_VERSION


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse(PrepareConfig, argv)
    t0 = time.time()
    out = Path(cfg.out_dir or f"data/{cfg.dataset}")
    done_marker = out / "prepare.json"
    if done_marker.is_file() and not cfg.force:
        previous = json.loads(done_marker.read_text())
        if previous["config"] == asdict(cfg) and previous.get("corpus_version") == corpus_version(cfg):
            print(f"{out} is already prepared (prepare.json matches; --force redoes it)")
            print_summary(previous["summary"])
            return out
        print(f"{out} was prepared with other settings: redoing it")

    cache_dir = Path(cfg.cache_dir).expanduser()
    if cfg.dataset == "demo":
        from asv.synth import CORPUS_VERSION, generate_corpus

        root = Path(cfg.dataset_root or "data/demo_corpus")
        corpus_marker = root / "corpus.json"
        corpus_args = dict(
            seed=cfg.seed,
            num_train_speakers=cfg.demo_train_speakers,
            num_test_speakers=cfg.demo_test_speakers,
            videos_per_speaker=cfg.demo_videos,
            utts_per_video=cfg.demo_utts_per_video,
            num_trials=cfg.demo_trials,
        )
        marker_args = {**corpus_args, "version": CORPUS_VERSION}
        if cfg.force or not corpus_marker.is_file() or json.loads(corpus_marker.read_text())["args"] != marker_args:
            if root.exists() and any(root.iterdir()):
                if not corpus_marker.is_file():  # never delete what we did not generate
                    die(f"{root} is not empty and holds no corpus.json: pass another --dataset_root for the demo")
                for sub in ("dev", "test"):
                    shutil.rmtree(root / sub, ignore_errors=True)
                corpus_marker.unlink()
            print(f"generating the demo corpus in {root} ...")
            info = generate_corpus(root, **corpus_args)
            corpus_marker.write_text(json.dumps({"args": marker_args, "summary": info}, indent=1))
        demo_trials = root / "demo_test.txt"  # the trial list's name is its stem: trials/demo_test.csv
        demo_trials.write_text((root / "trials.txt").read_text())
        train, trials = voxceleb_layout(root, [Path(t) for t in cfg.trials or [demo_trials]])
    elif cfg.dataset == "voxceleb1":
        if not cfg.dataset_root:
            die("--dataset voxceleb1 needs --dataset_root DIR (the folder holding dev/wav and test/wav)")
        root = Path(cfg.dataset_root)
        if not (root / "dev" / "wav").is_dir():
            die(
                f"{root / 'dev' / 'wav'} does not exist: --dataset_root must be the VoxCeleb1 root "
                "(DIR/dev/wav/<spk>/<video>/<utt>.wav, DIR/test/wav/...)"
            )
        files = (
            [Path(t) for t in cfg.trials]
            if cfg.trials
            else [fetch_trial_list(name, root, cache_dir) for name in TRIAL_URLS]
        )
        train, trials = voxceleb_layout(root, files)
    elif cfg.dataset == "manifest":
        if not cfg.train_csv or not cfg.trials:
            die("--dataset manifest needs --train_csv FILE and --trials FILE [FILE ...]")
        train, trials = manifest_layout(
            Path(cfg.train_csv), [Path(t) for t in cfg.trials], Path(cfg.dataset_root) if cfg.dataset_root else None
        )
    else:
        die(f"unknown --dataset '{cfg.dataset}'; choose demo, voxceleb1 or manifest")
    if not train:
        die("no training utterances found (every speaker appears in a trial list?)")
    if DEV_LIST in trials:
        die(f"a trial list is named '{DEV_LIST}', which prepare.py reserves for the held-out speakers; rename it")
    try:
        held_out = hold_out_speakers([s for _, _, s in train], cfg.dev_speakers, cfg.seed)
    except ValueError as err:
        die(f"--dev_speakers {cfg.dev_speakers:g}: {err}")
    if held_out:
        rng = np.random.default_rng(cfg.seed)
        dev_utts = []
        for spk in sorted(held_out):
            mine = [u for u in train if u[2] == spk]
            keep = sorted(rng.choice(len(mine), size=min(len(mine), cfg.dev_utts_per_speaker), replace=False))
            dev_utts += [mine[k] for k in keep]
        train = [u for u in train if u[2] not in held_out]
        trials[DEV_LIST] = make_trials(dev_utts, cfg.dev_trials, cfg.seed)
    for name, rows in trials.items():
        expected = EXPECTED_TRIALS.get(name + ".txt")
        if expected and len(rows) != expected:
            print(f"warning: {name} has {len(rows)} trials, the official list has {expected}")

    # Lengths and VAD intervals in one decode per file, cached per corpus in vad.json. Trial files are
    # decoded too, so every bad file is reported here and not hours into training or evaluation.
    print(f"reading {len(train)} training files and running the VAD ({cfg.num_workers} processes) ...")
    train_probes = probe_all([p for _, p, _ in train], cfg.gain_db, True, cfg.num_workers)
    train_paths = {p for _, p, _ in train}
    trial_paths = sorted(
        {p for rows in trials.values() for t in rows for p in (t.wav_path1, t.wav_path2)} - train_paths
    )
    print(f"checking {len(trial_paths)} trial files ...")
    probes = dict(zip(trial_paths, probe_all(trial_paths, cfg.gain_db, False, cfg.num_workers), strict=True))
    probes.update((p, r) for (_, p, _), r in zip(train, train_probes, strict=True))
    report, audio_counts = audio_report(probes)
    out.mkdir(parents=True, exist_ok=True)
    # path<TAB>reason<TAB>detail, one line per unusable file (empty when all are fine).
    bad_lines = [f"{p}\t{r.bad}\t{r.detail}" for p, r in sorted(probes.items()) if r.bad]
    (out / "bad_files.txt").write_text("".join(line + "\n" for line in bad_lines))
    kept = [(u, r) for u, r in zip(train, train_probes, strict=True) if not r.bad]
    utterances = [Utterance(i, p, s, r.num_samples) for (i, p, s), r in kept]
    if not utterances:
        die(f"all {len(train)} training files are unusable (first: {train_probes[0].detail}); see {out}/bad_files.txt")
    speakers = speaker_map(utterances)
    # A trial with an unusable side cannot be scored: it is dropped and counted (the summary and
    # results.json show the reduced count) rather than failing the whole list.
    dropped_trials = {}
    for name, rows in trials.items():
        good = [t for t in rows if not probes[t.wav_path1].bad and not probes[t.wav_path2].bad]
        dropped_trials[name] = len(rows) - len(good)
        trials[name] = good
        if not good:
            die(f"every trial of {name} uses an unusable file; see {out}/bad_files.txt")

    write_csv(out / "train.csv", TRAIN_FIELDS, utterances)
    (out / "speakers.json").write_text(json.dumps(speakers, indent=0))
    vad = {
        "gain_db": cfg.gain_db,
        "vad": VAD_DESCRIPTION,
        "intervals": {u.id: r.intervals for u, (_, r) in zip(utterances, kept, strict=True)},
    }
    (out / "vad.json").write_text(json.dumps(vad))
    for old in (out / "trials").glob("*.csv") if (out / "trials").is_dir() else []:
        old.unlink()
    for name, rows in trials.items():
        write_csv(out / "trials" / f"{name}.csv", TRIAL_FIELDS, rows)

    summary = {
        "dataset": cfg.dataset,
        "out_dir": str(out),
        "utterances": len(utterances),
        "speakers": len(speakers),
        "dev_speakers": sorted(held_out),
        "hours": round(sum(u.num_samples for u in utterances) / 16000 / 3600, 3),
        "hours_after_vad": round(sum(e - s for _, r in kept for s, e in r.intervals) / 16000 / 3600, 3),
        "trials": {name: len(rows) for name, rows in trials.items()},
        "dropped_trials": dropped_trials,
        "audio": audio_counts,
        "audio_report": report,
        "seconds": round(time.time() - t0, 1),
    }
    done_marker.write_text(
        json.dumps({"config": asdict(cfg), "corpus_version": corpus_version(cfg), "summary": summary}, indent=1)
    )
    print_summary(summary)
    return out


def print_summary(s: dict) -> None:
    for line in s.get("audio_report", []):
        print(line)
    trials = ", ".join(
        f"{k}: {v}"
        + (f" ({s['dropped_trials'][k]} dropped: unusable audio)" if s.get("dropped_trials", {}).get(k) else "")
        for k, v in s["trials"].items()
    )
    print(
        f"{s['out_dir']}: {s['utterances']} training utterances, {s['speakers']} speakers "
        f"(+{len(s.get('dev_speakers', []))} held out for the dev list), "
        f"{s['hours']} h ({s['hours_after_vad']} h after VAD); trials: {trials}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
