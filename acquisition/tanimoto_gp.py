"""A measurement-only reference: GP regression on measured activity, UCB batch.

No virtual assay: an exact Gaussian process over (compound, dose) conditions with the
kernel

    k(i, j) = s2 * Tanimoto(fp_i, fp_j) * exp(-(log10 d_i - log10 d_j)^2 / (2 l^2))

(Tanimoto on Morgan fingerprints is a valid kernel; the dose factor is a squared
exponential in decades), a constant prior mean equal to the mean of the measured values,
``s2`` their variance and Gaussian noise ``noise * s2``. Fixed, documented
hyperparameters rather than marginal-likelihood fits: with 8–24 measurements those fits
are unstable. The batch is chosen by UCB (``mean + beta sd``) one pick at a time, each
pick then conditioned on as if measured at its posterior mean (kriging believer): the mean
is unchanged by such a pick, the variance of everything similar to it shrinks, which
spreads the batch.

It answers "does the virtual assay beat a plain small-data Bayesian optimiser on my
measurements?" (``loop backtest --profiles``, policy ``gp_ucb``). Cost per batch:
``O(n^3 + n^2 N + q (n + q) N)`` for ``n`` measured and ``N`` candidates, plus the
``(n + q) N`` Tanimoto popcounts; no ``N x N`` matrix. Deterministic: no seed.

``prior_mean`` replaces the constant prior mean by any ``N`` vector (the loop passes the
virtual assay's calibrated prediction, ``acquisition.anchor``): the GP then models the
residuals ``y - prior_mean`` (a constant plus the kernel above, ``s2`` their variance), so
the posterior is the prior mean corrected near measured conditions. ``pending`` conditions
(plates in the lab) are never picked and are conditioned on first, like earlier picks.
``max_per_scaffold`` caps the picks per scaffold id, pending conditions counted (as
``select_batch`` does).

A condition with an empty fingerprint (an unparseable SMILES) has Tanimoto 0 to
everything, itself included, so its prior variance is 0: the GP knows nothing about it
and ranks it at its prior mean (with a constant prior mean: below every condition it is
uncertain about).
"""

from __future__ import annotations

import numpy as np

from acquisition.diversity import ScaffoldCaps, check_fingerprints, tanimoto_matrix
from acquisition.greedy import as_bool_mask, check_q

__all__ = ["gp_posterior", "gp_ucb_batch", "gp_ucb_scored", "kernel_columns"]


def kernel_columns(fingerprints: np.ndarray, log10_dose: np.ndarray, columns: np.ndarray,
                   dose_length: float) -> np.ndarray:
    """Prior correlations ``N x c`` between every condition and the ``columns`` conditions."""
    if not dose_length > 0:
        raise ValueError(f"dose_length must be > 0 decades, got {dose_length}")
    columns = np.asarray(columns, dtype=np.int64)
    tanimoto = tanimoto_matrix(fingerprints, fingerprints[columns]).astype(np.float64)  # N x c
    gap = log10_dose[:, None] - log10_dose[None, columns]
    return tanimoto * np.exp(-gap ** 2 / (2.0 * dose_length ** 2))


def gp_ucb_batch(fingerprints: np.ndarray, log10_dose: np.ndarray, measured: np.ndarray, y: np.ndarray, q: int,
                 **options) -> np.ndarray:
    """``q`` distinct unmeasured, non-pending conditions by believer-UCB on the GP posterior:
    ``gp_ucb_scored``'s picks without their scores (same arguments)."""
    return gp_ucb_scored(fingerprints, log10_dose, measured, y, q, **options)[0]


def gp_ucb_scored(
    fingerprints: np.ndarray,
    log10_dose: np.ndarray,
    measured: np.ndarray,
    y: np.ndarray,
    q: int,
    *,
    beta: float = 1.0,
    noise: float = 0.2,
    dose_length: float = 1.0,
    prior_mean: np.ndarray | None = None,
    pending: np.ndarray | None = None,
    scaffold_ids: np.ndarray | None = None,
    max_per_scaffold: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``q`` distinct unmeasured, non-pending conditions by believer-UCB, and each pick's UCB.

    Args:
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints.
        log10_dose: ``N`` log10 dose (uM); a constant for single-dose libraries.
        measured: ``N`` boolean mask of measured conditions (never picked).
        y: values at ``measured`` (in index order), e.g. log phenotypic activity.
        q: batch size (> 0); fewer picks when fewer conditions are eligible (or the scaffold
            cap closes the rest).
        beta: UCB weight of the posterior standard deviation (>= 0).
        noise: noise variance as a share of the signal variance (> 0).
        dose_length: length scale of the dose factor in decades (> 0).
        prior_mean: ``N`` prior mean (default: constant, the mean of ``y``).
        pending: ``N`` boolean mask of conditions in flight: never picked, believed first.
        scaffold_ids: ``N`` integer scaffold ids, for ``max_per_scaffold``.
        max_per_scaffold: most picks per scaffold id, pending conditions counted (None: no cap).

    Returns:
        ``int64 (<= min(q, n_eligible),)`` indices in pick order, and ``float64`` each pick's
        ``mean + beta sd`` when it was picked (``y``'s units; the sd conditioned on the
        pending conditions and the earlier picks, so the scores never rise).
    """
    q = check_q(q)
    fps, log10_dose, measured, y, prior_mean = _check(fingerprints, log10_dose, measured, y, beta, noise,
                                                      dose_length, prior_mean)
    pending = np.zeros(len(fps), dtype=bool) if pending is None else as_bool_mask(pending, len(fps), "pending")
    pending = pending & ~measured
    if max_per_scaffold is not None and scaffold_ids is None:
        raise ValueError(f"max_per_scaffold={max_per_scaffold} needs scaffold_ids (one integer per condition)")
    caps = ScaffoldCaps(scaffold_ids, max_per_scaffold, len(fps), np.flatnonzero(pending))
    obs = np.flatnonzero(measured)
    mean, var, (signal, k_obs, weights) = _posterior(fps, log10_dose, obs, y, prior_mean, noise, dose_length)
    blocked = measured | pending
    if caps.active:
        blocked |= ~caps.open_mask()
    n_picks = min(q, int((~blocked).sum()))
    # scaled posterior covariance columns of the pending conditions and earlier picks, one row each
    believed = np.empty((int(pending.sum()) + n_picks, len(fps)))
    n_believed = 0

    def believe(index: int) -> np.ndarray:
        """Condition on ``index`` as if measured at its posterior mean: only the variance shrinks."""
        nonlocal n_believed
        column = signal * kernel_columns(fps, log10_dose, np.array([index]), dose_length)[:, 0]
        column -= weights.T @ k_obs[index]  # posterior cov(., index) given the measurements
        earlier = believed[:n_believed]  # ... and given the pending conditions and earlier picks
        column -= earlier.T @ earlier[:, index]
        column /= np.sqrt(max(column[index] + noise * signal, 1e-12))
        believed[n_believed] = column
        n_believed += 1
        return np.maximum(var - column ** 2, 0.0)

    for index in np.flatnonzero(pending):
        var = believe(int(index))
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(n_picks):
        if blocked.all():  # the scaffold cap closed what was left
            break
        score = np.where(blocked, -np.inf, mean + beta * np.sqrt(var))
        pick = int(np.argmax(score))
        picks.append(pick)
        scores.append(float(score[pick]))
        blocked[pick] = True
        closed = caps.add(pick)
        if closed is not None:
            blocked |= ~closed
        var = believe(pick)
    return np.asarray(picks, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def gp_posterior(fingerprints: np.ndarray, log10_dose: np.ndarray, measured: np.ndarray, y: np.ndarray, *,
                 noise: float = 0.2, dose_length: float = 1.0,
                 prior_mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and variance ``N``, ``N`` of every condition given ``y`` at ``measured``."""
    fps, log10_dose, measured, y, prior_mean = _check(fingerprints, log10_dose, measured, y, 0.0, noise,
                                                      dose_length, prior_mean)
    mean, var, _ = _posterior(fps, log10_dose, np.flatnonzero(measured), y, prior_mean, noise, dose_length)
    return mean, var


def _posterior(fps, log10_dose, obs, y, prior_mean, noise, dose_length):
    residual = y - prior_mean[obs]  # n: what the prior mean does not explain
    offset = residual.mean()
    signal = max(float(residual.var()), 1e-6)
    k_obs = signal * kernel_columns(fps, log10_dose, obs, dose_length)  # N x n
    gram = k_obs[obs] + noise * signal * np.eye(len(obs))  # n x n
    weights = np.linalg.solve(gram, k_obs.T)  # n x N
    mean = prior_mean + offset + weights.T @ (residual - offset)  # N
    prior_var = signal * fps.any(axis=1)  # N: Tanimoto(x, x) is 1, or 0 for an empty fingerprint
    var = np.maximum(prior_var - (k_obs * weights.T).sum(axis=1), 0.0)  # N
    return mean, var, (signal, k_obs, weights)


def _check(fingerprints, log10_dose, measured, y, beta, noise, dose_length, prior_mean):
    fps = check_fingerprints(fingerprints)
    n = len(fps)
    measured = as_bool_mask(measured, n, "measured")
    log10_dose = np.asarray(log10_dose, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    obs = np.flatnonzero(measured)
    if log10_dose.shape != (n,) or not np.isfinite(log10_dose).all():
        raise ValueError(f"log10_dose must be {n} finite numbers, got shape {log10_dose.shape}")
    if y.shape != (len(obs),) or not np.isfinite(y).all():
        raise ValueError(f"y must hold one finite value per measured condition ({len(obs)}), got {y.shape}")
    if len(obs) == 0:
        raise ValueError("the GP needs at least one measured condition (use a cold start first)")
    if not (beta >= 0 and noise > 0 and dose_length > 0):
        raise ValueError(f"need beta >= 0, noise > 0, dose_length > 0; got {beta}, {noise}, {dose_length}")
    if prior_mean is None:
        prior_mean = np.zeros(n)
    prior_mean = np.asarray(prior_mean, dtype=np.float64)
    if prior_mean.shape != (n,) or not np.isfinite(prior_mean).all():
        raise ValueError(f"prior_mean must be {n} finite numbers, got shape {prior_mean.shape}")
    return fps, log10_dose, measured, y, prior_mean
