"""Audio helpers: 16 kHz mono I/O that rejects bad files, gain, sox's `silence` VAD, random crop.

SUPERB's train-time pipeline (spec §1.5) runs the sox effects
`gain -3.0` and `silence 1 0.1 0.1% -1 0.1 0.1%` on every training utterance. torchaudio >= 2.9 no
longer ships sox effects, so the `silence` effect is re-implemented here from sox's own source.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from asv.conventions import SAMPLE_RATE
from asv.errors import BadAudioError, ConfigError

# sox works on int32 samples; torchaudio's apply_effects_tensor maps float x to trunc(x * 2**31).
_SOX_SCALE = 2.0**31
_SOX_SAMPLE_MAX = 2**31 - 1


# libsndfile's own header check: it logs "data : <declared> (should be <present>)" for a cut-off file.
_DATA_LEN = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)
_resample_warned = False


def load_audio(path: str | Path) -> np.ndarray:
    """Read a file as float32 mono 16 kHz in [-1, 1]; raise BadAudioError for audio we must not train on.

    Multi-channel audio is downmixed by the mean; other sample rates are resampled (torchaudio's
    sinc resampler), with a warning the first time in each process (prepare.py counts them all).
    Any container libsndfile decodes (WAV, FLAC, OGG, MP3) is accepted; AAC/m4a is not.
    """
    path = Path(path)
    if not path.is_file():
        raise BadAudioError(path, "missing")
    if path.stat().st_size == 0:
        raise BadAudioError(path, "empty file")
    try:
        with sf.SoundFile(str(path)) as f:
            log, sr = f.extra_info, f.samplerate
            wav = f.read(dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, EOFError) as err:
        with open(path, "rb") as f:
            magic = f.read(4)
        msg = str(err).split(": ", 1)[-1]
        if magic in (b"RIFF", b"RIFX", b"RF64"):
            raise BadAudioError(path, "corrupt or truncated WAV header", msg) from None
        raise BadAudioError(path, "unsupported or unrecognised container", msg) from None
    _check_complete(path, log)
    if wav.shape[0] == 0:
        raise BadAudioError(path, "no samples")
    wav = _finite_mono(path, wav)
    if sr != SAMPLE_RATE:
        global _resample_warned
        if not _resample_warned:
            _resample_warned = True
            print(
                f"warning: {path} is {sr} Hz: resampling to {SAMPLE_RATE} Hz on load "
                "(said once per process; prepare.py's summary counts such files)",
                file=sys.stderr,
            )
        wav = resample(wav, sr)
    return wav


def _check_complete(path, extra_info: str) -> None:
    """libsndfile reads a truncated WAV without error; its log says how much data is missing."""
    cut = _DATA_LEN.search(extra_info)
    if cut and int(cut.group(2)) < int(cut.group(1)):
        raise BadAudioError(path, "truncated", f"header declares {cut.group(1)} data bytes, file holds {cut.group(2)}")


def _finite_mono(path, wav: np.ndarray) -> np.ndarray:
    """(T, C) samples -> (T,) channel mean, refusing NaN/inf samples."""
    if not np.isfinite(wav).all():
        raise BadAudioError(path, "NaN or inf samples")
    return wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]


def resample(wav: np.ndarray, sr: int) -> np.ndarray:
    """`wav` at `sr` Hz -> SAMPLE_RATE, with torchaudio's band-limited sinc interpolation."""
    # torch and torchaudio load only here: prepare.py's decode workers and the ONNX embedder read audio without them.
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, SAMPLE_RATE).numpy()


def pyav():
    """The PyAV module, or a ConfigError saying how to install it (only compressed corpora such as VoxCeleb2's
    .m4a need it, so it is imported on first use, not with the package)."""
    try:
        import av
    except ImportError:
        raise ConfigError(
            "decoding .m4a (AAC) audio needs PyAV, which is not installed: pip install av (requirements.txt pins it)"
        ) from None
    return av


def decode_with_pyav(path: str | Path) -> np.ndarray:
    """Read a file libsndfile cannot (AAC in .m4a: VoxCeleb2) through FFmpeg as float32 mono 16 kHz, downmixed
    and resampled as load_audio does; raise BadAudioError for a file that gives no usable audio."""
    av = pyav()
    path = Path(path)
    if not path.is_file():
        raise BadAudioError(path, "missing")
    if path.stat().st_size == 0:
        raise BadAudioError(path, "empty file")
    chunks, sr = [], SAMPLE_RATE
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BadAudioError(path, "no audio stream")
            stream = container.streams.audio[0]
            # Only the sample format changes here (to planar float, FFmpeg's own AAC output): the channel mean and
            # the resampler stay ours, so a decoded file matches what load_audio makes of any other container.
            to_float = av.AudioResampler(format="fltp")
            for frame in container.decode(stream):
                sr = frame.sample_rate
                chunks += [f.to_ndarray() for f in to_float.resample(frame)]  # each (C, n)
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
    except av.FFmpegError as err:
        raise BadAudioError(path, "undecodable audio", str(err).splitlines()[0][:200]) from None
    if not chunks or not sum(c.shape[1] for c in chunks):
        raise BadAudioError(path, "no samples")
    wav = _finite_mono(path, np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False))  # (T,)
    return resample(wav, sr) if sr != SAMPLE_RATE else wav


def apply_gain(wav: np.ndarray, db: float) -> np.ndarray:
    """Scale amplitude by `db` decibels (sox `gain db`: -3 dB multiplies by 10**(-3/20))."""
    return (wav * 10.0 ** (db / 20.0)).astype(wav.dtype, copy=False)


def _above_threshold(energy_sum: np.ndarray, window: int, threshold: float) -> np.ndarray:
    """sox's `aboveThreshold(compute_rms(...))` for windowed sums of squared int32 samples."""
    # sox: rms = (sox_sample_t) sqrt(sum / window); above = rms / SOX_SAMPLE_MAX * 100 > threshold%.
    # rms is an integer, so "rms > T" is "rms >= floor(T) + 1", i.e. sum / window >= (floor(T) + 1)**2.
    level = np.floor(threshold * _SOX_SAMPLE_MAX) + 1.0
    return energy_sum >= level * level * window


def _run_starts(flags: np.ndarray, length: int) -> np.ndarray:
    """Every index i where flags[i : i + length] is all True (sorted)."""
    if len(flags) < length:
        return np.empty(0, dtype=np.int64)
    counts = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return np.flatnonzero(counts[length:] - counts[:-length] == length)


def _first_run_start(flags: np.ndarray, length: int) -> int:
    """Index of the first run of `length` consecutive True values in `flags`, or -1."""
    starts = _run_starts(flags, length)
    return int(starts[0]) if len(starts) else -1


def speech_intervals(
    wav: np.ndarray,
    sr: int = SAMPLE_RATE,
    above_periods: int = 1,
    above_duration: float = 0.1,
    above_threshold: float = 0.001,
    below_periods: int = -1,
    below_duration: float = 0.1,
    below_threshold: float = 0.001,
) -> list[tuple[int, int]]:
    """Sample intervals [start, end) that sox `silence` keeps, so VAD'd crops map back to the file.

    Reproduces `silence 1 <above_duration> <above_threshold*100>% -1 <below_duration>
    <below_threshold*100>%` of SoX 14.4 (src/silence.c, e.g. the chirlu/sox mirror): thresholds are
    fractions of full scale (0.001 == "0.1%"). Mono only; periods other than 1 / -1 are not supported.

    Behaviours taken from silence.c:
    * Level: RMS over a sliding window of `sr // 50` samples (20 ms) ending at the current sample
      (`compute_rms`), in int32 units (x * 2**31, truncated) and truncated to an integer, compared
      as `rms / (2**31 - 1) * 100 > threshold%` (`aboveThreshold`; strict, unlike SoX <= 14.0's >=).
      No precision masking: float32 input counts as 32-bit, as through torchaudio's
      `apply_effects_tensor` (SuperbASV's path).
    * Start trimming (SILENCE_TRIM): samples are dropped until `round(above_duration * sr)`
      consecutive samples are above threshold; those samples are kept (the start holdoff is
      flushed). A below-threshold sample empties the holdoff, so a burst shorter than that is dropped.
    * Copying (SILENCE_COPY): below-threshold samples are held back; an above-threshold sample
      flushes them, so gaps shorter than `round(below_duration * sr)` are kept. When the held-back
      run reaches that length it is dropped.
    * Restart (negative below_periods): after such a drop the RMS window is zeroed (`clear_rms`) and
      the effect goes back to start trimming, so the next segment again needs a full above-threshold
      run (and the zeroed window makes its first 20 ms quieter than a continuous window would).
    * End of input (`sox_silence_drain`): held-back silence shorter than below_duration is output;
      an unfinished start holdoff is discarded.
    """
    if above_periods != 1 or abs(below_periods) != 1:
        raise ValueError("only above_periods=1 and below_periods=+-1 are supported")
    n = len(wav)
    window = int(sr // 50)
    start_len = int(round(above_duration * sr))
    stop_len = int(round(below_duration * sr))
    if min(start_len, stop_len) < window:
        # Shorter holdoffs would let copy mode start inside the zeroed window after a restart.
        raise ValueError(f"durations must be at least the 20 ms RMS window ({window} samples)")

    samples = np.trunc(np.clip(np.asarray(wav, np.float64) * _SOX_SCALE, -_SOX_SCALE, _SOX_SAMPLE_MAX))
    energy = np.concatenate([[0.0], np.cumsum(samples * samples)])  # energy[i] = sum(samples[:i]**2)
    ends = np.arange(1, n + 1)
    # Window sums as if the window had run since the file start (sox starts it zeroed).
    window_sum = energy[ends] - energy[np.maximum(ends - window, 0)]
    above = _above_threshold(window_sum, window, above_threshold)
    below = ~_above_threshold(window_sum, window, below_threshold)
    above_runs = _run_starts(above, start_len)
    below_runs = _run_starts(below, stop_len)

    intervals: list[tuple[int, int]] = []
    pos, search_from = 0, 0
    while pos < n:
        # SILENCE_TRIM from `pos`: find the first run of start_len above-threshold samples.
        begin = -1
        if pos > 0:
            # After a restart the window was zeroed at `pos`, so its first window-1 samples see a
            # smaller RMS than `above` assumes: redo those, then fall back to the global runs.
            head = min(window - 1, n - pos)
            head_sum = energy[pos + 1 : pos + head + 1] - energy[pos]
            head_above = _above_threshold(head_sum, window, above_threshold)
            flags = np.concatenate([head_above, above[pos + head : pos + head + start_len]])
            first = _first_run_start(flags, start_len)
            if 0 <= first < head:
                begin = pos + first
            search_from = pos + head
        if begin < 0:
            k = np.searchsorted(above_runs, search_from)
            if k == len(above_runs):
                break  # the start holdoff never fills: everything left is dropped
            begin = int(above_runs[k])

        # SILENCE_COPY after the flushed start holdoff: find stop_len below-threshold samples.
        k = np.searchsorted(below_runs, begin + start_len)
        if k == len(below_runs):
            intervals.append((begin, n))  # drain() outputs a short trailing silence too
            break
        end = int(below_runs[k])
        intervals.append((begin, end))
        if below_periods > 0:
            break  # no restart: SILENCE_STOP drops everything after the first long silence
        pos = end + stop_len

    return intervals


def sox_silence(
    wav: np.ndarray,
    sr: int = SAMPLE_RATE,
    above_periods: int = 1,
    above_duration: float = 0.1,
    above_threshold: float = 0.001,
    below_periods: int = -1,
    below_duration: float = 0.1,
    below_threshold: float = 0.001,
) -> np.ndarray:
    """Apply sox's `silence` effect (SUPERB's train-time VAD); see `speech_intervals` for details."""
    intervals = speech_intervals(
        wav, sr, above_periods, above_duration, above_threshold, below_periods, below_duration, below_threshold
    )
    return keep_intervals(wav, intervals)


def keep_intervals(wav: np.ndarray, intervals) -> np.ndarray:
    """The samples of `wav` inside the (start, end) intervals, concatenated (empty if there are none)."""
    if not len(intervals):
        return wav[:0].copy()
    return np.concatenate([wav[s:e] for s, e in intervals])


def random_crop(wav: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Random contiguous crop of at most `max_samples` samples (whole signal if it is shorter)."""
    if len(wav) <= max_samples:
        return wav
    start = int(rng.integers(0, len(wav) - max_samples + 1))
    return wav[start : start + max_samples]


def read_crop(
    path: str | Path, intervals, max_samples: int, rng: np.random.Generator, gain_db: float = 0.0
) -> np.ndarray:
    """`random_crop(keep_intervals(apply_gain(load_audio(path)), intervals), ...)`, reading only the crop.

    The crop is drawn on the VAD'd signal (the concatenated intervals) exactly as random_crop draws it,
    mapped back to file offsets and read with seeks, so the decode cost does not grow with the file's
    length. Files that need a conversion (not 16 kHz) take the whole-file path.
    """
    intervals = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        load_audio(path)  # raises BadAudioError saying why (missing, empty, corrupt, ...)
        raise
    with f:
        _check_complete(path, f.extra_info)
        if f.samplerate != SAMPLE_RATE:
            wav = keep_intervals(apply_gain(load_audio(path), gain_db), intervals)
            return random_crop(wav, max_samples, rng)
        sizes = intervals[:, 1] - intervals[:, 0]
        total = int(sizes.sum())
        start = int(rng.integers(0, total - max_samples + 1)) if total > max_samples else 0
        stop = min(total, start + max_samples)
        pieces, offset = [], 0  # offset: position of the current interval on the VAD'd signal
        for s, size in zip(intervals[:, 0].tolist(), sizes.tolist(), strict=True):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                f.seek(s + lo - offset)
                pieces.append(f.read(hi - lo, dtype="float32", always_2d=True))
            offset += size
            if offset >= stop:
                break
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return apply_gain(_finite_mono(path, np.concatenate(pieces)), gain_db)


# The sox command line SUPERB applies; recorded next to the cached intervals in vad.json.
VAD_DESCRIPTION = "sox silence 1 0.1 0.1% -1 0.1 0.1%"


def compute_vad(wav: np.ndarray | str, gain_db: float) -> list[list[int]]:
    """Intervals the SUPERB VAD keeps for one file (or its loaded samples), on the gained signal
    (gain changes what is 'silence')."""
    wav = apply_gain(load_audio(wav) if isinstance(wav, str | Path) else wav, gain_db)
    return [[int(s), int(e)] for s, e in speech_intervals(wav, SAMPLE_RATE)]
