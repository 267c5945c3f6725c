"""Score calibration (asv/calibration.py): the fit minimises Cllr, recovers a known LLR map, refuses lists it cannot
fit, and round-trips through calibration.json with one-line errors on bad files."""

import json

import numpy as np
import pytest

from asv.calibration import Calibration, fit_calibration, posterior
from asv.errors import CheckpointError, ConfigError
from asv.metrics import cllr
from asv.scoring import enrollment_model, l2_normalise


@pytest.mark.numerics
def test_fit_is_the_cllr_minimum():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = rng.normal(0.2 + 0.3 * labels, 0.1)
    cal = fit_calibration(scores, labels, {"trials": "dev"})
    best = cllr(cal.llr(scores), labels)
    assert cal.cllr_on_fit_list == pytest.approx(best, rel=1e-12)
    # At the minimum the gradient vanishes (the solver's tolerance is 1e-12), so a step of 1e-3 in either parameter
    # changes Cllr only by its curvature, ~1e-7 here: never downwards by more than rounding.
    for d_slope, d_offset in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert cllr((cal.slope + d_slope) * scores + cal.offset + d_offset, labels) >= best - 1e-12
    assert cal.min_cllr_on_fit_list <= best + 1e-12


def test_fit_recovers_the_map_of_scores_that_are_already_llrs():
    # Equal-variance Gaussians N(+-mu, 2mu) are calibrated LLRs: the fitted map is the identity up to sampling error.
    # With 100,000 trials per class the inverse Fisher information gives standard errors of 0.0043 (slope) and
    # 0.0067 (offset) on the LLR scale, 0.043 and 0.023 after the x10 / -5 rescaling below: 0.3 is 7 of the larger.
    rng = np.random.default_rng(1)
    mu, n = 2.0, 100_000
    scores = np.concatenate([rng.normal(mu, np.sqrt(2 * mu), n), rng.normal(-mu, np.sqrt(2 * mu), n)])
    labels = np.concatenate([np.ones(n, int), np.zeros(n, int)])
    cal = fit_calibration(0.1 * scores + 0.5, labels, {"trials": "synthetic"})  # a cosine-like scale and shift
    assert cal.slope == pytest.approx(10.0, abs=0.3) and cal.offset == pytest.approx(-5.0, abs=0.3)
    assert cal.score_at(cal.llr(0.73)) == pytest.approx(0.73, rel=1e-12)


def test_posterior_at_a_prior():
    assert posterior(0.0, 0.5) == pytest.approx(0.5)
    assert posterior(np.log(3.0), 0.5) == pytest.approx(0.75)  # odds 3:1
    assert posterior(np.log(3.0), 0.25) == pytest.approx(0.5)  # prior odds 1:3 cancel them
    with pytest.raises(ConfigError, match="prior"):
        posterior(0.0, 1.0)


def test_unfittable_lists_are_refused_with_one_line():
    with pytest.raises(ConfigError, match="perfectly separated"):
        fit_calibration([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], {"trials": "dev"})
    with pytest.raises(ConfigError, match="not more often same-speaker"):
        fit_calibration([0.9, 0.8, 0.7, 0.2, 0.1, 0.3], [0, 0, 1, 1, 1, 0], {"trials": "dev"})


def test_json_round_trip_and_bad_files(tmp_path):
    cal = Calibration(2.0, -1.0, {"trials": "dev", "num_trials": 10})
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert (back.slope, back.offset, back.fitted_on) == (2.0, -1.0, {"trials": "dev", "num_trials": 10})
    bad = tmp_path / "bad.json"
    for text, match in [
        ("{", "unreadable"),
        (json.dumps({**cal.to_dict(), "format_version": 9}), "format_version 9"),
        (json.dumps({**cal.to_dict(), "slope": -1.0}), "slope > 0"),
        (json.dumps({**cal.to_dict(), "offset": "x"}), "finite numbers"),
    ]:
        bad.write_text(text)
        with pytest.raises(CheckpointError, match=match) as err:
            Calibration.load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_enrolling_with_several_files_lowers_eer():
    # Embeddings = unit speaker direction + independent noise per file (std 1/4 per dimension in 64: norm 2). The
    # mean of 3 files has a third of the noise variance: EER about 11 % against 21 % for one file here, a gap of
    # ten points where 1,200 target trials give standard errors near one point.
    from asv.metrics import compute_eer

    rng = np.random.default_rng(3)
    spk = l2_normalise(rng.standard_normal((400, 64)))

    def files(n):
        return spk[:, None, :] + rng.standard_normal((400, n, 64)) / 4.0

    enroll, test = files(3), files(3)
    labels = (np.arange(400)[:, None] == np.repeat(np.arange(400), 3)[None, :]).ravel().astype(int)
    eers = {}
    for name, models in (("multi", np.stack([enrollment_model(e) for e in enroll])), ("single", enroll[:, 0])):
        scores = l2_normalise(models) @ l2_normalise(test.reshape(-1, 64)).T  # (400 models, 1200 tests)
        eers[name] = compute_eer(scores.ravel(), labels)[0]
    assert eers["multi"] < eers["single"], eers


@pytest.mark.numerics
def test_enrollment_model_is_the_renormalised_mean_of_unit_vectors():
    emb = np.array([[3.0, 0.0], [0.0, 0.5]])  # different norms must not weigh differently
    np.testing.assert_allclose(enrollment_model(emb), [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-12)
    one = np.array([1.0, 2.0, 2.0])
    np.testing.assert_allclose(enrollment_model(one), l2_normalise(one), rtol=1e-12)
