"""EER and minDCF against independent references: hand-computed cases, brute force and Gaussian theory."""

import numpy as np
import pytest
from scipy.stats import norm

from asv.metrics import compute_eer, compute_min_dcf


def brute_force_rates(scores, labels):
    """(threshold, P_miss, P_fa) at every distinct score plus one above all, accepting score >= threshold."""
    tar, non = scores[labels == 1], scores[labels == 0]
    out = []
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        out.append((t, np.mean(tar < t), np.mean(non >= t)))
    return out


def brute_force_min_dcf(scores, labels, p_target):
    best = min(p_target * miss + (1 - p_target) * fa for _, miss, fa in brute_force_rates(scores, labels))
    return best / min(p_target, 1 - p_target)


def test_eer_perfect_separation_is_zero():
    eer, thr = compute_eer([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert eer == pytest.approx(0.0, abs=1e-9)
    assert 0.2 <= thr <= 0.8


def test_eer_hand_computed():
    # Targets {0.4, 0.6, 0.9}, non-targets {0.1, 0.5, 0.7}. At t=0.55 one target is missed (1/3) and one
    # non-target accepted (1/3): the error rates cross at exactly 1/3.
    eer, _ = compute_eer([0.4, 0.6, 0.9, 0.1, 0.5, 0.7], [1, 1, 1, 0, 0, 0])
    assert eer == pytest.approx(1 / 3, abs=1e-6)


def test_eer_bracketed_by_brute_force_and_invariant_to_monotone_maps():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(labels * 1.2, 1.0)
    eer, _ = compute_eer(scores, labels)
    rates = brute_force_rates(scores, labels)
    # On the piece-wise linear ROC the EER lies between the best "average" and best "worst" error.
    assert min((m + f) / 2 for _, m, f in rates) - 1e-9 <= eer <= min(max(m, f) for _, m, f in rates) + 1e-9
    assert compute_eer(np.exp(scores), labels)[0] == pytest.approx(eer, abs=1e-9)


def test_eer_matches_gaussian_theory():
    # Equal-variance Gaussians d' apart: EER = Phi(-d'/2).
    rng = np.random.default_rng(1)
    n = 200_000
    scores = np.concatenate([rng.normal(2.0, 1, n), rng.normal(0.0, 1, n)])
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    eer, thr = compute_eer(scores, labels)
    assert eer == pytest.approx(norm.cdf(-1.0), abs=0.003)
    assert thr == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("p_target", [0.01, 0.05, 0.5])
def test_min_dcf_matches_brute_force(p_target):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(labels * 1.5, 1.0), 1)  # rounding creates ties
    dcf, thr = compute_min_dcf(scores, labels, p_target=p_target)
    assert dcf == pytest.approx(brute_force_min_dcf(scores, labels, p_target), abs=1e-12)
    # The returned threshold really achieves it.
    miss, fa = np.mean(scores[labels == 1] < thr), np.mean(scores[labels == 0] >= thr)
    assert (p_target * miss + (1 - p_target) * fa) / min(p_target, 1 - p_target) == pytest.approx(dcf)


def test_min_dcf_hand_computed():
    # One target below every non-target: rejecting all costs P_tar = 0.01 -> normalised 1.0; accepting all
    # but the low target costs 0.01 * 1/2 -> 0.5; accepting everything costs 0.99 -> 99.
    scores = [0.0, 0.9, 0.5, 0.6]
    labels = [1, 1, 0, 0]
    assert compute_min_dcf(scores, labels, p_target=0.01)[0] == pytest.approx(0.5)
    assert compute_min_dcf([0.9, 0.8, 0.1], [1, 1, 0], p_target=0.01)[0] == pytest.approx(0.0)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="both"):
        compute_eer([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_eer([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="labels"):
        compute_min_dcf([0.1, 0.2], [1, 2])
