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
    b, a    = least-squares slope of y on z_oob clipped to [0, max_weight], and the intercept
              given b, over the measured conditions with an out-of-bag member
    m(x)    = a + b z(x)                                             the GP's prior mean

Members train on bootstrap resamples of the measured compounds (``FeatureAssayConfig.bootstrap``),
so about a third of the members never saw a given measured condition: their prediction of it
is an honest test. ``b = 0`` (no skill shown, fewer than ``min_points`` out-of-bag
predictions, or a negative slope) leaves the measurement-only GP; ``b > 0`` adds the
ensemble where it has shown skill. The GP then models the residuals ``y - m`` (at measured
conditions ``m`` uses ``z_oob`` where some member left the condition out, so those residuals
are out-of-sample too), which corrects the
prior mean near measured conditions and gives the posterior standard deviation for UCB.

Log activity because activity is a positive distance (about 1 for a control-like condition)
with a long upper tail: on the log scale a hit's neighbours are not swamped by its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acquisition.greedy import as_bool_mask, as_member_values
from acquisition.tanimoto_gp import gp_ucb_batch

__all__ = ["Anchor", "anchored_ucb_batch", "fit_anchor", "log_activity"]

ACTIVITY_FLOOR = 1e-6


@dataclass(frozen=True)
class Anchor:
    """The GP's prior mean ``N`` and how it was fitted."""

    prior_mean: np.ndarray
    weight: float  # b: trust in the ensemble (0 = measurement-only GP)
    intercept: float  # a
    n_out_of_bag: int  # measured conditions with at least one out-of-bag member prediction


def log_activity(activity: np.ndarray) -> np.ndarray:
    """Log of phenotypic activity, floored at ``1e-6`` (activity is a distance, >= 0)."""
    return np.log(np.maximum(np.asarray(activity, dtype=np.float64), ACTIVITY_FLOOR))


def fit_anchor(
    member_log_values: np.ndarray,
    measured: np.ndarray,
    y: np.ndarray,
    out_of_bag: np.ndarray | None,
    *,
    max_weight: float = 3.0,
    min_points: int = 3,
) -> Anchor:
    """Prior mean ``a + b z`` from the out-of-bag fit of measured ``y`` on member predictions.

    Args:
        member_log_values: ``K x N`` per-member log predicted activity of every condition.
        measured: ``N`` boolean mask of measured conditions.
        y: measured log activity, one per measured condition (index order).
        out_of_bag: ``K x n`` boolean, True where member ``k`` did not train on measured
            condition ``i``; None: no member is out of bag (then ``b = 0``).
        max_weight: upper clip of ``b`` (the ensemble's predictions are shrunk towards
            controls, so a skilled ensemble can fit with ``b > 1``).
        min_points: fewest out-of-bag measured conditions to fit ``b`` from.
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
    if not (max_weight >= 0 and min_points >= 2):
        raise ValueError(f"need max_weight >= 0 and min_points >= 2; got {max_weight}, {min_points}")
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
    weight = 0.0
    if has_oob.sum() >= min_points and np.ptp(z_oob[has_oob]) > 0:
        slope = np.polyfit(z_oob[has_oob], y[has_oob], 1)[0]
        weight = float(np.clip(slope, 0.0, max_weight))
    fitted = has_oob if has_oob.any() else np.ones(n_obs, dtype=bool)
    intercept = float(np.mean(y[fitted] - weight * z_oob[fitted]))
    prior_mean = intercept + weight * z
    prior_mean[measured] = intercept + weight * z_oob  # out-of-sample residuals at measured conditions
    return Anchor(prior_mean=prior_mean, weight=weight, intercept=intercept, n_out_of_bag=int(has_oob.sum()))


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
    max_weight: float = 3.0,
) -> tuple[np.ndarray, Anchor]:
    """``q`` unmeasured, non-pending conditions by believer-UCB on the anchored GP.

    Args:
        member_values: ``K x N`` predicted phenotypic activity (>= 0) of every condition,
            measured ones included.
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints.
        log10_dose: ``N`` log10 dose (uM).
        measured: ``N`` boolean mask of measured conditions (never picked).
        activity: measured phenotypic activity, one per measured condition (index order).
        q: batch size.
        out_of_bag: ``K x n`` (members x measured) True where a member did not train on it.
        pending: ``N`` boolean mask of conditions in flight: never picked, believed first.
        beta: UCB weight of the GP posterior standard deviation.
        max_weight: upper clip of the ensemble's weight ``b``.

    Returns:
        ``int64`` picks in order, and the fitted ``Anchor``.
    """
    member_log_values = log_activity(as_member_values(member_values).numpy())
    y = log_activity(activity)
    anchor = fit_anchor(member_log_values, measured, y, out_of_bag, max_weight=max_weight)
    picks = gp_ucb_batch(fingerprints, log10_dose, measured, y, q, beta=beta, prior_mean=anchor.prior_mean,
                         pending=pending)
    return picks, anchor
