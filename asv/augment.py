"""Opt-in training augmentation (off by default: SUPERB trains on clean audio): speed perturbation,
reverberation with room impulse responses, additive noise.

Layouts are the usual ones: any directory tree of 16 kHz .wav files (MUSAN's noise/ music/ speech/,
the RIRS_NOISES simulated_rirs/ tree), searched recursively. Speed perturbation keeps the speaker label
(as NeMo does; WeSpeaker and ESPnet instead make each speed a new speaker, which triples the classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asv.audio import load_audio
from asv.conventions import SAMPLE_RATE
from asv.errors import AugmentError

SPEEDS = (0.9, 1.0, 1.1)


def list_wavs(directory: str, flag: str) -> list[str]:
    """Sorted .wav files under directory (recursively); a missing or empty directory is an error naming flag."""
    root = Path(directory)
    if not root.is_dir():
        raise AugmentError(f"{flag} {directory} is not a directory; pass a directory of 16 kHz .wav files")
    wavs = sorted(str(p) for p in root.rglob("*.wav"))
    if not wavs:
        raise AugmentError(f"{flag} {directory} has no .wav files (searched recursively); pass one that has")
    return wavs


def speed_perturb(wav: np.ndarray, speed: float) -> np.ndarray:
    """Play `speed` times faster (tempo and pitch, like sox `speed`): resample from speed*sr to sr."""
    if speed == 1.0:
        return wav
    out = AF.resample(torch.from_numpy(wav), orig_freq=round(SAMPLE_RATE * speed), new_freq=SAMPLE_RATE)
    return out.numpy()


def reverberate(wav: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with a unit-energy RIR, keep the original length, and restore the dry signal's power."""
    rir = rir / max(float(np.sqrt((rir**2).sum())), 1e-8)
    wet = AF.fftconvolve(torch.from_numpy(wav), torch.from_numpy(rir.astype(np.float32)))[: len(wav)].numpy()
    dry_power, wet_power = float((wav**2).mean()), float((wet**2).mean())
    return (wet * np.sqrt(dry_power / max(wet_power, 1e-12))).astype(np.float32)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wav + noise scaled so that 10 log10(P_wav / P_noise) = snr_db (noise tiled or cut to wav's length)."""
    noise = np.resize(noise, len(wav))  # np.resize repeats a short noise cyclically
    signal_power, noise_power = float((wav**2).mean()), float((noise**2).mean())
    scale = np.sqrt(signal_power / (max(noise_power, 1e-12) * 10.0 ** (snr_db / 10.0)))
    return (wav + scale * noise).astype(np.float32)


def read_segment(path: str, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random num_samples-long segment of a (possibly long, e.g. MUSAN) file, read without loading it all."""
    info = sf.info(path)
    if info.samplerate != SAMPLE_RATE:
        raise ValueError(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz (resample it first)")
    start = int(rng.integers(0, max(info.frames - num_samples, 0) + 1))
    seg, _ = sf.read(path, start=start, frames=num_samples, dtype="float32", always_2d=True)
    return seg.mean(axis=1)


@dataclass
class Augmenter:
    """The augmentations DataConfig switches on, applied in the order speed -> (crop) -> reverb -> noise."""

    noise_files: list[str]
    rir_files: list[str]
    snr_db: tuple[float, float]
    prob: float
    speed: bool

    def pick_speed(self, rng: np.random.Generator) -> float:
        return float(rng.choice(SPEEDS)) if self.speed else 1.0

    def __call__(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Reverb and noise on an already cropped utterance, each with probability `prob`."""
        if self.rir_files and rng.random() < self.prob:
            rir_path = self.rir_files[int(rng.integers(len(self.rir_files)))]
            wav = reverberate(wav, load_audio(rir_path))
        if self.noise_files and rng.random() < self.prob:
            noise_path = self.noise_files[int(rng.integers(len(self.noise_files)))]
            wav = add_noise(wav, read_segment(noise_path, len(wav), rng), float(rng.uniform(*self.snr_db)))
        return wav


def build_augmenter(data_cfg) -> Augmenter | None:
    """An Augmenter for the DataConfig's augmentation fields, or None when all are off (the default)."""
    if not (data_cfg.noise_dir or data_cfg.rir_dir or data_cfg.speed_perturb):
        return None
    if data_cfg.noise_snr_min_db > data_cfg.noise_snr_max_db:
        raise AugmentError("--noise_snr_min_db must not exceed --noise_snr_max_db")
    if not 0.0 <= data_cfg.aug_prob <= 1.0:
        raise AugmentError(f"--aug_prob {data_cfg.aug_prob} is not a probability; pass a value in [0, 1]")
    return Augmenter(
        noise_files=list_wavs(data_cfg.noise_dir, "--noise_dir") if data_cfg.noise_dir else [],
        rir_files=list_wavs(data_cfg.rir_dir, "--rir_dir") if data_cfg.rir_dir else [],
        snr_db=(data_cfg.noise_snr_min_db, data_cfg.noise_snr_max_db),
        prob=data_cfg.aug_prob,
        speed=data_cfg.speed_perturb,
    )
