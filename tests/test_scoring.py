"""Scoring and dev-split helpers against direct, loop-by-loop references."""

import numpy as np
import pytest

from asv.corpora import hold_out_speakers
from asv.manifest import make_trials
from asv.scoring import as_norm, cohort_stats, cosine_scores, speaker_means


@pytest.mark.numerics
def test_cosine_scores_match_the_definition():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    ref = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(cosine_scores(a, b), ref, rtol=1e-12)


@pytest.mark.numerics
def test_as_norm_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    enroll, test, cohort = rng.standard_normal((6, 8)), rng.standard_normal((6, 8)), rng.standard_normal((20, 8))
    top_n = 5

    def unit(v):
        return v / np.linalg.norm(v)

    def stats(x):
        s = sorted((unit(x) @ unit(c) for c in cohort), reverse=True)[:top_n]
        return np.mean(s), np.std(s)

    raw = cosine_scores(enroll, test)
    expected = []
    for e, t, s in zip(enroll, test, raw, strict=True):
        (me, se), (mt, st) = stats(e), stats(t)
        expected.append(0.5 * ((s - me) / se + (s - mt) / st))
    got = as_norm(raw, cohort_stats(enroll, cohort, top_n), cohort_stats(test, cohort, top_n))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.numerics
def test_as_norm_top_n_is_clipped_to_the_cohort():
    rng = np.random.default_rng(2)
    x, cohort = rng.standard_normal((3, 4)), rng.standard_normal((4, 4))
    m_all, s_all = cohort_stats(x, cohort, 4)
    m_big, s_big = cohort_stats(x, cohort, 300)
    np.testing.assert_allclose(m_all, m_big)
    np.testing.assert_allclose(s_all, s_big)


@pytest.mark.numerics
def test_speaker_means_average_unit_embeddings():
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, -1.0]])
    means, names = speaker_means(emb, ["b", "b", "a"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(means, [[0.0, -1.0], [np.sqrt(0.5), np.sqrt(0.5)]])


def test_hold_out_speakers_fraction_count_and_errors():
    spk = [f"s{i:02d}" for i in range(40)]
    assert hold_out_speakers(spk, 0, seed=0) == set()
    assert len(hold_out_speakers(spk, 0.05, seed=0)) == 2  # ceil(2.0)
    assert len(hold_out_speakers(spk, 0.01, seed=0)) == 2  # at least 2: non-target trials need them
    assert len(hold_out_speakers(spk, 7, seed=0)) == 7
    assert hold_out_speakers(spk, 7, seed=0) == hold_out_speakers(spk, 7, seed=0)
    for bad in (1, 39):
        with pytest.raises(ValueError):
            hold_out_speakers(spk, bad, seed=0)


def test_make_trials_is_balanced_unique_and_deterministic():
    utts = [(f"{s}/v/{k}.wav", f"/x/{s}/{k}.wav", s) for s in "abcd" for k in range(5)]
    trials = make_trials(utts, 60, seed=0)
    labels = [t.label for t in trials]
    assert labels.count(1) == labels.count(0) == 30
    pairs = [(t.id1, t.id2) for t in trials]
    assert len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)
    assert all((t.id1.split("/")[0] == t.id2.split("/")[0]) == bool(t.label) for t in trials)
    assert make_trials(utts, 60, seed=0) == trials
    # Fewer target pairs exist (4 x 10) than asked for: all of them, and as many non-targets.
    assert sum(t.label for t in make_trials(utts, 1000, seed=0)) == 40
