"""Public entry: choose the next batch of compounds to send to the lab.

``select_batch`` takes per-member objective values ``K x N`` (from cached virtual-assay
predictions, ``acquisition.objectives.member_objective_values``) and packed Morgan
fingerprints, and returns exactly ``q`` distinct candidate indices, never measured
(``exclude``) or in-flight (``pending``) ones:

1. exploitation, ``q - exploration_picks(exploration_fraction, q)`` picks (rounded half up): the configured
   acquisition's marginal joint gain until the joint value saturates (about ``K``
   picks), then its single-point value, multiplied by the Tanimoto penalty
   ``1 - diversity_penalty * max_sim`` to earlier picks and pending compounds and, given
   predicted profiles, by ``1 - phenotype_penalty * max_cos`` (cosine of predicted
   profiles; ``acquisition.diversity.penalized_greedy_select``);
2. exploration, the rest: member disagreement (``qPosteriorStandardDeviation``) with
   the same penalty, or MaxMin (``exploration_method='maxmin'``; also used when
   ``K == 1``, where members cannot disagree).

With ``diversity_penalty = 0`` and no scaffold cap the first picks (until the joint
acquisition saturates) are exactly those of ``acquisition.greedy.greedy_select`` /
BoTorch's ``optimize_acqf_discrete``.  ``qLogEI`` uses the ``qEI`` gains here (same
improvement utility) until saturation; after it both rank by BoTorch's smoothed
single-point improvement (``exp(qLogEI({i}))``, equal to EI where EI is positive), which
still orders the candidates with no improvement under any member, so the penalty acts
among them (``acquisition.diversity``).

``select_cold_start`` (no model yet) picks a seeded random sample (``random``, the default),
one seeded random compound from each of ``q`` coverage strata (``stratified``), a
representative subset of the library (``coverage``: greedy facility location on Tanimoto
similarity, ``acquisition.coverage``) or MaxMin, each compound at its top-priority (highest) dose.

The loop's default batch after the cold start is not ``select_batch`` but the ensemble
anchored on the measurements (``SelectionConfig.measurement_anchor``, ``acquisition.anchor``);
the caller (``loop.propose``, ``loop.simulation``) routes by that flag.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from torch import Tensor

from acquisition.anchor import MAX_WEIGHT
from acquisition.coverage import coverage_select
from acquisition.diversity import (
    check_fingerprints,
    check_priority,
    maxmin_select,
    penalized_greedy_select,
    tanimoto_matrix,
)
from acquisition.greedy import as_bool_mask, as_index_array, as_member_values, check_q

__all__ = ["COLD_START_METHODS", "SELECT_BATCH_FIELDS", "SELECTION_ACQUISITIONS", "Selection", "SelectionConfig",
           "select_batch", "select_cold_start"]

logger = logging.getLogger(__name__)

SELECTION_ACQUISITIONS = ("qUCB", "qEI", "qLogEI", "qPosteriorStandardDeviation", "thompson", "mean")
_EXPLORATION_METHODS = ("std", "maxmin")
COLD_START_METHODS = ("coverage", "maxmin", "random", "stratified")
SELECT_BATCH_FIELDS = ("acquisition", "beta", "diversity_penalty", "phenotype_penalty", "exploration_fraction",
                        "exploration_method")


_INTEGER_FIELDS = ("max_per_scaffold", "seed")
_REAL_FIELDS = ("beta", "diversity_penalty", "phenotype_penalty", "exploration_fraction", "anchor_beta",
                "anchor_prior_weight", "anchor_prior_sd")


def _check_numbers(config: "SelectionConfig") -> None:
    """Integer and real settings must be numbers (numpy's too, stored as Python ``int`` / ``float``):
    ValueError naming the setting otherwise (``"2"`` from a hand-edited campaign.json, ``1.5`` seeds)."""
    for name in _INTEGER_FIELDS + _REAL_FIELDS:
        value = getattr(config, name)
        if value is None and name == "max_per_scaffold":
            continue
        integral = name in _INTEGER_FIELDS
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                integral and not (math.isfinite(value) and value == int(value))):
            raise ValueError(f"{name} must be {'an integer' if integral else 'a number'}, got {value!r}")
        object.__setattr__(config, name, int(value) if integral else float(value))


@dataclass(frozen=True)
class SelectionConfig:
    """Options of one batch selection (saved with each proposal).

    Attributes:
        acquisition: one of ``SELECTION_ACQUISITIONS``.
        beta: qUCB exploration weight (``mu + sqrt(beta pi / 2) E|y - mu|``).
        diversity_penalty: Tanimoto penalty ``lambda`` in ``[0, 1]``.
        phenotype_penalty: predicted-profile cosine penalty ``mu`` in ``[0, 1]`` (used
            when ``select_batch`` gets ``profiles``).
        exploration_fraction: share of the batch picked for exploration, ``[0, 1]``.
        exploration_method: ``'std'`` (member disagreement) or ``'maxmin'``.
        max_per_scaffold: cap on picks per scaffold id (None: no cap).
        cold_start_method: batch without a model (``select_cold_start``): one of
            ``COLD_START_METHODS``.
        measurement_anchor: pick by believer-UCB on a GP over the measurements whose prior
            mean is the ensemble's prediction weighted by its out-of-bag skill
            (``acquisition.anchor``; the default). The fields above except
            ``max_per_scaffold``, ``cold_start_method`` and ``seed`` then do not apply: the
            GP's posterior variance, shrunk by each pick, spreads the batch. False:
            ``select_batch``.
        anchor_beta: UCB weight of the anchored GP's posterior standard deviation.
        anchor_prior_weight: prior mean ``b_0`` of the ensemble's weight in the anchored GP
            (a log-log slope; ``acquisition.anchor``).
        anchor_prior_sd: its prior standard deviation ``tau`` (``inf``: the out-of-bag
            least-squares slope alone; ``0``: the weight is ``anchor_prior_weight``).
        anchor_attenuation: correct that out-of-bag slope for regression dilution (one or
            two members' noise flattens it more than the K-member mean's; acquisition.anchor;
            off: no measured effect on the backtests).
        seed: seeds Thompson member order and MaxMin's first pick.
    """

    acquisition: str = "qUCB"
    beta: float = 2.0
    diversity_penalty: float = 0.5
    phenotype_penalty: float = 0.0
    exploration_fraction: float = 0.1
    exploration_method: str = "std"
    max_per_scaffold: int | None = None
    cold_start_method: str = "random"
    measurement_anchor: bool = True
    anchor_beta: float = 1.0
    anchor_prior_weight: float = 0.3
    anchor_prior_sd: float = 0.2
    anchor_attenuation: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self)  # a number written as text in campaign.json fails here, named
        if self.acquisition not in SELECTION_ACQUISITIONS:
            raise ValueError(f"unknown acquisition {self.acquisition!r}; valid names: "
                             f"{list(SELECTION_ACQUISITIONS)}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not self.anchor_beta >= 0:
            raise ValueError(f"anchor_beta must be >= 0, got {self.anchor_beta}")
        if not (0 <= self.anchor_prior_weight <= MAX_WEIGHT and self.anchor_prior_sd >= 0):
            raise ValueError(f"anchor_prior_weight must be in [0, {MAX_WEIGHT}] and anchor_prior_sd >= 0, got "
                             f"{self.anchor_prior_weight}, {self.anchor_prior_sd}")
        if not 0.0 <= self.diversity_penalty <= 1.0:
            raise ValueError(f"diversity_penalty must be in [0, 1], got {self.diversity_penalty}")
        if not 0.0 <= self.phenotype_penalty <= 1.0:
            raise ValueError(f"phenotype_penalty must be in [0, 1], got {self.phenotype_penalty}")
        if not 0.0 <= self.exploration_fraction <= 1.0:
            raise ValueError(f"exploration_fraction must be in [0, 1], got {self.exploration_fraction}")
        if self.exploration_method not in _EXPLORATION_METHODS:
            raise ValueError(f"exploration_method must be one of {_EXPLORATION_METHODS}, "
                             f"got {self.exploration_method!r}")
        if self.cold_start_method not in COLD_START_METHODS:
            raise ValueError(f"cold_start_method must be one of {COLD_START_METHODS}, "
                             f"got {self.cold_start_method!r}")
        if self.max_per_scaffold is not None and self.max_per_scaffold < 1:
            raise ValueError(f"max_per_scaffold must be >= 1 or None, got {self.max_per_scaffold}")
        if self.measurement_anchor:
            ignored = [f.name for f in fields(self) if f.name in SELECT_BATCH_FIELDS
                       and getattr(self, f.name) != f.default]
            if ignored:
                logger.warning("SelectionConfig: %s apply to select_batch only; the anchored loop "
                               "(measurement_anchor=True) ignores them", ", ".join(ignored))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    """A chosen batch: ``indices`` (int64, pick order), per-pick scores, diagnostics."""

    indices: np.ndarray
    acq_values: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _acquisition_params(config: SelectionConfig, best_f: float | None) -> tuple[str, dict[str, Any]]:
    acqf = "qEI" if config.acquisition == "qLogEI" else config.acquisition
    if acqf == "qUCB":
        return acqf, {"beta": config.beta}
    if acqf == "qEI":
        if best_f is None:
            raise ValueError(f"acquisition {config.acquisition!r} needs best_f (the incumbent objective value)")
        return acqf, {"best_f": float(best_f)}
    return acqf, {}


def _mean_pairwise_similarity(fps: np.ndarray) -> float:
    if len(fps) < 2:
        return float("nan")
    sims = tanimoto_matrix(fps, fps)
    upper = np.triu_indices(len(fps), k=1)
    return float(sims[upper].mean())


def select_batch(
    values: np.ndarray | Tensor,
    fingerprints: np.ndarray,
    q: int,
    config: SelectionConfig = SelectionConfig(),
    *,
    exclude: np.ndarray | None = None,
    pending: np.ndarray | None = None,
    scaffold_ids: np.ndarray | None = None,
    best_f: float | None = None,
    profiles: np.ndarray | Tensor | None = None,
) -> Selection:
    """Select ``q`` diverse candidates by acquisition over ensemble members.

    Args:
        values: ``K x N`` per-member objective values.
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints.
        q: batch size (> 0).
        config: ``SelectionConfig``.
        exclude: ``N`` boolean mask, True = already measured (never picked).
        pending: indices in flight (never picked; condition the acquisition).
        scaffold_ids: ``N`` integer scaffold ids, for ``config.max_per_scaffold``.
        best_f: the incumbent objective value, on the scale of ``member_values`` (qEI, qLogEI).
        profiles: ``K x N x F`` (or ``N x F``) predicted profiles; their member mean
            feeds ``config.phenotype_penalty`` (without them that penalty is off).

    Returns:
        ``Selection``: ``indices`` int64 ``(q,)`` distinct (fewer, with a warning, if
        fewer candidates are eligible), ``acq_values`` float64 per-pick penalised gain
        (exploration picks: penalised disagreement gain, or NaN for MaxMin picks),
        ``diagnostics`` (counts, rounds, phase per pick, mean pairwise Tanimoto, config).
    """
    q = check_q(q)
    values = as_member_values(values)
    n_members, n = values.shape
    fps = check_fingerprints(fingerprints, n)
    exclude = as_bool_mask(exclude, n, "exclude")
    pending = as_index_array(pending, n, "pending")
    if config.max_per_scaffold is not None and scaffold_ids is None:
        raise ValueError(f"max_per_scaffold={config.max_per_scaffold} needs scaffold_ids (one integer per candidate)")
    if scaffold_ids is not None:
        scaffold_ids = np.asarray(scaffold_ids)
        if scaffold_ids.shape != (n,) or not np.issubdtype(scaffold_ids.dtype, np.integer):
            raise ValueError(f"scaffold_ids must be an integer array of shape ({n},), "
                             f"got {scaffold_ids.dtype} {scaffold_ids.shape}")
    acqf, params = _acquisition_params(config, best_f)
    eligible = ~exclude
    eligible[pending] = False
    n_eligible = int(eligible.sum())
    n_explore = exploration_picks(config.exploration_fraction, q)
    mean_profiles = _mean_profiles(profiles, n_members, n) if config.phenotype_penalty > 0 else None
    phenotype_penalty = config.phenotype_penalty if mean_profiles is not None else 0.0
    common = dict(diversity_penalty=config.diversity_penalty, pending=pending,
                  scaffold_ids=scaffold_ids, max_per_scaffold=config.max_per_scaffold,
                  seed=config.seed, profiles=mean_profiles, phenotype_penalty=phenotype_penalty)

    exploit = penalized_greedy_select(values, fps, q - n_explore, acqf, params,
                                      eligible=eligible, **common)
    indices, scores = list(exploit.indices), list(exploit.scores)
    n_left = q - len(indices)
    explore_method = "maxmin" if (config.exploration_method == "maxmin" or n_members == 1) else "std"
    if n_left > 0 and explore_method == "std":
        explore = penalized_greedy_select(values, fps, n_left, "qPosteriorStandardDeviation", {},
                                          eligible=eligible, selected=indices, **common)
        indices += list(explore.indices)
        scores += list(explore.scores)
    elif n_left > 0:
        blocked = ~eligible
        blocked[indices] = True
        picks = _capped_maxmin(fps, n_left, config.seed, blocked, scaffold_ids,
                               config.max_per_scaffold, np.concatenate([pending, np.asarray(indices, dtype=np.int64)]))
        indices += list(picks)
        scores += [float("nan")] * len(picks)

    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) < q:
        message = (f"requested q={q} but only {len(indices)} candidates could be selected "
                   f"({n_eligible} eligible of {n})")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    n_exploit = len(exploit.indices)
    diagnostics = {
        "n_candidates": n,
        "n_members": n_members,
        "n_eligible": n_eligible,
        "n_exploit": n_exploit,
        "n_explore": len(indices) - n_exploit,
        "exploration_method": explore_method,
        "n_joint_exploit": exploit.n_joint,
        "phase": ["exploit"] * n_exploit + ["explore"] * (len(indices) - n_exploit),
        "mean_pairwise_tanimoto": _mean_pairwise_similarity(fps[indices]),
        "phenotype_penalty_applied": phenotype_penalty,
        "config": config.to_dict(),
    }
    return Selection(indices=indices, acq_values=np.asarray(scores, dtype=np.float64),
                     diagnostics=diagnostics)


def exploration_picks(fraction: float, q: int) -> int:
    """Exploration picks of a batch of ``q``: ``fraction * q`` rounded half up (0.5 of 3, 5 and 7
    -> 2, 3 and 4; Python's ``round`` would give 2, 2 and 4)."""
    return min(q, int(math.floor(fraction * q + 0.5 + 1e-9)))  # 0.35 * 90 is 31.499999...: still 32


def _mean_profiles(profiles: np.ndarray | Tensor | None, n_members: int, n: int) -> np.ndarray | None:
    """Member-mean predicted profiles ``N x F`` from ``K x N x F`` or ``N x F`` (None: none)."""
    if profiles is None:
        return None
    profiles = np.asarray(profiles.detach().cpu() if isinstance(profiles, Tensor) else profiles, dtype=np.float32)
    if profiles.ndim == 3 and profiles.shape[:2] == (n_members, n):
        profiles = profiles.mean(axis=0)
    if profiles.ndim != 2 or profiles.shape[0] != n or profiles.shape[1] == 0:
        raise ValueError(f"profiles must be K x N x F ({n_members} x {n} x F) or N x F, got {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise ValueError("profiles must be finite")
    return profiles


def _capped_maxmin(fps: np.ndarray, q: int, seed: int, blocked: np.ndarray,
                   scaffold_ids: np.ndarray | None, cap: int | None, counted: np.ndarray) -> list[int]:
    """MaxMin away from ``counted`` (the batch's earlier picks and the pending compounds), honouring
    the scaffold cap: re-run on open scaffolds until q or exhausted."""
    if scaffold_ids is None or cap is None:
        return maxmin_select(fps, q, seed, blocked, anchors=counted).tolist()
    blocked = blocked.copy()
    counts: dict[int, int] = {}
    for index in counted:
        counts[int(scaffold_ids[index])] = counts.get(int(scaffold_ids[index]), 0) + 1
    picks: list[int] = []
    while len(picks) < q:
        full = [key for key, count in counts.items() if count >= cap]
        candidates = maxmin_select(fps, q - len(picks), seed + len(picks),
                                   blocked | np.isin(scaffold_ids, full),
                                   anchors=np.concatenate([np.asarray(counted, np.int64), picks]).astype(np.int64))
        accepted = 0
        for index in candidates.tolist():
            key = int(scaffold_ids[index])
            if counts.get(key, 0) < cap:
                counts[key] = counts.get(key, 0) + 1
                picks.append(index)
                blocked[index] = True
                accepted += 1
        if accepted == 0:
            break
    return picks


def select_cold_start(
    fingerprints: np.ndarray,
    q: int,
    seed: int,
    exclude: np.ndarray | None = None,
    priority: np.ndarray | None = None,
    method: str = "random",
) -> Selection:
    """Cold start (no model): a representative (``coverage``), spread-out (``maxmin``) or
    random (``random``) batch.

    ``random`` is the default (``SelectionConfig.cold_start_method``). ``coverage`` is greedy facility location (``acquisition.coverage``): the
    picks that best cover the library by Tanimoto similarity, with the excluded (measured
    or in-flight) compounds counted as covered. ``maxmin`` maximises the smallest Tanimoto
    distance between picks, which favours the library's outliers. ``random`` is a seeded
    uniform sample of the eligible candidates; given ``priority``, only of those that lead
    their fingerprint group by it (each compound at its highest eligible dose: a primary
    screen; an empty fingerprint is a group of its own), topped up uniformly from the
    other eligible candidates when there are fewer than ``q`` of those. ``stratified``
    splits those leaders into ``q`` strata by their most similar ``coverage`` pick and draws
    one uniformly from each: representative like ``coverage``, but a different batch in
    every seed, and each stratum's central compound is no likelier than its others.

    Args:
        fingerprints: ``uint8 N x 256`` packed fingerprints.
        q: batch size (> 0).
        seed: seeds MaxMin's first pick, or the coverage pool of a library larger than
            ``acquisition.coverage.DEFAULT_MAX_POOL``.
        exclude: ``N`` boolean mask of candidates never to pick (measured or in flight).
        priority: ``N`` tie-breakers between identical fingerprints, highest first
            (``log10 dose`` when candidates are (compound, dose) conditions: a first look
            at a compound is at its highest dose, where a phenotype is most likely to show).
        method: one of ``COLD_START_METHODS``.
    """
    q = check_q(q)
    if method not in COLD_START_METHODS:
        raise ValueError(f"cold-start method must be one of {COLD_START_METHODS}, got {method!r}")
    fps = check_fingerprints(fingerprints)
    exclude = as_bool_mask(exclude, len(fps), "exclude")
    if method == "coverage":
        indices = coverage_select(fps, q, seed, exclude, priority, covered=np.flatnonzero(exclude))
    elif method == "random":
        indices = _random_leaders(fps, q, seed, exclude, check_priority(priority, len(fps)))
    elif method == "stratified":
        indices = _stratified_leaders(fps, q, seed, exclude, check_priority(priority, len(fps)))
    else:
        indices = maxmin_select(fps, q, seed, exclude, priority)
    if len(indices) < q:
        message = f"requested q={q} but only {len(indices)} candidates are eligible"
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
    return Selection(
        indices=indices,
        acq_values=np.full(len(indices), np.nan),
        diagnostics={"n_candidates": len(fps), "n_eligible": int((~exclude).sum()),
                     "method": method, "seed": seed,
                     "mean_pairwise_tanimoto": _mean_pairwise_similarity(fps[indices])},
    )


def _leaders(fps: np.ndarray, exclude: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
    """Eligible candidates with the top ``priority`` of their fingerprint (all eligible without one)."""
    eligible = np.flatnonzero(~exclude)
    if priority is None or len(eligible) == 0:
        return eligible
    _, group = np.unique(fps[eligible], axis=0, return_inverse=True)  # identical fingerprints
    group = group.ravel()
    empty = ~fps[eligible].any(axis=1)  # unparseable SMILES: not one compound, each its own group
    group[empty] = group.max() + 1 + np.arange(int(empty.sum()))
    best = np.full(group.max() + 1 if len(group) else 0, -np.inf)
    np.maximum.at(best, group, priority[eligible])
    return eligible[priority[eligible] == best[group]]


def _fill(picks: np.ndarray, q: int, exclude: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Top ``picks`` up to ``q`` with uniform picks from the other eligible candidates."""
    if len(picks) < q:
        rest = np.setdiff1d(np.flatnonzero(~exclude), picks)
        picks = np.concatenate([picks, rng.choice(rest, size=min(q - len(picks), len(rest)), replace=False)])
    return np.asarray(picks, dtype=np.int64)


def _random_leaders(fps: np.ndarray, q: int, seed: int, exclude: np.ndarray,
                    priority: np.ndarray | None) -> np.ndarray:
    """Seeded uniform picks among eligible candidates with the top ``priority`` of their fingerprint."""
    rng = np.random.default_rng(seed)
    leaders = _leaders(fps, exclude, priority)
    return _fill(rng.choice(leaders, size=min(q, len(leaders)), replace=False), q, exclude, rng)


def _stratified_leaders(fps: np.ndarray, q: int, seed: int, exclude: np.ndarray,
                        priority: np.ndarray | None, max_pool: int = 16_384, chunk: int = 8_192) -> np.ndarray:
    """One seeded uniform pick per coverage stratum: the ``q`` facility-location centres split the
    leaders (as in ``_random_leaders``; above ``max_pool`` a seeded uniform sample of them, which
    keeps the Tanimoto assignment at ``max_pool x q``) by their most similar centre."""
    rng = np.random.default_rng([seed, 13])
    centres = coverage_select(fps, q, seed, exclude, priority, covered=np.flatnonzero(exclude))
    leaders = _leaders(fps, exclude, priority)
    if len(leaders) > max(max_pool, q):
        leaders = np.sort(rng.choice(leaders, size=max(max_pool, q), replace=False))
    if len(centres) == 0 or len(leaders) == 0:
        return _fill(np.zeros(0, dtype=np.int64), q, exclude, rng)
    stratum = np.concatenate([tanimoto_matrix(fps[leaders[i:i + chunk]], fps[centres]).argmax(axis=1)
                              for i in range(0, len(leaders), chunk)])
    picks = [rng.choice(leaders[stratum == k]) if (stratum == k).any() else centre
             for k, centre in enumerate(centres)]
    return _fill(np.unique(picks), q, exclude, rng)
