"""What prepare.py reads: each corpus by name (CORPORA), the trial lists it scores, and the one decode per file
that finds lengths, VAD intervals and unusable audio (VoxCeleb2's .m4a are first converted, once, to FLAC).

A corpus builder takes the PrepareConfig and returns a `Corpus`: the training utterances as (id, wav_path, spk)
and the trial lists by name. A new corpus is a function and a CORPORA entry.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from asv.audio import compute_vad, decode_with_pyav, load_audio, pyav
from asv.config import CORPUS_NAMES, registry
from asv.conventions import SAMPLE_RATE
from asv.errors import BadAudioError, ConfigError, ManifestError, one_line
from asv.manifest import DEV_LIST, Trial, make_trials, read_voxceleb_trials
from asv.progress import progress
from asv.synth import CORPUS_VERSION, generate_corpus

TRIAL_URLS = {
    "voxceleb1_test_v2.txt": [
        "https://openslr.magicdatatech.com/resources/49/voxceleb1_test_v2.txt",
        "https://www.openslr.org/resources/49/voxceleb1_test_v2.txt",
    ],
    **{
        name: [
            f"https://www.robots.ox.ac.uk/~vgg/data/voxceleb/meta/{name}",
            f"https://mm.kaist.ac.kr/datasets/voxceleb/meta/{name}",
        ]
        for name in ("veri_test2.txt", "list_test_all2.txt", "list_test_hard2.txt")
    },
}
# What --dataset voxceleb1 scores by default: SUPERB's Vox1-O and the cleaned one every other toolkit reports.
VOXCELEB1_LISTS = ("voxceleb1_test_v2.txt", "veri_test2.txt")
# What --dataset voxceleb2 scores by default, over all of VoxCeleb1 (dev + test): the cleaned Vox1-O, -E and -H
# (the names are the prepared lists', evaluate.py --trial_names; the files keep their official names in the cache).
VOXCELEB1_CLEAN_LISTS = {
    "voxceleb1_o_clean": "veri_test2.txt",
    "voxceleb1_e_clean": "list_test_all2.txt",
    "voxceleb1_h_clean": "list_test_hard2.txt",
}
EXPECTED_TRIALS = {
    "voxceleb1_test_v2": 37_720,
    "veri_test2": 37_611,
    "voxceleb1_o_clean": 37_611,
    "voxceleb1_e_clean": 579_818,
    "voxceleb1_h_clean": 550_894,
}


@dataclass
class Corpus:
    train: list[tuple[str, str, str]]  # (id, wav_path, spk)
    trials: dict[str, list[Trial]]
    version: int | None = None  # of a generated corpus: a newer generator makes prepared data stale
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    # Source files the builder could not convert (path -> why): reported and left out like any unusable file.
    bad: dict[str, Probe] = field(default_factory=dict)
    # How a conversion before the decode went (VoxCeleb2's m4a -> FLAC): counts, seconds, files/s.
    conversion: dict | None = None


def walk_files(root: Path, suffix: str = ".wav") -> set[str]:
    """Relative paths of every file named *suffix under root, in one directory walk (not a glob per file)."""
    found = set()
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in files:
            if name.endswith(suffix):
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
    raise ManifestError(
        f"cannot download trial list {name} ({errors[0]}); place it at {dataset_root / name} "
        f"or {cache_dir / name}, or pass --trials FILE"
    )


def resolve_trials(lists: dict[str, Path], bases: list[tuple[Path, set[str]]], hint: str) -> dict[str, list[Trial]]:
    """Each VoxCeleb-format list (name -> file), every trial as listed, its utterances resolved against the first
    base folder holding them (bases: (folder, the relative paths walked under it)). An utterance under none of them
    is an error naming the list, the count, the first few and `hint` (the flag to check)."""
    trials = {}
    for name, path in lists.items():
        rows, missing = [], []
        for label, a, b in read_voxceleb_trials(path):
            resolved = [next((str(base / u) for base, found in bases if u in found), "") for u in (a, b)]
            missing += [u for u, r in zip((a, b), resolved, strict=True) if not r]
            rows.append(Trial(a, b, resolved[0], resolved[1], label))
        if missing:
            uniq = sorted(set(missing))
            raise ManifestError(
                f"{path}: {len(uniq)} trial utterances are not under {' or '.join(str(b) for b, _ in bases)} "
                f"(first: {', '.join(uniq[:3])}); {hint}"
            )
        trials[name] = rows
    return trials


def voxceleb_layout(root: Path, trial_files: list[Path]) -> Corpus:
    """Training = every dev utterance whose speaker is in no trial list (SUPERB: Vox1-dev minus the test
    speakers); trial utterances resolve against test/wav, then dev/wav."""
    dev, test = root / "dev" / "wav", root / "test" / "wav"
    if not dev.is_dir():
        raise ManifestError(
            f"{dev} does not exist: --dataset_root must be the VoxCeleb1 root "
            "(DIR/dev/wav/<spk>/<video>/<utt>.wav, DIR/test/wav/...)"
        )
    dev_files = walk_files(dev)
    bases = [(test, walk_files(test) if test.is_dir() else set()), (dev, dev_files)]
    lists = {Path(p).stem: Path(p) for p in trial_files}
    trials = resolve_trials(lists, bases, "is --dataset_root the VoxCeleb1 root?")
    trial_speakers = {t.id1.split("/")[0] for rows in trials.values() for t in rows}
    trial_speakers |= {t.id2.split("/")[0] for rows in trials.values() for t in rows}
    train = [
        (rel, str(dev / rel), rel.split("/")[0]) for rel in sorted(dev_files) if rel.split("/")[0] not in trial_speakers
    ]
    return Corpus(train, trials, root=root)


def voxceleb1(cfg) -> Corpus:
    if not cfg.dataset_root:
        raise ConfigError("--dataset voxceleb1 needs --dataset_root DIR (the folder holding dev/wav and test/wav)")
    root = Path(cfg.dataset_root)
    cache_dir = Path(cfg.cache_dir).expanduser()
    files = (
        [Path(t) for t in cfg.trials] if cfg.trials else [fetch_trial_list(n, root, cache_dir) for n in VOXCELEB1_LISTS]
    )
    return voxceleb_layout(root, files)


# Where VoxCeleb2-dev's <spk>/<video>/<utt>.m4a tree is found below --dataset_root: the archive's own layout
# (vox2_dev_aac unpacks to dev/aac), the same without dev/, or the aac folder itself.
VOXCELEB2_LAYOUTS = ("dev/aac", "aac", ".")
# Where the VoxCeleb1 wav tree is found below --voxceleb1_root: the official test/ and dev/ parts, or one merged
# wav/ folder (as several toolkits' preparation scripts leave it). Test first, as for --dataset voxceleb1.
VOXCELEB1_WAV_DIRS = ("test/wav", "dev/wav", "wav")


def speaker_folders(folder: Path) -> bool:
    """Whether `folder` holds VoxCeleb speaker folders (id00012, id10001, ...)."""
    return folder.is_dir() and any(p.name.startswith("id") and p.is_dir() for p in folder.iterdir())


def voxceleb2(cfg) -> Corpus:
    """Training = VoxCeleb2-dev (5,994 speakers, 1,092,009 .m4a), converted once to 16 kHz FLAC under
    --decoded_dir; trials = the cleaned Vox1-O/E/H lists over all of VoxCeleb1 (--voxceleb1_root)."""
    if not cfg.dataset_root or not cfg.voxceleb1_root:
        raise ConfigError(
            "--dataset voxceleb2 needs --dataset_root DIR (the folder holding dev/aac) and --voxceleb1_root DIR "
            "(the VoxCeleb1 wav tree its Vox1-O/E/H test lists score)"
        )
    root, vox1 = Path(cfg.dataset_root), Path(cfg.voxceleb1_root)
    src = next((root / sub for sub in VOXCELEB2_LAYOUTS if speaker_folders(root / sub)), None)
    if src is None:
        raise ManifestError(
            f"no VoxCeleb2 speaker folders under {root}: expected {root}/dev/aac/<spk>/<video>/<utt>.m4a "
            f"(or {root}/aac/<spk>/..., or {root}/<spk>/...); is --dataset_root the VoxCeleb2 root?"
        )
    pyav()  # a missing decoder is said now, not after the trial lists are fetched and resolved
    bases = [(vox1 / sub, walk_files(vox1 / sub)) for sub in VOXCELEB1_WAV_DIRS if (vox1 / sub).is_dir()]
    if not bases:
        raise ManifestError(
            f"no VoxCeleb1 wav tree under {vox1}: expected {vox1}/test/wav and {vox1}/dev/wav "
            f"(<spk>/<video>/<utt>.wav), or {vox1}/wav; is --voxceleb1_root the VoxCeleb1 root?"
        )
    if cfg.trials:
        lists = {Path(t).stem: Path(t) for t in cfg.trials}
    else:
        cache_dir = Path(cfg.cache_dir).expanduser()
        lists = {name: fetch_trial_list(f, vox1, cache_dir) for name, f in VOXCELEB1_CLEAN_LISTS.items()}
    trials = resolve_trials(lists, bases, "is --voxceleb1_root the VoxCeleb1 root (dev and test)?")
    m4a = sorted(walk_files(src, ".m4a"))
    if not m4a:
        raise ManifestError(f"{src} holds speaker folders but no .m4a files; is --dataset_root the VoxCeleb2 root?")
    # Absolute: train.csv must name the same files whichever folder train.py runs from.
    out = (Path(cfg.decoded_dir) if cfg.decoded_dir else prepared_dir(cfg) / "decoded").absolute()
    bad, conversion = convert_all(src, m4a, out, worker_count(cfg.num_workers))
    train = [(rel, str(out / flac_name(rel)), rel.split("/")[0]) for rel in m4a if str(src / rel) not in bad]
    return Corpus(train, trials, root=root, bad=bad, conversion=conversion)


def flac_name(rel: str) -> str:
    return rel[: -len(".m4a")] + ".flac"


def convert(src: str, dst: str) -> Probe | None:
    """Decode `src` (.m4a) once into `dst`: 16 kHz mono 16-bit FLAC. None when done, else a Probe saying why not.

    FLAC, not WAV: lossless for these 16-bit samples in half to two thirds of the disk (VoxCeleb2-dev's ~2,300 h
    are 265 GB as WAV), and libsndfile seeks in it, so training still reads only its crops (~1 ms per 3 s crop).
    The file is written under a temporary name and renamed when complete: an interrupted prepare.py never leaves
    a partial file under the final name, which is what a rerun takes as done. A file that cannot be written (a
    full disk) ends the run with a ConfigError: it is the output folder at fault, not the audio."""
    try:
        wav = decode_with_pyav(src)
    except BadAudioError as err:
        return Probe(bad=err.reason, detail=str(err))
    # FFmpeg's own float -> s16 rule (x * 2**15, rounded, clipped), so reading the file back gives what an s16
    # decode of the m4a gives; AAC overshoots full scale now and then, and those samples clip.
    pcm = np.clip(np.rint(wav * 32768.0), -32768, 32767).astype(np.int16)
    partial = dst + ".partial"
    try:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        sf.write(partial, pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        os.replace(partial, dst)
    except (OSError, RuntimeError) as err:  # soundfile raises LibsndfileError, a RuntimeError, for a failed write
        Path(partial).unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {dst} ({one_line(err)}): free space there (or fix its permissions), or pass --decoded_dir "
            "DIR elsewhere; a rerun converts only what is missing"
        ) from None
    return None


def convert_all(src: Path, rels: list[str], out: Path, num_workers: int) -> tuple[dict[str, Probe], dict]:
    """Convert every src/<rel>.m4a not yet converted into out/<rel>.flac; returns the failures (m4a path -> Probe)
    and the conversion's figures. Only complete files carry the .flac name, so finding one means it is done."""
    found = walk_files(out, "") if out.is_dir() else set()
    done = {rel for rel in found if rel.endswith(".flac")}
    for leftover in (rel for rel in found if rel.endswith(".partial")):
        (out / leftover).unlink()  # a file an interrupted run was writing: redone below
    todo = [rel for rel in rels if flac_name(rel) not in done]
    print(f"converting {len(todo)} of {len(rels)} .m4a files to 16 kHz FLAC in {out} ({len(rels) - len(todo)} done)")
    t0 = time.monotonic()
    results = pool_map(convert, [(str(src / r), str(out / flac_name(r))) for r in todo], num_workers, "m4a to flac")
    seconds = time.monotonic() - t0
    bad = {str(src / rel): r for rel, r in zip(todo, results, strict=True) if r is not None}
    figures = {
        "dir": str(out),
        "files": len(todo),
        "reused": len(rels) - len(todo),
        "failed": len(bad),
        "seconds": round(seconds, 2),
        "workers": num_workers,
        "files_per_s": round(len(todo) / seconds, 1) if todo else None,
    }
    if todo:
        rate = f"{len(todo) / seconds:.1f} files/s"
        print(f"converted {len(todo)} files in {seconds:.1f} s with {workers_phrase(num_workers)}: {rate}")
    return bad, figures


def prepared_dir(cfg) -> Path:
    """Where prepare.py writes: --out_dir, else data/<dataset>."""
    return Path(cfg.out_dir or f"data/{cfg.dataset}")


def demo(cfg) -> Corpus:
    """The embedded synthetic corpus (asv/synth.py), generated once under --dataset_root in VoxCeleb1 layout."""
    root = Path(cfg.dataset_root or "data/demo_corpus")
    marker = root / "corpus.json"
    args = dict(
        seed=cfg.seed,
        num_train_speakers=cfg.demo_train_speakers,
        num_test_speakers=cfg.demo_test_speakers,
        videos_per_speaker=cfg.demo_videos,
        utts_per_video=cfg.demo_utts_per_video,
        num_trials=cfg.demo_trials,
    )
    wanted = {**args, "version": CORPUS_VERSION}  # the worker count changes no byte, so it is not recorded
    if cfg.force or not marker.is_file() or json.loads(marker.read_text())["args"] != wanted:
        if root.exists() and any(root.iterdir()):
            if not marker.is_file():  # never delete what we did not generate
                raise ConfigError(
                    f"{root} is not empty and holds no corpus.json: pass another --dataset_root for the demo"
                )
            for sub in ("dev", "test"):
                shutil.rmtree(root / sub, ignore_errors=True)
            marker.unlink()
        print(f"generating the demo corpus in {root} ...")
        info = generate_corpus(root, **args, num_workers=worker_count(cfg.num_workers))
        marker.write_text(json.dumps({"args": wanted, "summary": info}, indent=1))
    trial_list = root / "demo_test.txt"  # the trial list's name is its stem: trials/demo_test.csv
    trial_list.write_text((root / "trials.txt").read_text())
    corpus = voxceleb_layout(root, [Path(t) for t in cfg.trials or [trial_list]])
    corpus.version = CORPUS_VERSION
    return corpus


def manifest(cfg) -> Corpus:
    """Any corpus: training utterances from a CSV (wav_path,spk[,id]), trials from VoxCeleb-format lists whose
    relative paths resolve against --dataset_root, else the trial file's folder."""
    if not cfg.train_csv or not cfg.trials:
        raise ConfigError("--dataset manifest needs --train_csv FILE and --trials FILE [FILE ...]")
    train_csv, root = Path(cfg.train_csv), Path(cfg.dataset_root) if cfg.dataset_root else None
    if not train_csv.is_file():
        raise ManifestError(f"--train_csv {train_csv} does not exist")
    with open(train_csv, newline="") as f:
        reader = csv.DictReader(f)
        if not {"wav_path", "spk"} <= set(reader.fieldnames or []):
            raise ManifestError(
                f"{train_csv}: needs columns wav_path,spk (and optionally id); found {reader.fieldnames}"
            )
        rows = list(reader)
    train = [(r.get("id") or r["wav_path"], r["wav_path"], r["spk"]) for r in rows]
    missing = [p for _, p, _ in train if not Path(p).is_file()]
    if missing:
        raise ManifestError(
            f"{train_csv}: {len(missing)} wav_path entries do not exist (first: {', '.join(missing[:3])})"
        )
    trials = {}
    for path in map(Path, cfg.trials):
        base = root or path.parent
        rows, missing = [], []
        for label, a, b in read_voxceleb_trials(path):
            pa, pb = (str(Path(u) if Path(u).is_absolute() else base / u) for u in (a, b))
            missing += [p for p in (pa, pb) if not Path(p).is_file()]
            rows.append(Trial(a, b, pa, pb, label))
        if missing:
            uniq = sorted(set(missing))
            raise ManifestError(
                f"{path}: {len(uniq)} trial files do not exist (first: {', '.join(uniq[:3])}); "
                "relative paths resolve against --dataset_root, else the trial file's directory"
            )
        trials[path.stem] = rows
    return Corpus(train, trials, root=root)


# name -> builder(PrepareConfig) -> Corpus: what `prepare.py --dataset NAME` reads.
CORPORA = registry(CORPUS_NAMES, {"demo": demo, "voxceleb1": voxceleb1, "voxceleb2": voxceleb2, "manifest": manifest})


def hold_out_speakers(speakers: list[str], amount: float, seed: int) -> set[str]:
    """The speakers kept out of training for model selection: `amount` < 1 is a fraction of them
    (rounded up, at least 2: a dev list needs non-target trials), >= 1 a count; 0 keeps everyone in
    training (exact SUPERB parity, the default)."""
    names = sorted(set(speakers))
    n = max(2, int(np.ceil(amount * len(names)))) if 0 < amount < 1 else int(amount)
    if n == 1:
        raise ManifestError("a dev list needs at least 2 held-out speakers (non-target trials); pass 0 or >= 2")
    if n < 0 or n > len(names) - 2:
        raise ManifestError(f"cannot hold out {n} of {len(names)} training speakers (at least 2 must train); pass 0")
    return set(np.random.default_rng(seed).choice(names, size=n, replace=False).tolist()) if n else set()


def hold_out_dev(corpus: Corpus, amount: float, per_speaker: int, num_trials: int, seed: int) -> list[str]:
    """Move `amount` of the training speakers (see hold_out_speakers) out of corpus.train into the trial list
    DEV_LIST, over at most `per_speaker` utterances each. Returns the held-out speakers (sorted)."""
    if DEV_LIST in corpus.trials:
        raise ManifestError(
            f"a trial list is named '{DEV_LIST}', which prepare.py reserves for held-out speakers; rename it"
        )
    held_out = hold_out_speakers([s for _, _, s in corpus.train], amount, seed)
    if held_out:
        rng = np.random.default_rng(seed)
        dev_utts = []
        for spk in sorted(held_out):
            mine = [u for u in corpus.train if u[2] == spk]
            keep = sorted(rng.choice(len(mine), size=min(len(mine), per_speaker), replace=False))
            dev_utts += [mine[k] for k in keep]
        corpus.train = [u for u in corpus.train if u[2] not in held_out]
        corpus.trials[DEV_LIST] = make_trials(dev_utts, num_trials, seed)
    return sorted(held_out)


def corpus_version(name: str) -> int | None:
    """The generator version behind a generated corpus (prepare.json records it: a newer one means stale data)."""
    if name != "demo":
        return None
    return CORPUS_VERSION


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


def worker_count(num_workers: int | None) -> int:
    """--num_workers, or by default the cores this process may run on: its affinity mask, which taskset, cgroup
    cpusets and batch schedulers narrow below os.cpu_count(); os.cpu_count() where the OS has no such call (macOS)."""
    if num_workers is not None:
        return num_workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def probe_all(paths: list[str], gain_db: float, vad: bool, num_workers: int, desc: str) -> list[Probe]:
    return pool_map(probe, [(p, gain_db, vad) for p in paths], num_workers, desc)


def pool_map(fn, jobs: list[tuple], num_workers: int, desc: str) -> list:
    """[fn(*job) for job in jobs], over `num_workers` processes, in order, with progress counted in files."""
    if num_workers > 1 and len(jobs) > 1:
        # spawn, not fork: a forked child of a process whose torch/OpenMP threads already ran can deadlock
        # in resample (seen when prepare.main runs inside a larger program, e.g. the tests).
        with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                results = pool.map(fn, *zip(*jobs, strict=True), chunksize=64)
                return list(progress(results, len(jobs), desc, "files"))
            except BaseException:  # an error (a full disk) or Ctrl-C ends the run now, not after the whole queue
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return [fn(*job) for job in progress(jobs, len(jobs), desc, "files")]


def workers_phrase(num_workers: int) -> str:
    return f"{num_workers} worker processes" if num_workers > 1 else "no worker processes"


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
