"""EER and minDCF against independent references: hand-computed cases, brute force and Gaussian theory."""

import numpy as np
import pytest
from scipy.stats import norm

from asv.metrics import act_dcf, bayes_threshold, cllr, compute_eer, compute_min_dcf, min_cllr


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


@pytest.mark.numerics
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
@pytest.mark.numerics
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


# Cllr, min Cllr and actDCF (asv/metrics.py): hand-computed cases and the identities that bound them.


@pytest.mark.numerics
def test_cllr_hand_computed():
    # Target LLRs {0, ln 3}: log2(1 + 1) = 1 and log2(1 + 1/3) = log2(4/3); non-targets {0, -ln 3} mirror them.
    value = cllr([0.0, np.log(3.0), 0.0, -np.log(3.0)], [1, 1, 0, 0])
    assert value == pytest.approx(0.5 * (1.0 + np.log2(4.0 / 3.0)), rel=1e-12)
    # A system that always says "no idea" costs exactly 1 bit; confident and right costs almost nothing.
    assert cllr([0.0] * 4, [1, 0, 1, 0]) == pytest.approx(1.0, rel=1e-12)
    assert cllr([50.0, -50.0], [1, 0]) < 1e-20


@pytest.mark.numerics
def test_min_cllr_hand_computed():
    # Sorted labels 0 1 0 1: PAV pools the middle pair to 1/2, ends stay 0 and 1 (LLR -inf / +inf, cost 0);
    # at the list's prior 1/2 the pooled LLR is 0, one bit for one of two trials of each class.
    assert min_cllr([1, 2, 3, 4], [0, 1, 0, 1]) == pytest.approx(0.5, rel=1e-12)
    # Labels 0 0 1 0 1 (prior 2/5): the pooled pair has posterior 1/2, LLR = logit(1/2) - log(2/3) = ln 1.5.
    expected = 0.5 * (np.log2(1 + 1 / 1.5) / 2 + np.log2(1 + 1.5) / 3)
    assert min_cllr([1, 2, 3, 4, 5], [0, 0, 1, 0, 1]) == pytest.approx(expected, rel=1e-12)
    # Tied scores cannot be told apart: pooled, so a list of one repeated score is "no idea", 1 bit.
    assert min_cllr([1, 1, 1, 1], [0, 1, 0, 1]) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.numerics
def test_min_cllr_bounds_every_monotone_calibration():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    scores = rng.normal(labels * 1.5, 1.0)
    best = min_cllr(scores, labels)
    # PAV is the optimum over monotone maps; affine maps with a positive slope and a constant are such maps.
    # (Both sides are sums of ~2000 log terms: 1e-12 covers their rounding.)
    for slope, offset in [(1.0, 0.0), (3.0, -2.0), (0.3, 0.5), (2.5, -1.87), (0.0, 0.0)]:
        assert best <= cllr(slope * scores + offset, labels) + 1e-12
    assert best <= 1.0 + 1e-12
    # And it only depends on the ranking.
    assert min_cllr(np.exp(scores), labels) == pytest.approx(best, rel=1e-12)


@pytest.mark.numerics
def test_act_dcf_hand_computed_and_never_below_min_dcf():
    # P_target 0.01: Bayes threshold ln 99 = 4.595. Targets {5, 3}: one miss (1/2); non-targets {-1, 4.6, 6}:
    # two accepted (2/3). Cost 0.01 * 1/2 + 0.99 * 2/3 = 0.665, normalised by min(0.01, 0.99) = 66.5.
    assert bayes_threshold(0.01) == pytest.approx(np.log(99.0), rel=1e-12)
    assert act_dcf([5, 3, -1, 4.6, 6], [1, 1, 0, 0, 0], 0.01) == pytest.approx(66.5, rel=1e-12)
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 3000)
    llrs = rng.normal(np.where(labels == 1, 2.0, -2.0), 2.0)  # N(+-mu, 2mu): calibrated LLRs
    for p in (0.01, 0.05, 0.5):
        assert act_dcf(llrs, labels, p) >= compute_min_dcf(llrs, labels, p)[0] - 1e-12
        # Miscalibrating (shifting) them costs more than the calibrated decisions, up to sampling noise; a
        # large shift (4 nats) is far beyond it.
        assert act_dcf(llrs + 4.0, labels, p) > act_dcf(llrs, labels, p)
