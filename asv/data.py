"""Prepared-data artifacts (the contract between prepare.py, train.py and evaluate.py) and datasets.

A prepared data directory holds:
  train.csv          id,wav_path,spk,num_samples   one row per training utterance (raw length in samples)
  speakers.json      {"id10001": 0, ...}           sorted speaker -> class index, the one place it is derived
  vad.json           {"gain_db": -3.0, "vad": "...", "intervals": {id: [[start, end], ...]}}
                     sample intervals the VAD keeps, computed once on the gained audio; their total
                     is the post-VAD length the min_secs filter uses
  trials/<name>.csv  id1,id2,wav_path1,wav_path2,label   label 1 = same speaker
  bad_files.txt      path<TAB>reason<TAB>detail         files prepare.py could not use (excluded from the above)
Ids are VoxCeleb-style relative paths ("id10270/x6uYqmx31kE/00001.wav") and always strings.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from asv.audio import SAMPLE_RATE, BadAudioError, apply_gain, load_audio, read_crop, sox_silence, speech_intervals
from asv.augment import Augmenter, speed_perturb
from asv.errors import ManifestError

TRAIN_FIELDS = ["id", "wav_path", "spk", "num_samples"]
TRIAL_FIELDS = ["id1", "id2", "wav_path1", "wav_path2", "label"]
# The trial list prepare.py builds from held-out training speakers (trials/dev.csv): it selects checkpoints.
DEV_LIST = "dev"
# The sox command line SUPERB applies; recorded next to the cached intervals.
VAD_DESCRIPTION = "sox silence 1 0.1 0.1% -1 0.1 0.1%"
# Consecutive unreadable training files tolerated before concluding the data itself is gone.
MAX_SUBSTITUTES = 100


@dataclass
class Utterance:
    id: str
    wav_path: str
    spk: str
    num_samples: int


@dataclass
class Trial:
    id1: str
    id2: str
    wav_path1: str
    wav_path2: str
    label: int


# ----------------------------------------------------------------------------- manifests


def write_csv(path: Path, fields: list[str], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([getattr(row, k) for k in fields])
    tmp.replace(path)  # never leave a half-written manifest behind


def _read_csv(path: Path, fields: list[str]) -> list[tuple[int, dict]]:
    """(line number, row) pairs; every value a string (ids like '00012' keep their zeros: s3prl#481)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run prepare.py first (or pass the right --data_dir)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(fields) - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected {','.join(fields)}")
        rows = []
        for r in reader:
            line = reader.line_num
            # DictReader files extra cells under None and fills missing ones with None.
            if None in r or any(r[k] is None for k in fields):
                raise ManifestError(f"{path}:{line}: expected {len(reader.fieldnames)} comma-separated fields")
            empty = [k for k in fields if not r[k].strip()]
            if empty:
                raise ManifestError(f"{path}:{line}: empty {empty[0]}")
            rows.append((line, r))
        return rows


def read_train_csv(path: Path) -> list[Utterance]:
    utterances, first_line = [], {}
    for line, r in _read_csv(path, TRAIN_FIELDS):
        if r["id"] in first_line:
            raise ManifestError(f"{path}:{line}: duplicate id {r['id']!r} (first at line {first_line[r['id']]})")
        first_line[r["id"]] = line
        if not r["num_samples"].isdigit():
            raise ManifestError(f"{path}:{line}: num_samples must be a non-negative integer, got {r['num_samples']!r}")
        utterances.append(Utterance(r["id"], r["wav_path"], r["spk"], int(r["num_samples"])))
    return utterances


def dedup_trials(path: Path, rows: list[tuple[int, Trial]]) -> tuple[list[Trial], int]:
    """Drop repeated pairs (in either order) with the same label and count them; a pair listed with both
    labels is an error. An utterance id must always name the same file."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    paths: dict[str, tuple[str, int]] = {}
    kept, duplicates = [], 0
    for line, t in rows:
        for utt, wav in ((t.id1, t.wav_path1), (t.id2, t.wav_path2)):
            prev = paths.setdefault(utt, (wav, line))
            if prev[0] != wav:
                raise ManifestError(f"{path}:{line}: id {utt!r} is {wav}, but {prev[0]} at line {prev[1]}")
        key = (min(t.id1, t.id2), max(t.id1, t.id2))
        if key in seen:
            first, label = seen[key]
            if label != t.label:
                raise ManifestError(f"{path}:{line}: pair listed with label {t.label} here and {label} at line {first}")
            duplicates += 1
            continue
        seen[key] = (line, t.label)
        kept.append(t)
    return kept, duplicates


def _warn_duplicates(path: Path, duplicates: int) -> None:
    if duplicates:
        print(f"warning: {path}: dropped {duplicates} duplicate trial(s) (same pair and label listed again)")


def read_trials_csv(path: Path) -> list[Trial]:
    rows = []
    for line, r in _read_csv(path, TRIAL_FIELDS):
        if r["label"] not in ("0", "1"):
            raise ManifestError(f"{path}:{line}: label must be 0 or 1, got {r['label']!r}")
        rows.append((line, Trial(r["id1"], r["id2"], r["wav_path1"], r["wav_path2"], int(r["label"]))))
    trials, duplicates = dedup_trials(path, rows)
    _warn_duplicates(path, duplicates)
    return trials


def read_voxceleb_trials(path: Path) -> list[tuple[int, str, str]]:
    """Parse a VoxCeleb trial list: '<1|0> <spk/video/utt.wav> <spk/video/utt.wav>' per line.
    Ids stay strings; repeated pairs are dropped with a warning (dedup_trials)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ManifestError(f"{path}:{n}: expected '<1|0> <utt1> <utt2>', got {line.strip()[:80]!r}")
        rows.append((n, Trial(parts[1], parts[2], parts[1], parts[2], int(parts[0]))))
    trials, duplicates = dedup_trials(path, rows)
    _warn_duplicates(path, duplicates)
    return [(t.label, t.id1, t.id2) for t in trials]


def speaker_map(utterances: list[Utterance]) -> dict[str, int]:
    return {spk: i for i, spk in enumerate(sorted({u.spk for u in utterances}))}


def compute_vad(wav: np.ndarray | str, gain_db: float) -> list[list[int]]:
    """Intervals the SUPERB VAD keeps for one file (or its loaded samples), on the gained signal
    (gain changes what is 'silence')."""
    wav = apply_gain(load_audio(wav) if isinstance(wav, str | Path) else wav, gain_db)
    return [[int(s), int(e)] for s, e in speech_intervals(wav, SAMPLE_RATE)]


def trial_sets(data_dir: Path) -> dict[str, Path]:
    """Prepared trial lists by name (file stem)."""
    return {p.stem: p for p in sorted((Path(data_dir) / "trials").glob("*.csv"))}


# ----------------------------------------------------------------------------- training data


class EpochSampler(Sampler):
    """Random permutation of the dataset, seeded by `seed + epoch`, yielding (epoch, index) keys.

    The epoch travels with each index so the dataset's crop RNG can depend on it even inside
    persistent workers. The sampler is rank-unaware: Accelerate shards its batches across processes.
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        for i in torch.randperm(self.num_items, generator=g).tolist():
            yield self.epoch, i


class TrainDataset(Dataset):
    """SUPERB train audio: gain, VAD (from the cached intervals), random crop of at most max_secs.

    The crop is drawn from an RNG keyed by (seed, epoch, index): crops differ between epochs, do not
    depend on which worker loads the item (s3prl replays the same stream every epoch), and a resumed
    run draws exactly the crops the uninterrupted run would have. The optional augmentation (asv.augment,
    off by default) draws from its own stream keyed the same way plus a constant, so it is reproducible
    too and switching it on leaves the crop stream alone.
    """

    def __init__(
        self,
        utterances: list[Utterance],
        speakers: dict[str, int],
        intervals: dict[str, list],
        gain_db: float,
        max_secs: float,
        seed: int,
        augment: Augmenter | None = None,
    ):
        self.utterances, self.speakers, self.intervals = utterances, speakers, intervals
        self.gain_db, self.seed, self.augment = gain_db, seed, augment
        self.max_samples = round(max_secs * SAMPLE_RATE)
        # Loads that failed since this process started, shared with the DataLoader workers; train.py
        # logs it as train/unreadable_files.
        self.num_unreadable = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.utterances)

    def crop(self, utt: Utterance, epoch: int, i: int) -> np.ndarray:
        """The training audio of item i in this epoch: a crop of the VAD'd signal, augmented if asked."""
        rng = np.random.default_rng([self.seed, epoch, i])
        if self.augment is None:
            return read_crop(utt.wav_path, self.intervals[utt.id], self.max_samples, rng, self.gain_db)
        aug_rng = np.random.default_rng([self.seed, epoch, i, 1])  # its own stream: the crop draw is unchanged
        speed = self.augment.pick_speed(aug_rng)
        # Read speed x max_samples so the perturbed crop is still max_secs long.
        wav = read_crop(utt.wav_path, self.intervals[utt.id], round(self.max_samples * speed), rng, self.gain_db)
        wav = speed_perturb(wav, speed)[: self.max_samples]
        return self.augment(wav, aug_rng)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        # A file that went bad after prepare.py (deleted, overwritten, disk error) must not end a
        # days-long run: take the next utterance in the list instead. The substitute depends only on
        # the index, so the batch is the same on every rerun and in every worker.
        for k in range(MAX_SUBSTITUTES):
            utt = self.utterances[(i + k) % len(self.utterances)]
            try:
                wav = self.crop(utt, epoch, i)
                break
            except BadAudioError as err:
                with self.num_unreadable.get_lock():
                    self.num_unreadable.value += 1
                print(
                    f"warning: {err}; training on the next utterance instead (train/unreadable_files)", file=sys.stderr
                )
        else:
            raise RuntimeError(
                f"{MAX_SUBSTITUTES} training files in a row are unreadable (last: {utt.wav_path}): "
                "is the data directory still mounted?"
            )
        return torch.from_numpy(np.ascontiguousarray(wav)), self.speakers[utt.spk]


def collate_train(batch):
    wavs, labels = zip(*batch, strict=True)
    lens = torch.tensor([len(w) for w in wavs])
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens, torch.tensor(labels)


def load_train_set(data_dir: Path, min_secs: float, max_secs: float, seed: int, augment: Augmenter | None = None):
    """(TrainDataset, speakers, stats) from a prepared directory, applying the min_secs filter post-VAD."""
    data_dir = Path(data_dir)
    utterances = read_train_csv(data_dir / "train.csv")
    speakers_path = data_dir / "speakers.json"
    vad_path = data_dir / "vad.json"
    for p in (speakers_path, vad_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run prepare.py on {data_dir} first")
    speakers = json.loads(speakers_path.read_text())
    vad = json.loads(vad_path.read_text())
    unknown = [u for u in utterances if u.spk not in speakers]
    if unknown:
        raise ManifestError(
            f"{data_dir / 'train.csv'}: speaker {unknown[0].spk!r} of {unknown[0].id} is not in {speakers_path} "
            "(files from different prepare.py runs?): re-run prepare.py with --force"
        )
    missing = [u.id for u in utterances if u.id not in vad["intervals"]]
    if missing:
        raise ValueError(
            f"{vad_path} lacks {len(missing)} utterances of train.csv (e.g. {missing[0]}): "
            "re-run prepare.py with --force"
        )
    # SUPERB drops an utterance when len/16000 <= min_secs after VAD (spec 1.5 step 4).
    kept = [u for u in utterances if sum(e - s for s, e in vad["intervals"][u.id]) / SAMPLE_RATE > min_secs]
    if not kept:
        raise ValueError(f"no training utterance in {data_dir} is longer than --min_secs {min_secs} after VAD")
    dataset = TrainDataset(kept, speakers, vad["intervals"], vad["gain_db"], max_secs, seed, augment)
    stats = {
        "utterances": len(kept),
        "dropped_short": len(utterances) - len(kept),
        "speakers": len({u.spk for u in kept}),
        "classes": len(speakers),
    }
    return dataset, speakers, stats


# ----------------------------------------------------------------------------- test data


class EvalDataset(Dataset):
    """Whole test utterances, by default raw as SuperbASV scores them; `effects` applies gain + VAD.

    An utterance shorter than `min_samples` (what the x-vector needs for 15 upstream frames) is
    wrap-padded, i.e. repeated until it is long enough, as voxceleb_trainer's loader pads: the
    embedding then pools real speech frames, where zero-padding would pool silence.
    """

    def __init__(
        self, items: list[tuple[str, str]], effects: bool = False, gain_db: float = -3.0, min_samples: int = 0
    ):
        self.items, self.effects, self.gain_db, self.min_samples = items, effects, gain_db, min_samples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        utt_id, path = self.items[i]
        wav = load_audio(path)
        if self.effects:
            wav = apply_gain(wav, self.gain_db)
            kept = sox_silence(wav, SAMPLE_RATE)
            # An all-silent file would vanish; score it raw rather than fail.
            if len(kept):
                wav = kept
        if len(wav) < self.min_samples:
            wav = np.pad(wav, (0, self.min_samples - len(wav)), mode="wrap")
        return i, torch.from_numpy(np.ascontiguousarray(wav))


def collate_eval(batch):
    idx, wavs = zip(*batch, strict=True)
    lens = torch.tensor([len(w) for w in wavs])
    return torch.tensor(idx), torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens


def length_buckets(lengths: list[int], max_frames: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches whose padded size (items x longest) stays within
    max_frames samples; an utterance longer than the budget gets a batch of its own."""
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Ascending order: the item being added is the batch's longest.
        if current and (len(current) + 1) * lengths[i] > max_frames:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def unique_utterances(trials: list[Trial]) -> list[tuple[str, str]]:
    """Unique (id, wav_path) over both trial columns, sorted by path: each audio file is embedded exactly
    once, even when two lists name it differently."""
    seen = {}
    for t in trials:
        seen.setdefault(t.wav_path1, t.id1)
        seen.setdefault(t.wav_path2, t.id2)
    return [(i, p) for p, i in sorted(seen.items())]


def hold_out_speakers(speakers: list[str], amount: float, seed: int) -> set[str]:
    """The speakers kept out of training for model selection: `amount` < 1 is a fraction of them
    (rounded up, at least 2: a dev list needs non-target trials), >= 1 a count; 0 keeps everyone in
    training (exact SUPERB parity)."""
    names = sorted(set(speakers))
    n = max(2, int(np.ceil(amount * len(names)))) if 0 < amount < 1 else int(amount)
    if n == 1:
        raise ValueError("a dev list needs at least 2 held-out speakers (non-target trials); pass 0 or >= 2")
    if n < 0 or n > len(names) - 2:
        raise ValueError(f"cannot hold out {n} of {len(names)} training speakers (at least 2 must train); pass 0")
    return set(np.random.default_rng(seed).choice(names, size=n, replace=False).tolist()) if n else set()


def make_trials(utts: list[tuple[str, str, str]], num_trials: int, seed: int) -> list[Trial]:
    """Balanced trials over (id, wav_path, spk): half same-speaker pairs drawn without replacement (all of
    them when fewer exist), as many different-speaker pairs; sorted, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    by_spk: dict[str, list[int]] = {}
    for i, (_, _, spk) in enumerate(utts):
        by_spk.setdefault(spk, []).append(i)
    targets = [(a, b) for idx in by_spk.values() for k, a in enumerate(idx) for b in idx[k + 1 :]]
    non_targets = len(utts) * (len(utts) - 1) // 2 - len(targets)
    n = min(num_trials // 2, len(targets), non_targets)
    chosen = [targets[j] for j in rng.choice(len(targets), size=n, replace=False)]
    spk = np.array([s for _, _, s in utts])
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n:
        a, b = rng.integers(len(utts), size=2)
        if spk[a] != spk[b]:
            pairs.add((int(min(a, b)), int(max(a, b))))
    rows = [(1, a, b) for a, b in chosen] + [(0, a, b) for a, b in sorted(pairs)]
    return sorted(
        (Trial(utts[a][0], utts[b][0], utts[a][1], utts[b][1], label) for label, a, b in rows),
        key=lambda t: (t.id1, t.id2),
    )
