"""Verification metrics: pure numpy functions, no I/O.

Conventions (NIST SRE evaluation plans): a trial is a target trial when label == 1; a higher score
means "more likely the same speaker". The miss rate (FNR) at threshold t is the fraction of target
scores below t, the false-alarm rate (FPR) the fraction of non-target scores at or above t.

EER and minDCF judge only how scores rank. Cllr and actDCF judge scores as log-likelihood ratios (natural
log, LLR = log p(score | same) / p(score | different)), i.e. whether decisions taken from them at a stated
prior are right (Brümmer & du Preez, "Application-independent evaluation of speaker detection", CSL 2006;
the BOSARIS toolkit's definitions). min Cllr is the Cllr of the best monotone map of the raw scores to
LLRs (pool-adjacent-violators), so Cllr - min Cllr is what calibration loses.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_curve


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    if labels.min() == labels.max():
        raise ValueError("need both target (1) and non-target (0) trials")
    return scores, labels.astype(np.int64)


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate as a fraction, and the threshold where it occurs.

    Same definition as s3prl (`s3prl/metric/common.py`): the ROC from sklearn is taken as
    piece-wise linear and the EER is the FPR where FPR == FNR on it, found with brentq; the
    threshold is interpolated on the same curve.
    """
    scores, labels = _check(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1)
    # roc_curve's first threshold is +inf; clip it so the interpolation stays finite.
    thresholds = np.minimum(thresholds, np.max(scores) + 1.0)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    threshold = float(interp1d(fpr, thresholds)(eer))
    return float(eer), threshold


def compute_min_dcf(
    scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """Normalised minimum detection cost and its threshold (NIST SRE 2010+ definition).

    C_det(t) = C_miss * P_miss(t) * P_target + C_fa * P_fa(t) * (1 - P_target), minimised over every
    threshold, divided by the cost of the best trivial system min(C_miss * P_target, C_fa * (1 - P_target)).
    The curve is swept at every distinct score, so the result does not depend on ROC thinning.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    n_tar, n_non = y.sum(), (1 - y).sum()
    # Threshold just above position i accepts everything after i: misses = targets at or before i.
    miss = np.concatenate([[0], np.cumsum(y)]) / n_tar
    fa = 1.0 - np.concatenate([[0], np.cumsum(1 - y)]) / n_non
    # Only cut between distinct scores (ties must fall on the same side).
    cut = np.concatenate([[True], s[1:] != s[:-1], [True]])
    miss, fa = miss[cut], fa[cut]
    thr = np.concatenate([[s[0] - 1e-6], s[1:][s[1:] != s[:-1]], [s[-1] + 1e-6]])
    c_det = c_miss * miss * p_target + c_fa * fa * (1.0 - p_target)
    i = int(np.argmin(c_det))
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(c_det[i] / c_def), float(thr[i])


def cllr(llrs, labels) -> float:
    """Log-likelihood-ratio cost in bits: the mean of log2(1 + e^-llr) over targets and of log2(1 + e^llr)
    over non-targets, the two classes weighted equally. 0 is perfect, 1 is a system that always says
    llr = 0; a badly calibrated system can cost more than 1."""
    llrs, labels = _check(llrs, labels)
    return _cllr(llrs[labels == 1], llrs[labels == 0])


def _cllr(tar: np.ndarray, non: np.ndarray) -> float:
    # logaddexp(0, x) = log(1 + e^x) without overflow, and exact at +-inf (PAV gives infinite LLRs).
    return float((np.logaddexp(0.0, -tar).mean() + np.logaddexp(0.0, non).mean()) / (2.0 * np.log(2.0)))


def min_cllr(scores, labels) -> float:
    """Cllr after the optimal monotone score -> LLR map, found by PAV (isotonic regression of the labels
    on the scores; tied scores share one value, since no function of the score can tell them apart).

    The PAV posteriors are at the list's own prior n_tar / n; subtracting its log-odds gives LLRs. PAV's
    blocks are the segments of the ROC convex hull, which reweighting the classes does not change, so
    the same blocks are optimal for Cllr's equal class weights."""
    scores, labels = _check(scores, labels)
    post = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True).fit_transform(scores, labels.astype(float))
    with np.errstate(divide="ignore"):  # blocks of one class only: posterior 0 or 1, LLR -inf or +inf
        log_odds = np.log(post) - np.log1p(-post)
    n_tar = labels.sum()
    llrs = log_odds - np.log(n_tar / (len(labels) - n_tar))
    return _cllr(llrs[labels == 1], llrs[labels == 0])


def bayes_threshold(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The LLR above which accepting costs less than rejecting: log(C_fa (1 - P_target) / (C_miss P_target))."""
    return float(np.log(c_fa * (1.0 - p_target) / (c_miss * p_target)))


def act_dcf(llrs, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised actual detection cost: the cost of the decisions llr >= bayes_threshold(P_target), divided
    by the best trivial system's cost (as compute_min_dcf). It is never below minDCF of the same scores,
    and it equals it when the LLRs are well calibrated."""
    llrs, labels = _check(llrs, labels)
    accept = llrs >= bayes_threshold(p_target, c_miss, c_fa)
    p_miss, p_fa = np.mean(~accept[labels == 1]), np.mean(accept[labels == 0])
    c_det = c_miss * p_miss * p_target + c_fa * p_fa * (1.0 - p_target)
    return float(c_det / min(c_miss * p_target, c_fa * (1.0 - p_target)))


# Operating points reported everywhere (keys carry them: the reference codebases disagree on the default).
P_TARGETS = (0.01, 0.05)


def metrics(scores, labels) -> dict:
    """results.json's metric block: EER in percent with its threshold, minDCF at each P_TARGETS with its
    threshold, and min Cllr (which needs no calibration)."""
    eer, eer_thr = compute_eer(scores, labels)
    out = {"eer": 100.0 * eer, "eer_threshold": eer_thr}
    for p in P_TARGETS:
        dcf, thr = compute_min_dcf(scores, labels, p_target=p)
        out[f"min_dcf@{p}"], out[f"min_dcf@{p}_threshold"] = dcf, thr
    out["min_cllr"] = min_cllr(scores, labels)
    return out


def calibrated_metrics(llrs, labels) -> dict:
    """The metrics that read scores as LLRs: Cllr and actDCF at each P_TARGETS (with its LLR threshold)."""
    out = {"cllr": cllr(llrs, labels)}
    for p in P_TARGETS:
        out[f"act_dcf@{p}"], out[f"act_dcf@{p}_llr_threshold"] = act_dcf(llrs, labels, p), bayes_threshold(p)
    return out
