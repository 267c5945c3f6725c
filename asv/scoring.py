"""Trial scoring: cosine similarity and adaptive symmetric score normalisation (AS-norm). Pure numpy.

AS-norm (Matejka et al., Interspeech 2017; Cumani et al., 2011): each side of a trial is compared with
a cohort of impostor models, here training-speaker mean embeddings; only its top-N closest cohort
scores are kept, and the raw score is standardised by the mean and std of both sides' top-N sets:

    s_norm = ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) / 2
"""

from __future__ import annotations

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Row-wise cosine between two (T, E) arrays of trial sides."""
    return (l2_normalise(emb1) * l2_normalise(emb2)).sum(-1)


def enrollment_model(emb: np.ndarray) -> np.ndarray:
    """One unit vector for a speaker enrolled with several files: the mean of their unit-length embeddings,
    renormalised, so every file counts equally whatever its embedding's norm and the model is unit length like
    any single embedding (not NeMo's stored version, which divides by the wrong count and skips the
    renormalisation). (N, E) -> (E,)."""
    return l2_normalise(l2_normalise(np.atleast_2d(emb)).mean(0))


def trial_scores(vectors: dict[str, np.ndarray], trials) -> np.ndarray:
    """Cosine score of every trial, from embeddings keyed by wav path (the embedding cache's key)."""
    return cosine_scores(
        np.stack([vectors[t.wav_path1] for t in trials]), np.stack([vectors[t.wav_path2] for t in trials])
    )


def speaker_means(emb: np.ndarray, speakers: list[str]) -> tuple[np.ndarray, list[str]]:
    """Unit-length mean of each speaker's unit-length embeddings: the AS-norm cohort models."""
    names = sorted(set(speakers))
    index = {s: i for i, s in enumerate(names)}
    sums = np.zeros((len(names), emb.shape[1]))
    np.add.at(sums, [index[s] for s in speakers], l2_normalise(emb))
    return l2_normalise(sums), names


def cohort_stats(emb: np.ndarray, cohort: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each embedding's top_n highest cosine scores against the cohort: (N,), (N,)."""
    scores = l2_normalise(emb) @ l2_normalise(cohort).T  # (N, C)
    n = min(top_n, scores.shape[1])
    top = -np.partition(-scores, n - 1, axis=1)[:, :n]
    return top.mean(1), np.maximum(top.std(1), 1e-8)


def as_norm(
    scores: np.ndarray, stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Symmetric normalisation of raw trial scores given each side's (mean, std) cohort statistics."""
    (m1, s1), (m2, s2) = stats1, stats2
    return 0.5 * ((scores - m1) / s1 + (scores - m2) / s2)
