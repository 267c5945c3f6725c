"""Prepared-data artifacts (the contract between prepare.py, train.py and evaluate.py) and datasets.

A prepared data directory holds:
  train.csv          id,wav_path,spk,num_samples   one row per training utterance (raw length in samples)
  speakers.json      {"id10001": 0, ...}           sorted speaker -> class index, the one place it is derived
  vad.json           {"gain_db": -3.0, "vad": "...", "intervals": {id: [[start, end], ...]}}
                     sample intervals the VAD keeps, computed once on the gained audio; their total
                     is the post-VAD length the min_secs filter uses
  trials/<name>.csv  id1,id2,wav_path1,wav_path2,label   label 1 = same speaker
Ids are VoxCeleb-style relative paths ("id10270/x6uYqmx31kE/00001.wav") and always strings.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from asv.audio import SAMPLE_RATE, apply_gain, keep_intervals, load_audio, random_crop, sox_silence, speech_intervals
from asv.augment import Augmenter, speed_perturb

TRAIN_FIELDS = ["id", "wav_path", "spk", "num_samples"]
TRIAL_FIELDS = ["id1", "id2", "wav_path1", "wav_path2", "label"]
# The sox command line SUPERB applies; recorded next to the cached intervals.
VAD_DESCRIPTION = "sox silence 1 0.1 0.1% -1 0.1 0.1%"


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


def _read_csv(path: Path, fields: list[str]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run prepare.py first (or pass the right --data_dir)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(fields) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; expected {','.join(fields)}")
        return list(reader)


def read_train_csv(path: Path) -> list[Utterance]:
    rows = _read_csv(path, TRAIN_FIELDS)
    return [Utterance(r["id"], r["wav_path"], r["spk"], int(r["num_samples"])) for r in rows]


def read_trials_csv(path: Path) -> list[Trial]:
    trials = []
    for line, r in enumerate(_read_csv(path, TRIAL_FIELDS), start=2):
        if r["label"] not in ("0", "1"):
            raise ValueError(f"{path}:{line}: label must be 0 or 1, got {r['label']!r}")
        trials.append(Trial(r["id1"], r["id2"], r["wav_path1"], r["wav_path2"], int(r["label"])))
    return trials


def read_voxceleb_trials(path: Path) -> list[tuple[int, str, str]]:
    """Parse a VoxCeleb trial list: '<1|0> <spk/video/utt.wav> <spk/video/utt.wav>' per line."""
    trials = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: expected '<1|0> <utt1> <utt2>', got {line.strip()[:80]!r}")
        trials.append((int(parts[0]), parts[1], parts[2]))
    return trials


def speaker_map(utterances: list[Utterance]) -> dict[str, int]:
    return {spk: i for i, spk in enumerate(sorted({u.spk for u in utterances}))}


def compute_vad(wav_path: str, gain_db: float) -> list[list[int]]:
    """Intervals the SUPERB VAD keeps for one file, on the gained signal (gain changes what is 'silence')."""
    wav = apply_gain(load_audio(wav_path), gain_db)
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

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        utt = self.utterances[i]
        wav = apply_gain(load_audio(utt.wav_path), self.gain_db)
        wav = keep_intervals(wav, self.intervals[utt.id])
        if self.augment is None:
            wav = random_crop(wav, self.max_samples, np.random.default_rng([self.seed, epoch, i]))
        else:
            aug_rng = np.random.default_rng([self.seed, epoch, i, 1])
            wav = speed_perturb(wav, self.augment.pick_speed(aug_rng))  # before the crop: crops keep max_secs
            wav = random_crop(wav, self.max_samples, np.random.default_rng([self.seed, epoch, i]))
            wav = self.augment(wav, aug_rng)
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
    """Whole test utterances, by default raw as SuperbASV scores them; `effects` applies gain + VAD."""

    def __init__(self, items: list[tuple[str, str]], effects: bool = False, gain_db: float = -3.0):
        self.items, self.effects, self.gain_db = items, effects, gain_db

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
    """Sorted unique (id, wav_path) over both trial columns: each is embedded exactly once."""
    seen = {}
    for t in trials:
        seen.setdefault(t.id1, t.wav_path1)
        seen.setdefault(t.id2, t.wav_path2)
    return sorted(seen.items())
