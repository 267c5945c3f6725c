"""Opt-in augmentation (asv.augment): each transform against its definition, the dataset hook, the errors."""

import numpy as np
import pytest
import soundfile as sf

from asv.augment import (
    Augmenter,
    AugmentError,
    add_noise,
    build_augmenter,
    list_wavs,
    reverberate,
    speed_perturb,
)
from asv.config import DataConfig
from asv.datasets import TrainDataset
from asv.manifest import Utterance

SR = 16000


def write(path, wav):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.astype(np.float32), SR)


@pytest.fixture
def aug_dirs(tmp_path):
    """A MUSAN-like noise tree (nested, one file shorter than an utterance) and a directory of 2 RIRs."""
    rng = np.random.default_rng(0)
    write(tmp_path / "musan" / "noise" / "free-sound" / "a.wav", 0.1 * rng.standard_normal(3 * SR))
    write(tmp_path / "musan" / "music" / "b.wav", 0.1 * rng.standard_normal(SR // 2))
    for i in range(2):
        rir = np.zeros(SR // 4)
        rir[0] = 1.0
        rir[1:] = 0.3 * rng.standard_normal(SR // 4 - 1) * np.exp(-np.arange(1, SR // 4) / 800)
        write(tmp_path / "rirs" / "room" / f"rir{i}.wav", rir)
    return tmp_path / "musan", tmp_path / "rirs"


def test_off_by_default():
    assert build_augmenter(DataConfig()) is None


def test_missing_or_empty_directories_name_the_flag(tmp_path):
    with pytest.raises(AugmentError, match="^--noise_dir .*nope is not a directory"):
        build_augmenter(DataConfig(noise_dir=str(tmp_path / "nope")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(AugmentError, match="^--rir_dir .*empty has no .wav files"):
        build_augmenter(DataConfig(rir_dir=str(tmp_path / "empty")))
    with pytest.raises(AugmentError, match="--aug_prob"):
        build_augmenter(DataConfig(speed_perturb=True, aug_prob=1.5))


def test_wavs_are_found_recursively(aug_dirs):
    noise_dir, _ = aug_dirs
    found = list_wavs(str(noise_dir), "--noise_dir")
    assert [p.split("musan/")[1] for p in found] == ["music/b.wav", "noise/free-sound/a.wav"]


@pytest.mark.numerics
def test_add_noise_hits_the_requested_snr():
    rng = np.random.default_rng(1)
    wav, noise = rng.standard_normal(SR).astype(np.float32), 5 * rng.standard_normal(SR // 3).astype(np.float32)
    for snr in (0.0, 7.5, 20.0):
        out = add_noise(wav, noise, snr)
        added = out - wav
        assert len(out) == len(wav)
        assert 10 * np.log10((wav**2).mean() / (added**2).mean()) == pytest.approx(snr, abs=1e-3)
    # A short noise is repeated cyclically to cover the utterance.
    np.testing.assert_allclose(added[: SR // 3], added[SR // 3 : 2 * (SR // 3)], atol=1e-6)


@pytest.mark.numerics
def test_reverberate_is_normalised_convolution():
    rng = np.random.default_rng(2)
    wav = rng.standard_normal(4000).astype(np.float32)
    delta = np.zeros(100, dtype=np.float32)
    delta[0] = 3.0
    np.testing.assert_allclose(reverberate(wav, delta), wav, atol=1e-5)  # a pure delay-free gain: unchanged
    rir = np.array([1.0, 0.0, 0.5, -0.25], dtype=np.float32)
    expected = np.convolve(wav, rir)[: len(wav)]
    expected *= np.sqrt((wav**2).mean() / (expected**2).mean())  # the dry signal's power is kept
    np.testing.assert_allclose(reverberate(wav, rir), expected, rtol=1e-4, atol=1e-4)


def test_speed_perturb_changes_tempo_and_pitch():
    t = np.arange(2 * SR) / SR
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    for speed in (0.9, 1.1):
        out = speed_perturb(tone, speed)
        assert len(out) == pytest.approx(len(tone) / speed, abs=2)
        peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * SR / len(out)
        assert peak_hz == pytest.approx(1000 * speed, rel=0.01)
    assert speed_perturb(tone, 1.0) is tone


def test_dataset_hook_is_deterministic_and_keeps_labels(tmp_path, aug_dirs):
    noise_dir, rir_dir = aug_dirs
    rng = np.random.default_rng(3)
    utts = []
    for i in range(3):
        write(tmp_path / "utt" / f"{i}.wav", 0.3 * rng.standard_normal(4 * SR))
        utts.append(Utterance(f"u{i}", str(tmp_path / "utt" / f"{i}.wav"), f"spk{i % 2}", 4 * SR))
    intervals = {u.id: [[0, 4 * SR]] for u in utts}
    speakers = {"spk0": 0, "spk1": 1}
    cfg = DataConfig(noise_dir=str(noise_dir), rir_dir=str(rir_dir), speed_perturb=True, aug_prob=1.0)
    aug = build_augmenter(cfg)
    assert isinstance(aug, Augmenter) and len(aug.noise_files) == 2 and len(aug.rir_files) == 2
    clean = TrainDataset(utts, speakers, intervals, -3.0, max_secs=2.0, seed=0)
    noisy = TrainDataset(utts, speakers, intervals, -3.0, max_secs=2.0, seed=0, augment=aug)
    a, label = noisy[(0, 1)]
    b, _ = noisy[(0, 1)]
    assert label == clean[(0, 1)][1] == 1  # speed perturbation keeps the speaker
    assert np.array_equal(a.numpy(), b.numpy())  # keyed RNG: the same item in the same epoch is the same audio
    assert not np.array_equal(a.numpy(), noisy[(1, 1)][0].numpy())  # another epoch, another draw
    assert len(a) <= 2 * SR and not np.allclose(a.numpy()[: len(a)], clean[(0, 1)][0].numpy()[: len(a)])
