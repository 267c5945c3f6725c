"""Figures written next to the results: DET curves, score histograms, featurizer layer weights (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import norm  # noqa: E402
from sklearn.metrics import det_curve  # noqa: E402

# DET axes in normal-deviate scale (Martin et al., 1997), labelled in percent.
_TICKS = np.array([0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8])


def det_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """One DET curve (miss vs false-alarm probability, probit axes) per label: {label: (scores, labels)}."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    lo, hi = norm.ppf(5e-4), norm.ppf(0.9)  # up to 90%: early checkpoints sit near 50% EER
    for label, (scores, labels) in curves.items():
        fpr, fnr, _ = det_curve(labels, scores)
        ax.plot(norm.ppf(np.clip(fpr, 1e-4, 1 - 1e-4)), norm.ppf(np.clip(fnr, 1e-4, 1 - 1e-4)), label=label, lw=1.5)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.5, ls="--")  # the EER line
    ticks = norm.ppf(_TICKS)
    ax.set_xticks(ticks, [f"{100 * t:g}" for t in _TICKS])
    ax.set_yticks(ticks, [f"{100 * t:g}" for t in _TICKS])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def score_histogram(scores: np.ndarray, labels: np.ndarray, path: Path, title: str, threshold: float) -> Path:
    """Target and non-target score densities with the EER threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(scores.min(), scores.max(), 60)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label=f"non-target ({(labels == 0).sum()})")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label=f"target ({(labels == 1).sum()})")
    ax.axvline(threshold, color="black", lw=1, ls="--", label=f"EER threshold {threshold:.3f}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def layer_weights_plot(weights: np.ndarray, path: Path, title: str) -> Path:
    """Softmax featurizer weight per upstream hidden state (0 = CNN/input features)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(weights) + 2), 3))
    ax.bar(np.arange(len(weights)), weights)
    ax.axhline(1 / len(weights), color="grey", lw=0.8, ls="--", label="uniform")
    ax.set_xlabel("hidden state")
    ax.set_ylabel("weight")
    ax.set_xticks(np.arange(len(weights)))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
