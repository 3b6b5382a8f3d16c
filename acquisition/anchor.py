"""The loop's default acquisition: the virtual assay's predictions anchored on the lab's measurements.

An ensemble trained on a few dozen measured conditions can be right about unmeasured ones
(on BBBC021 its ranking of the unmeasured conditions reached Spearman 0.63) or no better than
chance (synthetic real-drug tables, -0.06 to 0.14), and nothing inside the ensemble says
which: its members agree just as much either way. The measurements say which. So the
batch is chosen by believer-UCB on a Gaussian process over the measured conditions
(``acquisition.tanimoto_gp``: Tanimoto x log-dose kernel) whose **prior mean is the
ensemble's prediction, weighted by how well it predicted measurements it was not trained on**:

    z(x)    = mean over members of log predicted activity           (N, every condition)
    z_oob   = the same, over the members whose bootstrap left the measured condition out
    y       = measured log activity                                  (n, measured conditions)
    b_hat   = least-squares slope of y on z_oob, with standard error se (optionally both times r, below)
    b       = posterior mean of the slope under the prior N(b_0, tau^2):
              (b_0 / tau^2 + b_hat / se^2) / (1 / tau^2 + 1 / se^2), clipped to [0, max_weight]
    a       = mean of y - b z_oob                                    the intercept given b
    m(x)    = a + b z(x)                                             the GP's prior mean

Members train on bootstrap resamples of the measured compounds (``FeatureAssayConfig.bootstrap``),
so about a third of the members never saw a given measured condition: their prediction of it
is an honest test. But it is the prediction of one or two members, and single members are
noisy (on BBBC021 the members' spread, variance 0.25 in log activity, is larger than the
spread of their mean over conditions, 0.13), so from 8 or 16 measurements the slope
``b_hat`` swings from -0.6 to 1.2 between seeds whose ensembles rank the unmeasured
conditions about equally well. Hence the prior: ``b`` is a log-log slope (an elasticity:
10% more predicted activity, ``b`` x 10% more measured), ``b_0 = 0.3``, ``tau = 0.2``
(``SelectionConfig.anchor_prior_weight`` / ``anchor_prior_sd``): a weakly skilled,
shrunk-towards-controls ensemble until the measurements say otherwise. The best slope on
the unmeasured conditions, known only to a backtest, was 0.3 to 0.9 on BBBC021 and 0.0 to
0.2 on the synthetic real-drug tables; out-of-bag evidence moves ``b`` towards the data as
``se`` shrinks, a negative slope pulls it towards 0 (reached, the measurement-only GP,
once the slope is clearly negative), and without
out-of-bag evidence (fewer than ``min_points`` conditions) ``b = b_0``. ``tau = inf`` is the
plain least-squares slope, ``tau = 0`` the fixed weight ``b_0``.

**Regression dilution (option, off by default).** ``z_oob`` averages one or two members, ``z`` all ``K``, and a member's
deviation from the ensemble's expected prediction is noise to the regression: it flattens the
slope of ``y`` on ``z_oob`` more than it would flatten the slope on ``z``, which is the slope
the prior mean needs. With member noise variance ``s2`` (mean over the unmeasured conditions of
the variance across members) and signal variance ``v = max(var(z) - s2 / K, 0)`` (over the same
conditions), the reliabilities are ``v / (v + s2 mean(1 / n_oob))`` for ``z_oob`` and
``v / (v + s2 / K)`` for ``z``; their ratio ``r = (v + s2 mean(1 / n_oob)) / (v + s2 / K)``, which lies
in ``[1, K mean(1 / n_oob)]``, rescales ``b_hat`` and ``se`` before they meet the prior
(``attenuation=True``; ``SelectionConfig.anchor_attenuation``). On synthetic-lab backtests
(K = 3, 1.4 out-of-bag members per condition) the uncorrected slope was 0.13-0.32 and the
slope of the next round's measurements on ``z`` 0.48-0.74; the correction moved it to
0.17-0.57. It did not change what the loop finds (5-seed backtests: BBBC021 0.833 either way,
0.683 over 20 seeds; synthetic lab 0.127 vs 0.128 and 0.172 vs 0.165; four synthetic real-drug
tables 0.005-0.013 lower on three, 0.006 higher on one), because where the ensemble has no
skill the larger ``se`` hands the weight back to the prior. So it stays off; the rest of the
gap is the relation being steeper among the top predictions than over the measured conditions.

The GP models the residuals ``y - m`` (at measured conditions ``m`` uses ``z_oob`` where
some member left the condition out, so those residuals are out-of-sample too), which
corrects the prior mean near measured conditions and gives the posterior standard
deviation for UCB.

Log activity because activity is a positive distance (about 1 for a control-like condition)
with a long upper tail: on the log scale a hit's neighbours are not swamped by its size.
An objective that can be negative (similarity to a target phenotype) is modelled as it is
(``log_scale=False``); its predictions are first rescaled to the spread of the measured values
(:func:`spread_ratio`), because predicted and measured profiles are normalised in different
units (the members' generated control cells against the plate's DMSO wells), so that ``b``
reads as on the log scale, measured change per predicted change, and ``b_0`` keeps its meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acquisition.greedy import as_bool_mask, as_member_values
from acquisition.tanimoto_gp import gp_ucb_scored

__all__ = ["Anchor", "AnchoredBatch", "anchored_ucb_batch", "dilution_ratio", "fit_anchor", "log_activity",
           "on_prediction_scale", "spread_ratio"]

ACTIVITY_FLOOR = 1e-6
MAX_WEIGHT = 3.0  # default upper clip of the ensemble's weight b


@dataclass(frozen=True)
class Anchor:
    """The GP's prior mean ``N`` and how it was fitted."""

    prior_mean: np.ndarray
    weight: float  # b: trust in the ensemble (0 = measurement-only GP)
    intercept: float  # a
    n_out_of_bag: int  # measured conditions with at least one out-of-bag member prediction
    dilution: float = 1.0  # r: the out-of-bag slope and its standard error were multiplied by this


@dataclass(frozen=True)
class AnchoredBatch:
    """Picks in order, each pick's UCB (log activity, or the objective on the linear scale) when
    picked, and the fitted anchor."""

    indices: np.ndarray
    ucb: np.ndarray
    anchor: Anchor


def log_activity(activity: np.ndarray) -> np.ndarray:
    """Log of phenotypic activity, floored at ``1e-6`` (activity is a distance, >= 0)."""
    return np.log(np.maximum(np.asarray(activity, dtype=np.float64), ACTIVITY_FLOOR))


def fit_anchor(
    member_log_values: np.ndarray,
    measured: np.ndarray,
    y: np.ndarray,
    out_of_bag: np.ndarray | None,
    *,
    prior_weight: float = 0.3,
    prior_sd: float = 0.2,
    max_weight: float = MAX_WEIGHT,
    min_points: int = 3,
    attenuation: bool = False,
) -> Anchor:
    """Prior mean ``a + b z`` from the out-of-bag fit of measured ``y`` on member predictions.

    Args:
        member_log_values: ``K x N`` per-member log predicted activity of every condition (or a
            linear objective, rescaled by :func:`spread_ratio`: ``anchored_ucb_batch(log_scale=False)``).
        measured: ``N`` boolean mask of measured conditions.
        y: measured log activity (or the objective), one per measured condition (index order).
        out_of_bag: ``K x n`` boolean, True where member ``k`` did not train on measured
            condition ``i``; None: no member is out of bag (then ``b = b_0``).
        prior_weight: ``b_0``, the slope before any out-of-bag evidence.
        prior_sd: ``tau``, its prior standard deviation (``inf``: least squares alone;
            ``0``: ``b = b_0``).
        max_weight: upper clip of ``b`` (the ensemble's predictions are shrunk towards
            controls, so a skilled ensemble can fit with ``b > 1``).
        min_points: fewest out-of-bag measured conditions to fit ``b_hat`` from.
        attenuation: rescale ``b_hat`` and its standard error by the dilution ratio ``r``
            (module docstring) before combining them with the prior.
    """
    z_members = as_member_values(member_log_values).numpy().astype(np.float64)  # K x N
    n_members, n = z_members.shape
    measured = as_bool_mask(measured, n, "measured")
    y = np.asarray(y, dtype=np.float64)
    n_obs = int(measured.sum())
    if y.shape != (n_obs,) or not np.isfinite(y).all():
        raise ValueError(f"y must hold one finite value per measured condition ({n_obs}), got {y.shape}")
    if n_obs == 0:
        raise ValueError("the anchor needs at least one measured condition (use a cold start first)")
    if not (max_weight >= 0 and min_points >= 3 and 0 <= prior_weight <= max_weight and prior_sd >= 0):
        raise ValueError(f"need 0 <= prior_weight <= max_weight, prior_sd >= 0 and min_points >= 3; got "
                         f"{prior_weight}, {max_weight}, {prior_sd}, {min_points}")
    if out_of_bag is None:
        out_of_bag = np.zeros((n_members, n_obs), dtype=bool)
    out_of_bag = np.asarray(out_of_bag, dtype=bool)
    if out_of_bag.shape != (n_members, n_obs):
        raise ValueError(f"out_of_bag must be {n_members} x {n_obs} (members x measured), got {out_of_bag.shape}")
    z = z_members.mean(axis=0)  # N
    z_measured = z_members[:, measured]  # K x n
    n_oob = out_of_bag.sum(axis=0)  # n
    has_oob = n_oob > 0
    z_oob = np.where(has_oob, (z_measured * out_of_bag).sum(axis=0) / np.maximum(n_oob, 1), z[measured])
    weight, ratio = prior_weight, 1.0
    if has_oob.sum() >= min_points and np.ptp(z_oob[has_oob]) > 0 and prior_sd > 0:
        ratio = dilution_ratio(z_members, measured, n_oob[has_oob]) if attenuation else 1.0
        weight = _posterior_slope(z_oob[has_oob], y[has_oob], prior_weight, prior_sd, scale=ratio)
    weight = float(np.clip(weight, 0.0, max_weight))
    fitted = has_oob if has_oob.any() else np.ones(n_obs, dtype=bool)
    intercept = float(np.mean(y[fitted] - weight * z_oob[fitted]))
    prior_mean = intercept + weight * z
    # out-of-sample residuals at measured conditions (where no member left one out: the in-bag
    # mean, whose residual looks smaller than an honest one would)
    prior_mean[measured] = intercept + weight * z_oob
    return Anchor(prior_mean=prior_mean, weight=weight, intercept=intercept, n_out_of_bag=int(has_oob.sum()),
                  dilution=float(ratio))


def spread_ratio(member_values: np.ndarray, measured: np.ndarray, y: np.ndarray) -> float:
    """``sd(y) / sd(z)`` over the measured conditions (``z``: the member mean of ``member_values: K x N``),
    1 when either is 0 or fewer than two conditions are measured.

    On the log scale the slope ``b`` is an elasticity, free of units. A linear objective is not: the
    virtual assay normalises its predicted profiles to its own generated control cells (single-cell
    sd units) while measured wells are robust z against the plate's DMSO wells, so the same phenotype
    scores on different scales. Multiplying the predictions by this ratio first puts ``b`` in
    measured sd per predicted sd, where ``b_0`` means what it does on the log scale."""
    measured = as_bool_mask(measured, member_values.shape[1], "measured")
    if measured.sum() < 2:
        return 1.0
    sd_z = float(member_values.mean(axis=0)[measured].std())
    sd_y = float(np.std(y))
    return sd_y / sd_z if sd_z > 0 and sd_y > 0 else 1.0


def on_prediction_scale(member_values: np.ndarray, observed: np.ndarray, *, log_scale: bool = True) -> np.ndarray:
    """Measured values ``n`` put on the scale of their own predictions ``K x n`` (members x the same
    measured conditions), so that one model can learn from both (the funnel's surrogate).

    Predicted and measured profiles are normalised in different units (:func:`spread_ratio`), so
    the measured values are moved and stretched until their mean and sd over the measured
    conditions match those of the member-mean predictions: on the log scale for activity (a
    positive distance; ``log_scale=True``), as they are for an objective. The ranking of the
    measured conditions is the lab's, whatever the model predicted for them. With fewer than two
    conditions, or no spread in either, only the mean is moved.

    Returns ``float64 n`` (activity: positive, like the predictions)."""
    z = as_member_values(member_values).numpy().astype(np.float64).mean(axis=0)  # n
    y = np.asarray(observed, dtype=np.float64)
    if y.shape != z.shape or not np.isfinite(y).all():
        raise ValueError(f"observed must hold one finite value per predicted condition ({len(z)}), got {y.shape}")
    if log_scale:
        z, y = log_activity(z), log_activity(y)
    spread = len(y) >= 2 and np.ptp(z) > 0 and np.ptp(y) > 0  # ptp: exactly 0 for equal values, unlike std
    scale = float(z.std()) / float(y.std()) if spread else 1.0
    on_scale = z.mean() + (y - y.mean()) * scale
    return np.exp(on_scale) if log_scale else on_scale


def dilution_ratio(member_log_values: np.ndarray, measured: np.ndarray, n_out_of_bag: np.ndarray) -> float:
    """``r = (v + s2 mean(1 / n_oob)) / (v + s2 / K)``: how much more member noise flattens the slope on
    an average of ``n_oob`` members than on the mean of all ``K`` (module docstring).

    ``member_log_values``: ``K x N``; ``measured``: ``N`` mask (``s2`` and ``v`` come from the other
    conditions, all of them when every condition is measured); ``n_out_of_bag``: ``>= 1`` per fitted
    measured condition."""
    n_members = member_log_values.shape[0]
    if n_members < 2:
        return 1.0
    pool = member_log_values[:, ~measured] if (~measured).sum() >= 2 else member_log_values
    noise_var = float(pool.var(axis=0, ddof=1).mean())  # s2: one member around the expected prediction
    signal_var = max(float(pool.mean(axis=0).var(ddof=1)) - noise_var / n_members, 0.0)  # v
    oob_noise = noise_var * float(np.mean(1.0 / np.asarray(n_out_of_bag, dtype=np.float64)))
    if signal_var + noise_var == 0:
        return 1.0
    return (signal_var + oob_noise) / (signal_var + noise_var / n_members)


def _posterior_slope(z: np.ndarray, y: np.ndarray, prior_weight: float, prior_sd: float,
                     scale: float = 1.0) -> float:
    """Posterior mean of the slope of ``y`` on ``z``: least squares (slope and standard error times
    ``scale``) combined with ``N(b_0, tau^2)``."""
    z_c, y_c = z - z.mean(), y - y.mean()
    s_zz = float(z_c @ z_c)
    slope = float(z_c @ y_c) / s_zz
    residual_var = float(((y_c - slope * z_c) ** 2).sum()) / (len(z) - 2)
    slope_var = max(residual_var / s_zz, 1e-12) * scale ** 2  # se^2 of the (rescaled) least-squares slope
    slope = slope * scale
    if np.isinf(prior_sd):
        return slope
    precision = 1.0 / prior_sd ** 2
    return (prior_weight * precision + slope / slope_var) / (precision + 1.0 / slope_var)


def anchored_ucb_batch(
    member_values: np.ndarray,
    fingerprints: np.ndarray,
    log10_dose: np.ndarray,
    measured: np.ndarray,
    activity: np.ndarray,
    q: int,
    *,
    out_of_bag: np.ndarray | None = None,
    pending: np.ndarray | None = None,
    beta: float = 1.0,
    prior_weight: float = 0.3,
    prior_sd: float = 0.2,
    max_weight: float = MAX_WEIGHT,
    attenuation: bool = False,
    log_scale: bool = True,
    scaffold_ids: np.ndarray | None = None,
    max_per_scaffold: int | None = None,
) -> AnchoredBatch:
    """``q`` unmeasured, non-pending conditions by believer-UCB on the anchored GP.

    Args:
        member_values: ``K x N`` predicted phenotypic activity (>= 0) of every condition,
            measured ones included (with ``log_scale=False``: any objective, e.g. similarity
            to a target phenotype, on its own scale).
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints.
        log10_dose: ``N`` log10 dose (uM).
        measured: ``N`` boolean mask of measured conditions (never picked).
        activity: measured phenotypic activity (or the objective), one per measured condition
            (index order).
        q: batch size.
        out_of_bag: ``K x n`` (members x measured) True where a member did not train on it.
        pending: ``N`` boolean mask of conditions in flight: never picked, believed first.
        beta: UCB weight of the GP posterior standard deviation.
        prior_weight, prior_sd: prior ``N(b_0, tau^2)`` of the ensemble's weight ``b``.
        max_weight: upper clip of the ensemble's weight ``b``.
        attenuation: correct the out-of-bag slope for regression dilution (:func:`fit_anchor`).
        log_scale: model log activity (activity is a positive distance with a long upper
            tail); False: the values as they are (an objective that can be negative), the
            predictions rescaled to the measured values' spread first (:func:`spread_ratio`).
        scaffold_ids: ``N`` integer scaffold ids, for ``max_per_scaffold``.
        max_per_scaffold: most picks per scaffold id, pending conditions counted (None: no cap;
            fewer than ``q`` picks when the cap closes every eligible condition).

    Returns:
        ``AnchoredBatch``: ``int64`` picks in order, their UCB (``mean + beta sd`` of log
        activity, or of the values, the sd conditioned on earlier picks), and the fitted ``Anchor``.
    """
    member_values = as_member_values(member_values).numpy().astype(np.float64)
    transform = log_activity if log_scale else np.asarray
    y = transform(np.asarray(activity, dtype=np.float64))
    z_members = transform(member_values)
    if not log_scale:
        z_members = z_members * spread_ratio(z_members, measured, y)
    anchor = fit_anchor(z_members, measured, y, out_of_bag, prior_weight=prior_weight,
                        prior_sd=prior_sd, max_weight=max_weight, attenuation=attenuation)
    picks, ucb = gp_ucb_scored(fingerprints, log10_dose, measured, y, q, beta=beta, prior_mean=anchor.prior_mean,
                               pending=pending, scaffold_ids=scaffold_ids, max_per_scaffold=max_per_scaffold)
    return AnchoredBatch(indices=picks, ucb=ucb, anchor=anchor)
