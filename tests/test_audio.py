"""Tests for asv.audio: I/O, gain, crop, and the sox `silence` VAD re-implementation."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from asv.audio import SAMPLE_RATE, apply_gain, load_audio, random_crop, sox_silence, speech_intervals

SR = SAMPLE_RATE
WINDOW = SR // 50  # sox's RMS window: 320 samples
HOLD = SR // 10  # 0.1 s holdoff: 1600 samples


def tone(seconds: float, amp: float = 0.5, freq: float = 220.0) -> np.ndarray:
    """A sine that starts at phase 0 (its first sample is exactly 0)."""
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    """Digital silence."""
    return np.zeros(int(round(seconds * SR)), dtype=np.float32)


def reference_silence(x: np.ndarray, threshold: float = 0.001) -> np.ndarray:
    """Sample-by-sample port of SoX 14.4 silence.c (mono, `silence 1 0.1 t -1 0.1 t`): the oracle."""
    samples = np.trunc(np.clip(x.astype(np.float64) * 2**31, -(2**31), 2**31 - 1))
    window = np.zeros(WINDOW)
    cur, rms_sum = 0, 0.0
    trimming, start_hold, stop_hold, out = True, [], [], []
    for s in samples:
        new_sum = rms_sum - window[cur] + s * s
        rms = int(np.sqrt(new_sum / WINDOW))  # compute_rms truncates to sox_sample_t
        above = rms / (2**31 - 1) * 100 > threshold * 100
        rms_sum = new_sum
        window[cur] = s * s
        cur = (cur + 1) % WINDOW
        if trimming:
            if not above:
                start_hold = []
                continue
            start_hold.append(s)
            if len(start_hold) >= HOLD:
                out += start_hold
                start_hold, trimming = [], False
        elif above:
            out += stop_hold + [s]
            stop_hold = []
        else:
            stop_hold.append(s)
            if len(stop_hold) >= HOLD:
                # restart: drop the held-back silence, zero the RMS window, trim again
                stop_hold, trimming = [], True
                window[:], cur, rms_sum = 0.0, 0, 0.0
    if not trimming:
        out += stop_hold  # drain() flushes short trailing silence
    return np.asarray(out) / 2**31


def test_gain_factor_is_exact():
    wav = np.ones(10, dtype=np.float32)
    np.testing.assert_allclose(apply_gain(wav, -3.0), 10 ** (-3.0 / 20), rtol=1e-7)
    np.testing.assert_allclose(apply_gain(wav, 6.0), 10 ** (6.0 / 20), rtol=1e-7)
    assert apply_gain(wav, 0.0).dtype == np.float32


def test_load_audio_downmixes_and_resamples(tmp_path):
    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.25)], axis=1)
    sf.write(tmp_path / "st.wav", stereo, SR, subtype="PCM_16")
    wav = load_audio(tmp_path / "st.wav")
    assert wav.dtype == np.float32 and wav.shape == (100,)
    np.testing.assert_allclose(wav, 0.125, atol=1e-4)
    sf.write(tmp_path / "r8k.wav", stereo[:, 0], 8000)
    assert load_audio(tmp_path / "r8k.wav").shape == (200,)  # resampled to 16 kHz (tests/test_faults.py)


def test_random_crop():
    wav = np.arange(1000, dtype=np.float32)
    rng = np.random.default_rng(0)
    crops = [random_crop(wav, 300, rng) for _ in range(50)]
    assert all(len(c) == 300 and np.all(np.diff(c) == 1) for c in crops)
    assert len({int(c[0]) for c in crops}) > 10  # the start actually varies
    assert {int(c[0]) for c in crops} <= set(range(701))
    assert random_crop(wav, 2000, rng) is wav


def test_vad_known_silences():
    # 0.5 s sil | 1 s tone | 0.3 s sil | 1 s tone | 0.05 s sil | 0.5 s tone | 1 s sil
    wav = np.concatenate([silence(0.5), tone(1.0), silence(0.3), tone(1.0), silence(0.05), tone(0.5), silence(1.0)])
    out = sox_silence(wav)
    # Documented behaviour: every tone is kept from its onset; the 0.05 s gap (< 0.1 s) is kept;
    # each long silence is cut, except for the <= 20 ms during which the RMS window still holds tone
    # energy (counted as non-silent); leading and trailing silence go. Tolerance: one RMS window
    # (320 samples) per tone edge.
    expected = SR * (1.0 + 1.0 + 0.05 + 0.5) + 2 * (WINDOW - 1)
    assert abs(len(out) - expected) <= 2 * WINDOW
    assert np.abs(out[:WINDOW]).max() > 0.1  # leading silence gone: starts within the tone's 1st window
    # Trailing silence: kept only while the window still holds a tone sample (window - 1 samples).
    assert np.count_nonzero(out[-(WINDOW - 1) :]) == 0 and out[-WINDOW] != 0
    intervals = speech_intervals(wav)
    assert len(intervals) == 2  # one cut at the 0.3 s silence; the 0.05 s gap is not cut
    assert abs(intervals[0][0] - int(0.5 * SR)) < WINDOW
    assert abs(intervals[1][0] - int(1.8 * SR)) < WINDOW
    assert intervals[1][1] > int(3.35 * SR)  # second interval runs through the short gap


def test_vad_short_burst_after_long_silence_is_dropped():
    with_burst = np.concatenate([tone(1.0), silence(0.5), tone(0.05), silence(0.5), tone(1.0)])
    without = np.concatenate([tone(1.0), silence(0.5), silence(0.05), silence(0.5), tone(1.0)])
    assert len(sox_silence(with_burst)) == len(sox_silence(without))
    # A 0.15 s burst is long enough to survive start trimming.
    longer = np.concatenate([tone(1.0), silence(0.5), tone(0.15), silence(0.5), tone(1.0)])
    assert len(sox_silence(longer)) > len(sox_silence(without)) + int(0.14 * SR)


def test_vad_silent_and_quiet_inputs_become_empty():
    assert len(sox_silence(silence(2.0))) == 0
    quiet = np.random.default_rng(0).normal(0, 2e-4, SR).astype(np.float32)  # RMS 0.02 % < 0.1 %
    assert len(sox_silence(quiet)) == 0
    assert len(sox_silence(tone(0.09))) == 0  # shorter than the 0.1 s start holdoff
    assert len(sox_silence(np.zeros(0, dtype=np.float32))) == 0


def test_vad_no_restart_stops_at_first_long_silence():
    wav = np.concatenate([silence(0.2), tone(0.5), silence(0.3), tone(0.5)])
    intervals = speech_intervals(wav, below_periods=1)
    assert len(intervals) == 1 and intervals[0][1] < int(0.8 * SR)


def random_signal(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Noise segments around and far from the 0.1 % threshold, with silences and short bursts."""
    parts, total = [], 0
    while total < seconds * SR:
        length = int(rng.uniform(0.01, 0.4) * SR)
        level = rng.choice([1e-5, 1e-3 * rng.uniform(0.5, 1.6), 10 ** rng.uniform(-2, -0.7)])
        parts.append(rng.normal(0, level, length))
        total += length
    return np.clip(np.concatenate(parts), -1, 1).astype(np.float32)


@pytest.mark.numerics
def test_vad_matches_sample_loop_port_of_silence_c():
    rng = np.random.default_rng(1)
    for _ in range(12):
        wav = random_signal(rng, 1.5)
        expected = reference_silence(wav)
        got = sox_silence(wav).astype(np.float64)
        assert len(got) == len(expected)
        np.testing.assert_allclose(got, expected, atol=2**-30)


@pytest.mark.numerics
def test_vad_restart_zeroes_the_rms_window():
    # Just below the threshold until the restart, then just above it: with a continuous window the
    # quiet part would count at once, but sox zeroes the window on restart, so the RMS has to build up.
    quiet, loud = 0.95e-3, 1.1e-3
    square = np.where(np.arange(SR) % 2 == 0, 1.0, -1.0)  # RMS exactly 1
    probe = np.concatenate([tone(0.3), quiet * square])
    restart_at = speech_intervals(probe)[0][1] + HOLD
    wav = np.concatenate([probe[:restart_at], loud * square[: SR // 2]]).astype(np.float32)
    intervals = speech_intervals(wav)
    assert len(intervals) == 2
    assert intervals[1][0] > restart_at + int(0.7 * WINDOW)  # needs (1e-3 / loud)**2 = 0.83 window
    np.testing.assert_allclose(sox_silence(wav), reference_silence(wav), atol=2**-30)


def test_vad_is_fast():
    wav = random_signal(np.random.default_rng(2), 20.0)
    sox_silence(wav)
    start = time.perf_counter()
    sox_silence(wav)
    assert time.perf_counter() - start < 0.25  # ~10 ms on 2 CPU cores; generous for CI


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox binary not installed")
@pytest.mark.numerics
def test_vad_matches_sox_binary(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(10):
        wav = random_signal(rng, 2.0)
        # 32-bit PCM keeps sox's input precision at 32 bits, like float tensors in torchaudio.
        ints = np.trunc(np.clip(wav.astype(np.float64) * 2**31, -(2**31), 2**31 - 1)).astype(np.int32)
        src, dst = tmp_path / f"in{i}.wav", tmp_path / f"out{i}.wav"
        sf.write(src, ints, SR, subtype="PCM_32")
        cmd = ["sox", src, "-b", "32", "-e", "signed", dst, "silence", "1", "0.1", "0.1%", "-1", "0.1", "0.1%"]
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
        ref = sf.read(dst, dtype="int32")[0] if sf.info(dst).frames else np.zeros(0, np.int32)
        kept = [ints[s:e] for s, e in speech_intervals(ints / 2**31)]
        ours = np.concatenate(kept) if kept else np.zeros(0, np.int32)
        np.testing.assert_array_equal(ours, ref)


def test_read_crop_equals_cropping_the_whole_decoded_signal(tmp_path):
    from asv.audio import keep_intervals, read_crop

    rng = np.random.default_rng(0)
    for channels in (1, 2):
        wav = (rng.standard_normal((48_000, channels)) * 0.1).astype(np.float32)
        path = tmp_path / f"x{channels}.wav"
        sf.write(path, wav, 16000, subtype="PCM_16")
        for trial in range(30):
            cuts = np.sort(rng.choice(48_000, size=2 * rng.integers(1, 6), replace=False)).reshape(-1, 2)
            max_samples = int(rng.integers(100, 30_000))
            whole = keep_intervals(apply_gain(load_audio(path), -3.0), cuts.tolist())
            expected = random_crop(whole, max_samples, np.random.default_rng(trial))
            got = read_crop(path, cuts.tolist(), max_samples, np.random.default_rng(trial), -3.0)
            np.testing.assert_array_equal(got, expected)
    assert len(read_crop(path, [], 1000, np.random.default_rng(0))) == 0
