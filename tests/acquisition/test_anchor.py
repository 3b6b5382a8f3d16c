import numpy as np
import pytest
from scipy.stats import linregress

from acquisition.anchor import (anchored_ucb_batch, dilution_ratio, fit_anchor, log_activity, on_prediction_scale,
                               spread_ratio)
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
    # with the dilution correction the slope is rescaled by r, exactly (y has no noise, so se = 0)
    ratio = dilution_ratio(z_members, measured, out_of_bag.sum(0))
    assert ratio > 1
    corrected = fit_anchor(z_members, measured, y, out_of_bag, max_weight=3 * ratio, attenuation=True)
    assert corrected.weight == pytest.approx(2.0 * ratio) and corrected.dilution == pytest.approx(ratio)


def test_dilution_ratio_closed_forms():
    rng = np.random.default_rng(3)
    measured = np.zeros(400, bool)
    measured[:10] = True
    n_oob = np.array([1, 1, 2, 4, 1, 2, 1, 1, 3, 1])
    # members identical (no member noise): no dilution
    same = np.repeat(rng.normal(size=(1, 400)), 5, axis=0)
    assert dilution_ratio(same, measured, n_oob) == 1.0
    # members share nothing (no signal): r = K mean(1 / n_oob), up to the sampling error of the variances
    noise = rng.normal(size=(5, 20000))
    assert dilution_ratio(noise, np.zeros(20000, bool), n_oob) == pytest.approx(5 * np.mean(1 / n_oob), rel=0.05)
    # signal v and member noise s2: r = (v + s2 mean(1/n_oob)) / (v + s2 / K)
    signal, members = rng.normal(scale=0.8, size=20000), rng.normal(scale=0.5, size=(5, 20000))
    expected = (0.64 + 0.25 * np.mean(1 / n_oob)) / (0.64 + 0.25 / 5)
    assert dilution_ratio(signal + members, np.zeros(20000, bool), n_oob) == pytest.approx(expected, rel=0.03)
    assert dilution_ratio(signal[None, :], np.zeros(20000, bool), n_oob) == 1.0  # one member: nothing to estimate


def test_the_corrected_slope_is_the_slope_on_the_ensemble_mean():
    """Members = signal + independent noise; y depends on the signal. The out-of-bag fit (one member per
    measured condition) is flattened by that member's noise; corrected, it estimates the slope of y on the
    K-member mean, which is what the prior mean a + b z uses (checked on the unmeasured conditions)."""
    rng = np.random.default_rng(4)
    n, n_measured, k = 6000, 3000, 4
    signal = rng.normal(size=n)
    z_members = signal + rng.normal(scale=1.0, size=(k, n))
    y = 0.2 + 0.6 * signal + rng.normal(scale=0.3, size=n)
    measured = np.arange(n) < n_measured
    out_of_bag = np.zeros((k, n_measured), bool)
    out_of_bag[rng.integers(0, k, n_measured), np.arange(n_measured)] = True  # one member left each out
    target = linregress(z_members[:, ~measured].mean(0), y[~measured]).slope  # 0.6 * 1 / (1 + 1/4) = 0.48
    raw = fit_anchor(z_members, measured, y[measured], out_of_bag, prior_sd=np.inf).weight
    corrected = fit_anchor(z_members, measured, y[measured], out_of_bag, prior_sd=np.inf, attenuation=True).weight
    assert raw == pytest.approx(0.3, abs=0.03)  # 0.6 * 1 / (1 + 1)
    assert corrected == pytest.approx(target, abs=0.03) and target == pytest.approx(0.48, abs=0.03)


def test_the_weight_is_the_posterior_mean_of_the_slope():
    """Least squares (scipy's linregress: slope, standard error) combined with the N(b_0, tau^2) prior."""
    rng = np.random.default_rng(5)
    z_members = rng.normal(size=(3, 40))
    measured = np.zeros(40, bool)
    measured[:12] = True
    out_of_bag = np.ones((3, 12), bool)
    z_oob = z_members[:, :12].mean(0)
    y = 0.5 + 0.8 * z_oob + rng.normal(scale=0.5, size=12)
    fit = linregress(z_oob, y)
    for prior_weight, prior_sd in [(0.3, 0.2), (0.0, 0.5), (1.0, 0.05)]:
        precision, data_precision = 1 / prior_sd ** 2, 1 / fit.stderr ** 2
        expected = (prior_weight * precision + fit.slope * data_precision) / (precision + data_precision)
        anchor = fit_anchor(z_members, measured, y, out_of_bag, prior_weight=prior_weight, prior_sd=prior_sd)
        assert anchor.weight == pytest.approx(expected)
        assert min(prior_weight, fit.slope) < anchor.weight < max(prior_weight, fit.slope)
        assert anchor.intercept == pytest.approx(np.mean(y - anchor.weight * z_oob))
    assert fit_anchor(z_members, measured, y, out_of_bag, prior_sd=np.inf).weight == pytest.approx(fit.slope)
    assert fit_anchor(z_members, measured, y, out_of_bag, prior_sd=0.0).weight == 0.3
    # no out-of-bag evidence: the prior weight
    assert fit_anchor(z_members, measured, y, None).weight == 0.3
    assert fit_anchor(z_members, measured, y, None, prior_weight=0.7).weight == 0.7
    with pytest.raises(ValueError, match="prior_weight"):
        fit_anchor(z_members, measured, y, None, prior_weight=4.0)


def test_no_skill_shown_means_the_measurement_only_gp():
    rng = np.random.default_rng(2)
    fps, log10_dose = _library()
    values = np.exp(rng.normal(size=(5, 60)))
    measured = np.zeros(60, bool)
    measured[[0, 5, 22, 40, 41, 50]] = True
    activity = np.array([4.0, 3.0, 1.0, 0.9, 1.2, 1.1])
    plain = gp_ucb_batch(fps, log10_dose, measured, np.log(activity), 6)
    # no member out of bag, or too few out-of-bag conditions, and a prior weight of 0
    two_out = np.zeros((5, 6), bool)
    two_out[0, :2] = True  # only two measured conditions predicted out of bag: below min_points
    for out_of_bag in (None, two_out):
        batch = anchored_ucb_batch(values, fps, log10_dose, measured, activity, 6, out_of_bag=out_of_bag,
                                   prior_weight=0.0)
        assert batch.anchor.weight == 0.0 and batch.indices.tolist() == plain.tolist()
        batch = anchored_ucb_batch(values, fps, log10_dose, measured, activity, 6, out_of_bag=out_of_bag)
        assert batch.anchor.weight == 0.3  # the default prior, untested
    anti = values.copy()
    anti[:, measured] = np.exp(-np.log(activity))  # predicts the measured conditions backwards
    batch = anchored_ucb_batch(anti, fps, log10_dose, measured, activity, 6, out_of_bag=np.ones((5, 6), bool))
    assert batch.anchor.weight == 0.0 and batch.indices.tolist() == plain.tolist()  # evidence overrules the prior


def test_a_skilled_ensemble_steers_the_batch():
    fps, log10_dose = _library()
    truth = np.exp(np.random.default_rng(3).normal(size=60))  # activity the GP cannot infer from structure
    measured = np.zeros(60, bool)
    measured[::6] = True
    values = np.tile(truth, (4, 1)) * np.exp(np.random.default_rng(4).normal(scale=0.05, size=(4, 60)))
    batch = anchored_ucb_batch(values, fps, log10_dose, measured, truth[measured], 5,
                               out_of_bag=np.ones((4, measured.sum()), bool), beta=0.0)
    assert batch.anchor.weight == pytest.approx(1.0, abs=0.1)
    best = np.argsort(-np.where(measured, -np.inf, truth))[:5]
    assert set(batch.indices.tolist()) == set(best.tolist())
    mean, _ = gp_posterior(fps, log10_dose, measured, np.log(truth[measured]), prior_mean=batch.anchor.prior_mean)
    assert np.allclose(batch.ucb, mean[batch.indices])  # beta = 0: the UCB is the posterior mean
    assert np.corrcoef(mean[~measured], np.log(truth[~measured]))[0, 1] > 0.95


def test_a_linear_objective_is_anchored_free_of_its_units():
    """A similarity predicted on a tenth of the measured scale (cell-sd against well-z units) gets the
    weight the same prediction on the measured scale gets: the picks, the UCB and the weight do not
    depend on the predictions' units."""
    fps, log10_dose = _library()
    rng = np.random.default_rng(5)
    truth = np.tanh(rng.normal(size=60))  # a similarity in [-1, 1]
    measured = np.zeros(60, bool)
    measured[::5] = True
    values = truth + rng.normal(scale=0.3, size=(4, 60))
    oob = rng.random((4, measured.sum())) < 0.5
    runs = [anchored_ucb_batch(scale * values, fps, log10_dose, measured, truth[measured], 6, out_of_bag=oob,
                               log_scale=False) for scale in (1.0, 0.1, 7.0)]
    for run in runs[1:]:
        assert run.indices.tolist() == runs[0].indices.tolist()
        assert run.anchor.weight == pytest.approx(runs[0].anchor.weight)
        assert np.allclose(run.ucb, runs[0].ucb)
    ratio = spread_ratio(values, measured, truth[measured])
    assert ratio == pytest.approx(truth[measured].std() / values.mean(0)[measured].std())
    assert spread_ratio(0.1 * values, measured, truth[measured]) == pytest.approx(10 * ratio)
    assert spread_ratio(values, measured, np.zeros(measured.sum())) == 1.0  # nothing to scale to
    one = np.zeros(60, bool)
    one[0] = True
    assert spread_ratio(values, one, truth[:1]) == 1.0


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


def test_measured_values_on_the_prediction_scale():
    """The lab's ranking, the predictions' log mean and log sd (activity); mean and sd as they are
    (an objective); only the mean moved when there is no spread to match."""
    rng = np.random.default_rng(4)
    predicted = np.exp(rng.normal(0.5, 0.3, size=(3, 12)))  # K x n, positive
    observed = np.exp(rng.normal(2.0, 1.1, size=12))  # other units, another spread
    on_scale = on_prediction_scale(predicted, observed)
    z = np.log(predicted.mean(0))
    assert np.log(on_scale).mean() == pytest.approx(z.mean()) and np.log(on_scale).std() == pytest.approx(z.std())
    assert (np.argsort(on_scale) == np.argsort(observed)).all()
    linear = on_prediction_scale(predicted - 2.0, observed - 5.0, log_scale=False)
    assert linear.mean() == pytest.approx((predicted - 2.0).mean()) and linear.std() == pytest.approx(
        (predicted - 2.0).mean(0).std())
    assert on_prediction_scale(predicted[:, :1], observed[:1]) == pytest.approx(predicted[:, 0].mean())
    assert np.allclose(on_prediction_scale(predicted, np.full(12, 3.0)), np.exp(z.mean()))
    with pytest.raises(ValueError, match="one finite value per predicted condition"):
        on_prediction_scale(predicted, observed[:5])
