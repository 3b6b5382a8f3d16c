import numpy as np
import pytest

from acquisition.anchor import anchored_ucb_batch, fit_anchor, log_activity
from acquisition.tanimoto_gp import gp_posterior, gp_ucb_batch


def _library(n=60, seed=0):
    rng = np.random.default_rng(seed)
    bits = rng.random((n, 2048)) < 0.03
    bits[: n // 3, :60] = True  # a family sharing a core
    return np.packbits(bits, axis=1), rng.choice([-1.0, 0.0, 1.0], size=n)


def test_recovers_the_out_of_bag_slope_and_intercept():
    rng = np.random.default_rng(1)
    z_members = rng.normal(size=(4, 20))
    measured = np.zeros(20, bool)
    measured[:8] = True
    out_of_bag = rng.random((4, 8)) < 0.5
    out_of_bag[0] = True  # every measured condition has at least one out-of-bag member
    z_oob = (z_members[:, :8] * out_of_bag).sum(0) / out_of_bag.sum(0)
    y = 1.0 + 2.0 * z_oob
    anchor = fit_anchor(z_members, measured, y, out_of_bag)
    assert anchor.weight == pytest.approx(2.0) and anchor.intercept == pytest.approx(1.0)
    assert anchor.n_out_of_bag == 8
    assert np.allclose(anchor.prior_mean[8:], 1.0 + 2.0 * z_members[:, 8:].mean(0))  # full ensemble
    assert np.allclose(anchor.prior_mean[:8], y)  # out-of-sample at the measured conditions
    assert fit_anchor(z_members, measured, y, out_of_bag, max_weight=1.5).weight == 1.5


def test_no_skill_shown_means_the_measurement_only_gp():
    rng = np.random.default_rng(2)
    fps, log10_dose = _library()
    values = np.exp(rng.normal(size=(5, 60)))
    measured = np.zeros(60, bool)
    measured[[0, 5, 22, 40, 41, 50]] = True
    activity = np.array([4.0, 3.0, 1.0, 0.9, 1.2, 1.1])
    plain = gp_ucb_batch(fps, log10_dose, measured, np.log(activity), 6)
    # no member out of bag, too few out-of-bag conditions, or a negative slope: weight 0
    two_out = np.zeros((5, 6), bool)
    two_out[0, :2] = True  # only two measured conditions predicted out of bag: below min_points
    for out_of_bag in (None, two_out):
        picks, anchor = anchored_ucb_batch(values, fps, log10_dose, measured, activity, 6, out_of_bag=out_of_bag)
        assert anchor.weight == 0.0 and picks.tolist() == plain.tolist()
    anti = values.copy()
    anti[:, measured] = np.exp(-np.log(activity))  # predicts the measured conditions backwards
    picks, anchor = anchored_ucb_batch(anti, fps, log10_dose, measured, activity, 6,
                                       out_of_bag=np.ones((5, 6), bool))
    assert anchor.weight == 0.0 and picks.tolist() == plain.tolist()


def test_a_skilled_ensemble_steers_the_batch():
    fps, log10_dose = _library()
    truth = np.exp(np.random.default_rng(3).normal(size=60))  # activity the GP cannot infer from structure
    measured = np.zeros(60, bool)
    measured[::6] = True
    values = np.tile(truth, (4, 1)) * np.exp(np.random.default_rng(4).normal(scale=0.05, size=(4, 60)))
    picks, anchor = anchored_ucb_batch(values, fps, log10_dose, measured, truth[measured], 5,
                                       out_of_bag=np.ones((4, measured.sum()), bool), beta=0.0)
    assert anchor.weight == pytest.approx(1.0, abs=0.1)
    best = np.argsort(-np.where(measured, -np.inf, truth))[:5]
    assert set(picks.tolist()) == set(best.tolist())
    mean, _ = gp_posterior(fps, log10_dose, measured, np.log(truth[measured]), prior_mean=anchor.prior_mean)
    assert np.corrcoef(mean[~measured], np.log(truth[~measured]))[0, 1] > 0.95


def test_errors_name_the_problem():
    z = np.zeros((3, 10))
    measured = np.zeros(10, bool)
    with pytest.raises(ValueError, match="at least one measured"):
        fit_anchor(z, measured, np.zeros(0), None)
    measured[:4] = True
    with pytest.raises(ValueError, match="one finite value per measured condition"):
        fit_anchor(z, measured, np.zeros(3), None)
    with pytest.raises(ValueError, match="out_of_bag must be 3 x 4"):
        fit_anchor(z, measured, np.zeros(4), np.ones((3, 10), bool))
    with pytest.raises(ValueError, match="K x N"):
        fit_anchor(np.zeros(10), measured, np.zeros(4), None)
    assert np.allclose(log_activity(np.array([0.0, np.e])), [np.log(1e-6), 1.0])
