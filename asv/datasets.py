"""Torch-side loading of the prepared data (asv/manifest.py describes the files): the speaker-balanced
epoch sampler, the SUPERB training crops, whole test utterances, and the length-sorted evaluation batches."""

from __future__ import annotations

import gc
import json
import multiprocessing
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from asv.audio import apply_gain, load_audio, read_crop, sox_silence
from asv.augment import Augmenter, speed_perturb
from asv.conventions import SAMPLE_RATE
from asv.errors import BadAudioError, ManifestError
from asv.manifest import Utterance, read_train_csv

RERUN_PREPARE = "re-run prepare.py, which drops trials of bad files"
# Consecutive unreadable training files tolerated before concluding the data itself is gone.
MAX_SUBSTITUTES = 100


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


class PackedStrings:
    """Read-only strings in one bytes object plus an offsets array: three Python objects, whatever their count."""

    def __init__(self, strings: Sequence[str]):
        # Each string is encoded once only to measure it: a list of a million bytes objects would raise the peak.
        sizes = (len(s.encode("utf-8", "surrogatepass")) for s in strings)
        self._offsets = np.zeros(len(strings) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(sizes, dtype=np.int64, count=len(strings)), out=self._offsets[1:])
        self._blob = "".join(strings).encode("utf-8", "surrogatepass")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self._offsets[i : i + 2].tolist()
        return self._blob[start:end].decode("utf-8", "surrogatepass")


class UtteranceTable(Sequence):
    """Utterance rows in a few arrays rather than one Python object each; indexing builds the Utterance.

    DataLoader workers fork from the process that holds the rows, and reading a Python object writes its
    reference count, so over an epoch each worker would copy every page of a list of Utterances: ~0.9 KB a row,
    ~1 GB per worker on VoxCeleb2-dev's 1.09 M rows (bench/scale.py). Array buffers are only ever read, so they
    stay shared.
    """

    def __init__(self, utterances: Sequence[Utterance]):
        self.ids = PackedStrings([u.id for u in utterances])
        self.paths = PackedStrings([u.wav_path for u in utterances])
        names = sorted({u.spk for u in utterances})
        index = {spk: k for k, spk in enumerate(names)}
        # Packed too: holding on to the rows' own name strings would keep the allocator's pages around each of them.
        self.speaker_names = PackedStrings(names)
        self.speaker_index = np.fromiter((index[u.spk] for u in utterances), dtype=np.int32, count=len(utterances))
        self.num_samples = np.fromiter((u.num_samples for u in utterances), dtype=np.int64, count=len(utterances))

    def __len__(self) -> int:
        return len(self.num_samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        i = range(len(self))[i]  # a list's negative indices and IndexError
        spk = self.speaker_names[self.speaker_index[i]]
        return Utterance(self.ids[i], self.paths[i], spk, int(self.num_samples[i]))


def pack_intervals(per_row: Sequence[list]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (N + 1,), pairs (M, 2)), int64: row j's [start, end] intervals are pairs[offsets[j]:offsets[j + 1]]."""
    offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, per_row), dtype=np.int64, count=len(per_row)), out=offsets[1:])
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(per_row)), dtype=np.int64)
    if len(flat) != 2 * offsets[-1]:
        raise ManifestError("VAD intervals must be [start, end] pairs of sample indices")
    return offsets, flat.reshape(-1, 2)


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
        # Per-row metadata as arrays, which forked workers share instead of copying (UtteranceTable says why).
        self.utterances, self.speakers = UtteranceTable(utterances), speakers
        self.labels = np.fromiter((speakers[u.spk] for u in utterances), dtype=np.int64, count=len(utterances))
        self.interval_offsets, self.intervals = pack_intervals([intervals[u.id] for u in utterances])
        self.gain_db, self.seed, self.augment = gain_db, seed, augment
        self.max_samples = round(max_secs * SAMPLE_RATE)
        # Loads that failed since this process started, shared with the DataLoader workers; train.py
        # logs it as train/unreadable_files.
        self.num_unreadable = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.utterances)

    def crop(self, path: str, row: int, epoch: int, i: int) -> np.ndarray:
        """The training audio of item i in this epoch, read from row `row` (file `path`): a crop of the VAD'd
        signal, augmented if asked."""
        rng = np.random.default_rng([self.seed, epoch, i])
        intervals = self.intervals[self.interval_offsets[row] : self.interval_offsets[row + 1]]
        if self.augment is None:
            return read_crop(path, intervals, self.max_samples, rng, self.gain_db)
        aug_rng = np.random.default_rng([self.seed, epoch, i, 1])  # its own stream: the crop draw is unchanged
        speed = self.augment.pick_speed(aug_rng)
        # Read speed x max_samples so the perturbed crop is still max_secs long.
        wav = read_crop(path, intervals, round(self.max_samples * speed), rng, self.gain_db)
        wav = speed_perturb(wav, speed)[: self.max_samples]
        return self.augment(wav, aug_rng)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        # A file that went bad after prepare.py (deleted, overwritten, disk error) must not end a
        # days-long run: take the next utterance in the list instead. The substitute depends only on
        # the index, so the batch is the same on every rerun and in every worker.
        for k in range(MAX_SUBSTITUTES):
            row = (i + k) % len(self.utterances)
            path = self.utterances.paths[row]
            try:
                wav = self.crop(path, row, epoch, i)
                break
            except BadAudioError as err:
                with self.num_unreadable.get_lock():
                    self.num_unreadable.value += 1
                print(
                    f"warning: {err}; training on the next utterance instead (train/unreadable_files)", file=sys.stderr
                )
        else:
            # Subclasses AsvError, and takes one message argument as the DataLoader re-raises it in the main process.
            raise ManifestError(
                f"{MAX_SUBSTITUTES} training files in a row are unreadable (last: {path}): "
                "is the data directory still mounted?"
            )
        return torch.from_numpy(np.ascontiguousarray(wav)), int(self.labels[row])


def collate_train(batch):
    wavs, labels = zip(*batch, strict=True)
    lens = torch.tensor([len(w) for w in wavs])
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lens, torch.tensor(labels)


@contextmanager
def paused_gc():
    """The cyclic garbage collector off for a block (or a function, as a decorator) that builds millions of objects
    none of which can form a cycle: every full collection would walk them all, a third of the time load_train_set
    takes on 1.09 M rows. Reference counting still frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@paused_gc()
def load_train_set(data_dir: Path, min_secs: float, max_secs: float, seed: int, augment: Augmenter | None = None):
    """(TrainDataset, speakers, stats) from a prepared directory, applying the min_secs filter post-VAD."""
    data_dir = Path(data_dir)
    utterances = read_train_csv(data_dir / "train.csv")
    speakers_path = data_dir / "speakers.json"
    vad_path = data_dir / "vad.json"
    for p in (speakers_path, vad_path):
        if not p.is_file():
            raise ManifestError(f"{p} not found: run prepare.py on {data_dir} first")
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
        raise ManifestError(
            f"{vad_path} lacks {len(missing)} utterances of train.csv (e.g. {missing[0]}): "
            "re-run prepare.py with --force"
        )
    # SUPERB drops an utterance when len/16000 <= min_secs after VAD (spec 1.5 step 4).
    kept = [u for u in utterances if sum(e - s for s, e in vad["intervals"][u.id]) / SAMPLE_RATE > min_secs]
    if not kept:
        raise ManifestError(f"no training utterance in {data_dir} is longer than --min_secs {min_secs} after VAD")
    dataset = TrainDataset(kept, speakers, vad["intervals"], vad["gain_db"], max_secs, seed, augment)
    stats = {
        "utterances": len(kept),
        "dropped_short": len(utterances) - len(kept),
        "speakers": len({u.spk for u in kept}),
        "classes": len(speakers),
    }
    return dataset, speakers, stats


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
        try:
            wav = load_audio(path)
        except BadAudioError as err:  # it was fine when prepare.py checked every trial file
            raise BadAudioError(path, err.reason, "; ".join(filter(None, [err.detail, RERUN_PREPARE]))) from None
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
