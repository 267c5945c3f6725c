"""Torch-side loading of the prepared data (asv/manifest.py describes the files): the speaker-balanced
epoch sampler, the SUPERB training crops, whole test utterances, and the length-sorted evaluation batches."""

from __future__ import annotations

import json
import multiprocessing
import sys
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
            # Subclasses AsvError, and takes one message argument as the DataLoader re-raises it in the main process.
            raise ManifestError(
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
