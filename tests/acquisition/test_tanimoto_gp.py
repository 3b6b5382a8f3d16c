import numpy as np
import pytest

from acquisition.diversity import tanimoto_matrix
from acquisition.tanimoto_gp import gp_posterior, gp_ucb_batch, gp_ucb_scored, kernel_columns


def _library(n=40, seed=0):
    rng = np.random.default_rng(seed)
    bits = rng.random((n, 2048)) < 0.03
    bits[: n // 2, :60] = True  # a family sharing a core
    log10_dose = rng.choice([-1.0, 0.0, 1.0], size=n)
    return np.packbits(bits, axis=1), log10_dose


def _direct_posterior(kernel, obs, y, extra, noise):
    """Posterior mean (given obs) and variance (given obs + believed extra picks), by plain solves."""
    signal = y.var()
    prior = signal * kernel
    gram = prior[np.ix_(obs, obs)] + noise * signal * np.eye(len(obs))
    mean = y.mean() + prior[:, obs] @ np.linalg.solve(gram, y - y.mean())
    cond = list(obs) + list(extra)
    gram = prior[np.ix_(cond, cond)] + noise * signal * np.eye(len(cond))
    var = np.diag(prior) - np.einsum("ij,ji->i", prior[:, cond], np.linalg.solve(gram, prior[cond]))
    return mean, var


def test_picks_equal_a_direct_believer_ucb():
    fps, log10_dose = _library()
    kernel = tanimoto_matrix(fps, fps).astype(np.float64) * np.exp(-(log10_dose[:, None] - log10_dose) ** 2 / 2)
    measured = np.zeros(len(fps), bool)
    measured[[0, 3, 21, 30, 35]] = True
    y = np.array([2.0, 1.5, 0.1, -0.3, 0.0])
    picks = gp_ucb_batch(fps, log10_dose, measured, y, 6, beta=1.5, noise=0.2)
    expected, expected_scores, blocked = [], [], measured.copy()
    obs = np.flatnonzero(measured)
    for _ in range(6):
        mean, var = _direct_posterior(kernel, obs, y, expected, 0.2)
        score = np.where(blocked, -np.inf, mean + 1.5 * np.sqrt(np.maximum(var, 0)))
        expected.append(int(np.argmax(score)))
        expected_scores.append(score[expected[-1]])
        blocked[expected[-1]] = True
    assert picks.tolist() == expected
    scored_picks, scores = gp_ucb_scored(fps, log10_dose, measured, y, 6, beta=1.5, noise=0.2)
    assert scored_picks.tolist() == expected and np.allclose(scores, expected_scores)
    assert (np.diff(scores) <= 1e-12).all()  # believing a pick only shrinks variances: scores never rise
    assert np.allclose(kernel_columns(fps, log10_dose, np.array([4, 7]), 1.0), kernel[:, [4, 7]])


def test_scaffold_cap_equals_a_direct_capped_believer_ucb():
    """``max_per_scaffold``: the direct believer-UCB restricted to scaffolds still open, pending
    conditions counted towards the cap and believed first; fewer picks once every scaffold is full."""
    fps, log10_dose = _library()
    kernel = tanimoto_matrix(fps, fps).astype(np.float64) * np.exp(-(log10_dose[:, None] - log10_dose) ** 2 / 2)
    measured = np.zeros(len(fps), bool)
    measured[[0, 3, 21, 30, 35]] = True
    y = np.array([2.0, 1.5, 0.1, -0.3, 0.0])
    pending = np.zeros(len(fps), bool)
    pending[[1, 2]] = True
    scaffold_ids = np.arange(len(fps)) % 5  # conditions 1 and 2: scaffolds 1 and 2, already one pick each
    picks, scores = gp_ucb_scored(fps, log10_dose, measured, y, 9, beta=1.5, noise=0.2, pending=pending,
                                  scaffold_ids=scaffold_ids, max_per_scaffold=2)
    expected, expected_scores = [], []
    counts = np.bincount(scaffold_ids[pending], minlength=5)
    obs = np.flatnonzero(measured)
    for _ in range(9):
        mean, var = _direct_posterior(kernel, obs, y, [1, 2, *expected], 0.2)
        open_ = ~measured & ~pending & ~np.isin(np.arange(len(fps)), expected) & (counts[scaffold_ids] < 2)
        if not open_.any():
            break
        score = np.where(open_, mean + 1.5 * np.sqrt(np.maximum(var, 0)), -np.inf)
        expected.append(int(np.argmax(score)))
        expected_scores.append(score[expected[-1]])
        counts[scaffold_ids[expected[-1]]] += 1
    assert len(expected) == 8  # 5 scaffolds x 2, minus the 2 pending
    assert picks.tolist() == expected and np.allclose(scores, expected_scores)
    assert np.bincount(scaffold_ids[np.r_[picks, 1, 2]]).max() == 2
    uncapped = gp_ucb_scored(fps, log10_dose, measured, y, 9, beta=1.5, noise=0.2, pending=pending)[0]
    capped_loosely = gp_ucb_scored(fps, log10_dose, measured, y, 9, beta=1.5, noise=0.2, pending=pending,
                                   scaffold_ids=scaffold_ids, max_per_scaffold=11)[0]
    assert capped_loosely.tolist() == uncapped.tolist()
    with pytest.raises(ValueError, match="needs scaffold_ids"):
        gp_ucb_scored(fps, log10_dose, measured, y, 3, max_per_scaffold=2)


def test_exploits_the_family_of_a_measured_active_and_never_repicks():
    fps, log10_dose = _library()
    measured = np.zeros(len(fps), bool)
    measured[[0, 25, 30]] = True  # 0 is in the family (first half), 25 and 30 are not
    y = np.array([3.0, 0.0, 0.1])
    picks = gp_ucb_batch(fps, log10_dose, measured, y, 4, beta=0.0)  # pure exploitation
    assert (picks < 20).all() and not measured[picks].any() and len(set(picks.tolist())) == 4
    everything = gp_ucb_batch(fps, log10_dose, measured, y, 100)
    assert sorted(everything.tolist()) == np.flatnonzero(~measured).tolist()


def test_posterior_closed_forms():
    fps, log10_dose = _library(n=6)
    fps[:, -1] &= 0xFE  # clear the last bit everywhere ...
    fps[5] = 0
    fps[5, -1] = 1  # ... so that it is a bit no other compound has: Tanimoto 0 to every other
    fps[4] = fps[0]
    log10_dose[4] = log10_dose[0]  # condition 4 is condition 0 again
    measured = np.array([True, True, True, False, False, False])
    y = np.array([1.0, 2.0, 4.0])
    mean, var = gp_posterior(fps, log10_dose, measured, y, noise=0.2)
    expected_mean, expected_var = _direct_posterior(
        tanimoto_matrix(fps, fps).astype(np.float64) * np.exp(-(log10_dose[:, None] - log10_dose) ** 2 / 2),
        np.arange(3), y, [], 0.2)
    assert np.allclose(mean, expected_mean) and np.allclose(var, expected_var)
    assert mean[5] == pytest.approx(y.mean()) and var[5] == pytest.approx(y.var())  # unrelated: the prior
    assert mean[4] == pytest.approx(mean[0]) and var[4] < 0.2 * y.var()  # a replicate: near its measurement


def test_errors_name_the_problem():
    fps, log10_dose = _library(n=10)
    measured = np.zeros(10, bool)
    with pytest.raises(ValueError, match="at least one measured"):
        gp_ucb_batch(fps, log10_dose, measured, np.zeros(0), 2)
    measured[:2] = True
    with pytest.raises(ValueError, match="one finite value per measured"):
        gp_ucb_batch(fps, log10_dose, measured, np.zeros(3), 2)
    with pytest.raises(ValueError, match="log10_dose"):
        gp_ucb_batch(fps, log10_dose[:5], measured, np.zeros(2), 2)
    with pytest.raises(ValueError, match="noise > 0"):
        gp_ucb_batch(fps, log10_dose, measured, np.zeros(2), 2, noise=0.0)
    with pytest.raises(ValueError, match="beta >= 0"):
        gp_ucb_batch(fps, log10_dose, measured, np.zeros(2), 2, beta=-1.0)
    with pytest.raises(ValueError, match="dose_length"):
        kernel_columns(fps, log10_dose, np.array([0]), dose_length=0.0)


def test_one_measurement_and_constant_values_still_spread_the_batch():
    fps, log10_dose = _library()
    measured = np.zeros(len(fps), bool)
    measured[0] = True  # one value: no variance to scale the prior with (clamped, not NaN)
    picks = gp_ucb_batch(fps, log10_dose, measured, np.array([2.0]), 5)
    assert len(set(picks.tolist())) == 5 and not measured[picks].any()
    mean, var = gp_posterior(fps, log10_dose, measured, np.array([2.0]))
    assert np.isfinite(mean).all() and np.isfinite(var).all() and np.allclose(mean, 2.0)


def test_empty_fingerprints_have_no_prior_variance():
    fps, log10_dose = _library(n=12)
    fps[[10, 11]] = 0  # unparseable SMILES are kept with empty fingerprints
    measured = np.zeros(12, bool)
    measured[[0, 5]] = True
    y = np.array([1.0, 3.0])
    mean, var = gp_posterior(fps, log10_dose, measured, y)
    assert var[10] == var[11] == 0.0 and mean[10] == pytest.approx(y.mean())
    assert (var[~measured][:8] > 0).all()
    picks = gp_ucb_batch(fps, log10_dose, measured, y, 4)
    assert not np.isin(picks, [10, 11]).any()  # the GP knows nothing about them: not its first picks


def test_prior_mean_is_corrected_by_the_residuals():
    fps, log10_dose = _library(n=30)
    kernel = tanimoto_matrix(fps, fps).astype(np.float64) * np.exp(-(log10_dose[:, None] - log10_dose) ** 2 / 2)
    measured = np.zeros(30, bool)
    measured[[1, 4, 17, 25]] = True
    y = np.array([1.0, 0.5, 2.0, -1.0])
    prior_mean = np.linspace(-1.0, 1.0, 30)
    mean, var = gp_posterior(fps, log10_dose, measured, y, prior_mean=prior_mean)
    residual = y - prior_mean[measured]  # the GP models what the prior mean does not explain
    expected_mean, expected_var = _direct_posterior(kernel, np.flatnonzero(measured), residual, [], 0.2)
    assert np.allclose(mean, prior_mean + expected_mean) and np.allclose(var, expected_var)
    # a constant prior mean is absorbed by the residuals' constant: same posterior, same picks
    assert np.allclose(gp_posterior(fps, log10_dose, measured, y, prior_mean=np.full(30, 7.0))[0],
                       gp_posterior(fps, log10_dose, measured, y)[0])
    assert (gp_ucb_batch(fps, log10_dose, measured, y, 5, prior_mean=np.full(30, -3.0)).tolist()
            == gp_ucb_batch(fps, log10_dose, measured, y, 5).tolist())
    with pytest.raises(ValueError, match="prior_mean must be 30 finite"):
        gp_posterior(fps, log10_dose, measured, y, prior_mean=np.zeros(29))


def test_pending_conditions_are_believed_before_the_picks():
    fps, log10_dose = _library()
    measured = np.zeros(len(fps), bool)
    measured[[0, 3, 21, 30, 35]] = True
    y = np.array([2.0, 1.5, 0.1, -0.3, 0.0])
    free = gp_ucb_batch(fps, log10_dose, measured, y, 6)
    pending = np.zeros(len(fps), bool)
    pending[free[:2]] = True  # the first two picks are already in the lab
    with_pending = gp_ucb_batch(fps, log10_dose, measured, y, 4, pending=pending)
    assert with_pending.tolist() == free[2:].tolist()
    pending[measured] = True  # a measured condition flagged pending is ignored, not believed twice
    assert gp_ucb_batch(fps, log10_dose, measured, y, 4, pending=pending).tolist() == free[2:].tolist()
