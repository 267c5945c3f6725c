"""What s3prl 0.4.18's SuperbASV runner needs from torchaudio >= 2.9, which dropped sox.

    from bench import s3prl_shim; s3prl_shim.install()   # before the first s3prl (or asv.upstream) import

SuperbASV's training data goes through `torchaudio.sox_effects.apply_effects_tensor` with
`channels 1`, `rate 16000`, `gain -3.0` and `silence 1 0.1 0.1% -1 0.1 0.1%` (s3prl/problem/asv/superb_asv.py
EFFECTS); its module loader calls `torchaudio.set_audio_backend("sox_io")` at import. This module provides
exactly those four effects, computed by our own sox re-implementations (asv.audio: `apply_gain`, the
sox-exact `sox_silence`), so the s3prl side of a benchmark trains on the same audio ours does. Anything
else raises: a silently ignored effect would make the comparison meaningless.

Audio file I/O on that path is librosa's (soundfile), so no `torchaudio.load`/`info` replacement is needed.
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import soundfile as sf
import torch
import torchaudio

from asv.audio import apply_gain, sox_silence

SUPPORTED = ("channels", "rate", "gain", "silence")


def _seconds(value: str) -> float:
    # sox also accepts sample counts ("1600s") and hh:mm:ss; SuperbASV only uses plain seconds.
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"sox shim: only plain seconds are supported as a duration, got {value!r}") from None


def _fraction(value: str) -> float:
    # sox thresholds are "N%" of full scale or "NdB"; SuperbASV uses percentages.
    if not value.endswith("%"):
        raise ValueError(f"sox shim: only percentage thresholds are supported, got {value!r}")
    return float(value[:-1]) / 100.0


def _apply(wav: np.ndarray, sr: int, effect: list[str]) -> tuple[np.ndarray, int]:
    """One sox effect on a (C, T) float32 array."""
    name, args = effect[0], [str(a) for a in effect[1:]]
    if name == "channels":
        if args != ["1"]:
            raise ValueError(f"sox shim: only 'channels 1' is supported, got {effect}")
        return wav.mean(axis=0, keepdims=True) if wav.shape[0] > 1 else wav, sr
    if name == "rate":
        target = int(float(args[0]))
        if target == sr:
            return wav, sr
        out = torchaudio.functional.resample(torch.from_numpy(wav), sr, target)
        return out.numpy(), target
    if name == "gain":
        if len(args) != 1:
            raise ValueError(f"sox shim: only 'gain <dB>' is supported, got {effect}")
        return apply_gain(wav, float(args[0])), sr
    if name == "silence":
        if wav.shape[0] != 1:
            raise ValueError("sox shim: 'silence' needs mono audio (put 'channels 1' first)")
        if len(args) != 6:
            raise ValueError(f"sox shim: 'silence' needs all six arguments, got {effect}")
        kept = sox_silence(
            wav[0],
            sr,
            above_periods=int(args[0]),
            above_duration=_seconds(args[1]),
            above_threshold=_fraction(args[2]),
            below_periods=int(args[3]),
            below_duration=_seconds(args[4]),
            below_threshold=_fraction(args[5]),
        )
        return kept[None, :], sr
    raise ValueError(f"sox shim: effect {name!r} is not implemented (only {', '.join(SUPPORTED)})")


def apply_effects_tensor(tensor: torch.Tensor, sample_rate: int, effects, channels_first: bool = True):
    """torchaudio.sox_effects.apply_effects_tensor for the effects SuperbASV uses: (C, T) float -> (C, T') float32."""
    wav = tensor.detach().cpu().float().numpy()
    if not channels_first:
        wav = wav.T
    wav = np.ascontiguousarray(wav)
    sr = int(sample_rate)
    for effect in effects:
        wav, sr = _apply(wav, sr, list(effect))
    out = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    return (out if channels_first else out.T), sr


def apply_effects_file(path, effects, normalize: bool = True, channels_first: bool = True, format=None):
    """torchaudio.sox_effects.apply_effects_file (s3prl's legacy sv_voxceleb1 path): soundfile, then the effects."""
    if not normalize:
        raise ValueError("sox shim: only normalize=True (float output) is supported")
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    return apply_effects_tensor(torch.from_numpy(wav.T.copy()), sr, effects, channels_first)


def effect_names() -> list[str]:
    return list(SUPPORTED)


def _unused_module(name: str, attrs: tuple[str, ...] = ()) -> types.ModuleType:
    """A stand-in for a package s3prl imports but SuperbASV never uses: importing works, any use raises."""

    def fail(*args, **kwargs):
        raise RuntimeError(f"bench/s3prl_shim.py: {name} is not installed here; SuperbASV never needs it")

    module = types.ModuleType(name)
    module.__superb_asv_shim__ = True
    for attr in attrs:
        setattr(module, attr, fail)

    def missing(attr: str):
        if attr.startswith("__"):  # the import machinery probes dunders (__path__, ...): plain absence
            raise AttributeError(attr)
        fail()

    module.__getattr__ = missing
    return module


def stub_hear_scoring() -> list[str]:
    """s3prl.problem imports sed_eval and dcase_util at import time (s3prl/task/_hear_score.py, HEAR's event
    scoring), which SuperbASV never calls. Where they do not import (the GPU machine has neither, and
    dcase_util needs libmagic and pkg_resources), install stand-ins whose every use raises; where they do,
    leave them. Returns the names stubbed."""
    import importlib

    stubbed = []
    for name, attrs in (("sed_eval", ()), ("dcase_util", ()), ("dcase_util.containers", ("MetaDataContainer",))):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _unused_module(name, attrs)
            stubbed.append(name)
    if "dcase_util.containers" in stubbed and "dcase_util" in stubbed:
        sys.modules["dcase_util"].containers = sys.modules["dcase_util.containers"]
    return stubbed


def install() -> None:
    """Register the shim on torchaudio (idempotent). Best called before importing s3prl or asv.upstream;
    replacing an earlier stub still works for s3prl's loader, which looks the function up at call time."""
    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda *args, **kwargs: None
    # s3prl.problem imports dcase_util, which imports pkg_resources (hence setuptools<81) and warns about it.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    stub_hear_scoring()
    if getattr(sys.modules.get("torchaudio.sox_effects"), "__superb_asv_shim__", False):
        return
    shim = types.ModuleType("torchaudio.sox_effects")
    shim.__superb_asv_shim__ = True
    shim.apply_effects_tensor = apply_effects_tensor
    shim.apply_effects_file = apply_effects_file
    shim.effect_names = effect_names
    sys.modules["torchaudio.sox_effects"] = shim
    torchaudio.sox_effects = shim
