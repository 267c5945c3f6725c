"""Untrained reference: cosine between mean MFCC vectors, the floor any trained system must beat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi

from asv.progress import progress

# 20 cepstra from 40 mel bands; c0 (overall log energy) is dropped because it tracks recording
# level, not the speaker. No CMN: subtracting the per-utterance mean would zero the embedding.
NUM_CEPS = 20
NUM_MEL_BINS = 40


def mean_mfcc_embedding(wav: np.ndarray, sr: int = 16000) -> np.ndarray:
    """Mean over frames of Kaldi MFCCs c1..c19 (25 ms / 10 ms frames, no dither, no CMN)."""
    waveform = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None]  # (1, T)
    # Kaldi's feature code expects 16-bit sample values; the scale only shifts the log energies.
    feats = kaldi.mfcc(
        waveform * 32768, sample_frequency=sr, num_ceps=NUM_CEPS, num_mel_bins=NUM_MEL_BINS, dither=0.0
    )  # (frames, NUM_CEPS)
    return feats[:, 1:].mean(dim=0).numpy().astype(np.float64)


def mean_mfcc_scores(
    trials: list[tuple[str, str]], load: Callable[[str], np.ndarray], desc: str | None = None
) -> np.ndarray:
    """Cosine similarity of mean-MFCC embeddings for each (enrol, test) pair; each file embedded once.
    With `desc`, progress is shown under that name (asv.progress)."""
    paths = sorted({p for pair in trials for p in pair})
    emb = {p: mean_mfcc_embedding(load(p)) for p in progress(paths, desc=desc or "", unit="utt", enabled=bool(desc))}
    unit = {p: e / (np.linalg.norm(e) + 1e-12) for p, e in emb.items()}
    return np.array([float(unit[a] @ unit[b]) for a, b in trials])
