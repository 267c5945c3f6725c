"""Deterministic synthetic multi-speaker corpus in VoxCeleb1 layout: the project's offline demo data.

Each speaker is a source-filter voice drawn from the seed: a glottal pulse train with the speaker's
own pitch range, jitter, shimmer, breathiness and spectral tilt, shaped by vowel formants scaled by a
vocal-tract length and perturbed by speaker-specific offsets. Each utterance draws new content (a
random syllable sequence of vowels, fricatives, nasals and pauses), speaking rate and intonation.
Each video (recording session) draws a channel: a random EQ, band limits, additive noise at
10-30 dB SNR and a level; half of the videos are noise-gated (as VoIP front-ends do), so their pauses
and leading/trailing silences are near-digital silence that sox's `silence` VAD removes.

Layout (paths relative to `root`):
    dev/wav/<spk>/<video>/<utt>.wav   training speakers (id00001, ...)
    test/wav/<spk>/<video>/<utt>.wav  test speakers (id10001, ...), disjoint from training
    trials.txt                        "<1|0> <spk/video/utt.wav> <spk/video/utt.wav>" against test/wav
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from asv.conventions import SAMPLE_RATE
from asv.manifest import make_trials

# Bump when the generator changes what a seed produces, so prepare.py regenerates a stale corpus.
CORPUS_VERSION = 3

# F1-F4 (Hz) of six vowels for an adult male vocal tract (Peterson & Barney-like averages).
VOWEL_FORMANTS = np.array(
    [
        [730, 1090, 2440, 3400],  # a
        [270, 2290, 3010, 3700],  # i
        [300, 870, 2240, 3300],  # u
        [530, 1840, 2480, 3500],  # e
        [570, 840, 2410, 3300],  # o
        [660, 1720, 2410, 3400],  # ae
    ],
    dtype=np.float64,
)
FORMANT_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0])
NASAL_FORMANTS = np.array([250.0, 1000.0, 2200.0, 3300.0])
_VIDEO_ID_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


@dataclass
class Voice:
    """Speaker-level parameters of the source-filter model."""

    f0_hz: float  # median pitch
    f0_range_st: float  # intonation excursion, semitones
    jitter: float  # per-period timing perturbation, fraction of the period
    shimmer: float  # per-period amplitude perturbation, fraction
    breathiness: float  # aspiration-noise level relative to the pulse train
    tilt_pole: float  # glottal low-pass pole: closer to 1 = darker voice
    formant_scale: float  # 1 / relative vocal-tract length
    formant_offsets: np.ndarray  # (6, 4) multiplicative per-vowel, per-formant offsets
    bandwidth_scale: float
    rate: float  # syllables are 1 / rate as long
    vowel_weights: np.ndarray  # (6,) how often each vowel occurs (accent / idiolect)


def draw_voice(rng: np.random.Generator) -> Voice:
    """Draw a speaker; the ranges overlap so that no single cue separates everyone."""
    female = rng.random() < 0.5
    # Vocal-tract length and pitch are correlated with sex but overlap across speakers.
    return Voice(
        f0_hz=float(np.exp(rng.normal(np.log(205.0 if female else 118.0), 0.4))),
        f0_range_st=float(rng.uniform(0.3, 1.5)),
        jitter=float(rng.uniform(0.003, 0.025)),
        shimmer=float(rng.uniform(0.02, 0.12)),
        breathiness=float(np.exp(rng.uniform(np.log(0.02), np.log(0.4)))),
        tilt_pole=float(rng.uniform(0.80, 0.97)),
        formant_scale=float(rng.normal(1.15 if female else 1.0, 0.08)),
        formant_offsets=np.exp(rng.normal(0.0, 0.12, VOWEL_FORMANTS.shape)),
        bandwidth_scale=float(rng.uniform(0.7, 1.6)),
        rate=float(rng.uniform(0.8, 1.25)),
        vowel_weights=rng.dirichlet(np.full(len(VOWEL_FORMANTS), 2.0)),
    )


def _resonator_poles(freqs: np.ndarray, bandwidths: np.ndarray, sr: int) -> np.ndarray:
    """Denominator of a cascade of two-pole resonators (all formants in one IIR filter)."""
    freqs = np.minimum(freqs, 0.45 * sr)
    radius = np.exp(-np.pi * bandwidths / sr)
    a = np.ones(1)
    for f, r in zip(freqs, radius, strict=True):
        a = np.convolve(a, [1.0, -2.0 * r * np.cos(2 * np.pi * f / sr), r * r])
    return a


def _fade(n: int, sr: int) -> np.ndarray:
    """Raised-cosine on/off ramps (10 ms or a third of the segment) to avoid clicks."""
    ramp = min(int(0.01 * sr), n // 3)
    env = np.ones(n)
    if ramp > 0:
        up = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[:ramp], env[n - ramp :] = up, up[::-1]
    return env


def _glottal_source(voice: Voice, n: int, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Pulse train following a random intonation contour, with jitter, shimmer, tilt and breath."""
    t = np.arange(n) / sr
    # Intonation: declination plus a few slow random sinusoids, in semitones around the median.
    contour = voice.f0_range_st * (0.5 - t / max(t[-1], 1e-3))
    for _ in range(3):
        contour += (
            voice.f0_range_st
            * 0.5
            * rng.uniform(-1, 1)
            * np.sin(2 * np.pi * rng.uniform(0.3, 3) * t + rng.uniform(0, 2 * np.pi))
        )
    f0 = voice.f0_hz * rng.uniform(0.97, 1.03) * 2.0 ** (contour / 12)
    phase = np.cumsum(f0 / sr)
    pulses = np.flatnonzero(np.diff(np.floor(phase)) > 0) + 1
    # Jitter moves each glottal closure by a fraction of its period; shimmer scales its amplitude.
    period = sr / f0[pulses]
    pulses = np.clip(np.round(pulses + voice.jitter * period * rng.standard_normal(len(pulses))), 0, n - 1)
    source = np.zeros(n)
    np.add.at(source, pulses.astype(np.int64), 1.0 + voice.shimmer * rng.standard_normal(len(pulses)))
    # Glottal flow spectrum (two real poles = spectral tilt), then lip radiation (first difference).
    source = signal.lfilter([1.0], np.convolve([1.0, -voice.tilt_pole], [1.0, -voice.tilt_pole]), source)
    source = signal.lfilter([1.0, -0.97], [1.0], source)
    source /= np.sqrt(np.mean(source**2)) + 1e-12
    return source + voice.breathiness * rng.standard_normal(n)


def synth_utterance(voice: Voice, seconds: float, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One utterance of `seconds` (speech plus pauses, no leading/trailing silence), peak 1."""
    n = int(seconds * sr)
    rate = voice.rate * rng.uniform(0.85, 1.15)
    source = _glottal_source(voice, n, rng, sr)
    out = np.zeros(n)
    pos = int(rng.uniform(0.0, 0.05) * sr)
    while pos < n:
        # Syllable: optional consonant onset, then a vowel; pauses between words.
        kind = rng.choice(3, p=[0.45, 0.2, 0.35])  # fricative, nasal, none
        if kind < 2:
            length = int(rng.uniform(0.04, 0.12) / rate * sr)
            seg = slice(pos, min(pos + length, n))
            m = seg.stop - seg.start
            if kind == 0:  # fricative: band-passed noise, place of articulation drawn per segment
                centre = rng.uniform(2500, 6500) * voice.formant_scale
                a = _resonator_poles(np.array([centre]), np.array([rng.uniform(800, 2500)]), sr)
                noise = signal.lfilter([1.0], a, rng.standard_normal(m))
                level = rng.uniform(0.05, 0.3)
            else:  # nasal: voiced, low first formant
                a = _resonator_poles(NASAL_FORMANTS * voice.formant_scale, FORMANT_BANDWIDTHS * 1.5, sr)
                noise = signal.lfilter([1.0], a, source[seg])
                level = rng.uniform(0.15, 0.4)
            out[seg] += level * noise / (np.sqrt(np.mean(noise**2)) + 1e-12) * _fade(m, sr)
            pos = seg.stop
        if pos >= n:
            break
        vowel = rng.choice(len(VOWEL_FORMANTS), p=voice.vowel_weights)
        length = int(rng.uniform(0.08, 0.25) / rate * sr)
        seg = slice(pos, min(pos + length, n))
        m = seg.stop - seg.start
        formants = VOWEL_FORMANTS[vowel] * voice.formant_offsets[vowel] * voice.formant_scale
        formants *= np.exp(rng.normal(0.0, 0.03, 4))  # coarticulation / token variation
        a = _resonator_poles(formants, FORMANT_BANDWIDTHS * voice.bandwidth_scale, sr)
        vowel_wav = signal.lfilter([1.0], a, source[seg])
        out[seg] += rng.uniform(0.5, 1.0) * vowel_wav / (np.sqrt(np.mean(vowel_wav**2)) + 1e-12) * _fade(m, sr)
        pos = seg.stop
        if rng.random() < 0.35:  # word boundary: a pause, sometimes long enough for the VAD to cut
            pause = rng.uniform(0.15, 0.5) if rng.random() < 0.25 else rng.uniform(0.02, 0.12)
            pos += int(pause / rate * sr)
    return out / (np.abs(out).max() + 1e-12)


@dataclass
class Channel:
    """Recording-session parameters shared by all utterances of one video."""

    sos: np.ndarray  # EQ and band limits as second-order sections
    noise_pole: float  # colour of the additive noise (one-pole low-pass)
    snr_db: float
    gated: bool  # noise gate: pauses become near-digital silence
    peak_db: float  # output level, dBFS peak


def _peaking_sos(freq: float, gain_db: float, q: float, sr: int) -> np.ndarray:
    """RBJ audio-EQ-cookbook peaking filter as one second-order section."""
    amp, w0 = 10 ** (gain_db / 40), 2 * np.pi * freq / sr
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * amp, -2 * np.cos(w0), 1 - alpha * amp])
    a = np.array([1 + alpha / amp, -2 * np.cos(w0), 1 - alpha / amp])
    return np.concatenate([b / a[0], a / a[0]])[None]


def draw_channel(rng: np.random.Generator, sr: int = SAMPLE_RATE) -> Channel:
    """Draw a recording channel: 2-4 peaking EQ bands, high-/low-pass band limits, noise, level."""
    sections = [
        _peaking_sos(np.exp(rng.uniform(np.log(150), np.log(5000))), rng.uniform(-9, 9), rng.uniform(0.5, 2.0), sr)
        for _ in range(rng.integers(2, 5))
    ]
    sections.append(signal.butter(2, rng.uniform(60, 250), "highpass", fs=sr, output="sos"))
    sections.append(signal.butter(4, rng.uniform(3500, 7500), "lowpass", fs=sr, output="sos"))
    return Channel(
        sos=np.concatenate(sections),
        noise_pole=float(rng.uniform(-0.5, 0.95)),
        snr_db=float(rng.uniform(10, 30)),
        gated=bool(rng.random() < 0.5),
        peak_db=float(rng.uniform(-12, -1)),
    )


def apply_channel(
    speech: np.ndarray, channel: Channel, lead: int, trail: int, rng: np.random.Generator, sr: int = SAMPLE_RATE
) -> np.ndarray:
    """Pad with silence, filter through the channel, add noise at its SNR and set its level."""
    speech = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    wet = signal.sosfilt(channel.sos, speech)
    active = np.abs(speech) > 1e-3
    speech_power = np.mean(wet[active] ** 2) if active.any() else np.mean(wet**2)
    noise = signal.lfilter([1.0], [1.0, -channel.noise_pole], rng.standard_normal(len(wet)))
    snr_db = channel.snr_db + rng.uniform(-2, 2)  # small per-utterance variation within a session
    noise *= np.sqrt(speech_power / np.mean(noise**2) / 10 ** (snr_db / 10))
    if channel.gated:
        # A noise gate opens on speech (30 ms moving average of activity) and leaves a -30 dB floor.
        width = int(0.03 * sr)
        counts = np.concatenate([[0.0], np.cumsum(active)])
        idx = np.arange(len(wet))
        local = counts[np.minimum(idx + width // 2, len(wet))] - counts[np.maximum(idx - width // 2, 0)]
        noise *= 0.03 + 0.97 * np.minimum(1.0, 3.0 * local / width)
    wav = wet + noise
    return wav * (10 ** (channel.peak_db / 20) / (np.abs(wav).max() + 1e-12))


def _video_id(rng: np.random.Generator) -> str:
    """An 11-character YouTube-like id."""
    return "".join(rng.choice(_VIDEO_ID_CHARS, 11))


def _write_speaker(
    folder: Path, spk: str, rng: np.random.Generator, videos: int, utts: int, min_s: float, max_s: float
) -> tuple[list[str], float]:
    """Synthesise all utterances of one speaker; return their paths (relative to `folder`) and seconds."""
    voice = draw_voice(rng)
    paths, seconds = [], 0.0
    for _ in range(videos):
        video, channel = _video_id(rng), draw_channel(rng)
        for u in range(1, utts + 1):
            lead, trail = (int(rng.uniform(0.1, 0.6) * SAMPLE_RATE) for _ in range(2))
            length = rng.uniform(min_s, max_s) - (lead + trail) / SAMPLE_RATE
            speech = synth_utterance(voice, max(length, 0.5), rng)
            wav = apply_channel(speech, channel, lead, trail, rng)
            rel = f"{spk}/{video}/{u:05d}.wav"
            (folder / spk / video).mkdir(parents=True, exist_ok=True)
            sf.write(folder / rel, wav.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
            paths.append(rel)
            seconds += len(wav) / SAMPLE_RATE
    return paths, seconds


def generate_corpus(
    root: Path,
    seed: int = 0,
    num_train_speakers: int = 80,
    num_test_speakers: int = 20,
    videos_per_speaker: int = 3,
    utts_per_video: int = 5,
    min_seconds: float = 2.5,
    max_seconds: float = 6.0,
    num_trials: int = 3000,
    num_workers: int = 1,
) -> dict:
    """Write the corpus under `root` (see the module docstring) and return a summary of it. Speakers are
    written by `num_workers` processes; each draws from its own stream, so the bytes do not depend on it."""
    if num_train_speakers > 10000:
        raise ValueError("at most 10000 training speakers (test ids start at id10001)")
    if min_seconds < 1.5 or max_seconds < min_seconds:
        raise ValueError("need 1.5 <= min_seconds <= max_seconds")
    root = Path(root)
    # One independent stream per speaker and one for the trials, so nothing depends on call order.
    streams = np.random.SeedSequence(seed).spawn(num_train_speakers + num_test_speakers + 1)
    speakers = [("dev", f"id{k + 1:05d}") for k in range(num_train_speakers)]
    speakers += [("test", f"id{10001 + k:05d}") for k in range(num_test_speakers)]
    jobs = [
        (root / split / "wav", spk, stream, videos_per_speaker, utts_per_video, min_seconds, max_seconds)
        for (split, spk), stream in zip(speakers, streams, strict=False)
    ]
    if num_workers > 1 and len(jobs) > 1:
        # fork: the workers inherit the imported modules instead of re-importing them (seconds each).
        with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork")) as pool:
            written = list(pool.map(_write_speaker_job, jobs, chunksize=max(1, len(jobs) // (4 * num_workers))))
    else:
        written = [_write_speaker_job(job) for job in jobs]
    seconds = sum(secs for _, secs in written)
    test_paths = [p for (split, _), (paths, _) in zip(speakers, written, strict=True) if split == "test" for p in paths]
    test_utts = [(p, p, p.split("/")[0]) for p in test_paths]
    trials = make_trials(test_utts, num_trials, np.random.default_rng(streams[-1]))
    (root / "trials.txt").write_text("".join(f"{t.label} {t.id1} {t.id2}\n" for t in trials))
    num_utts = (num_train_speakers + num_test_speakers) * videos_per_speaker * utts_per_video
    return {
        "train_speakers": num_train_speakers,
        "test_speakers": num_test_speakers,
        "utterances": num_utts,
        "hours": round(seconds / 3600, 3),
        "trials": len(trials),
        "target_trials": sum(t.label for t in trials),
    }


def _write_speaker_job(job: tuple) -> tuple[list[str], float]:
    folder, spk, stream, videos, utts, min_s, max_s = job
    return _write_speaker(folder, spk, np.random.default_rng(stream), videos, utts, min_s, max_s)
