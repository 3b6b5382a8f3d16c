"""Funnel: which candidates the virtual assay simulates before batch selection (10^3 - 10^6).

``funnel_predict`` returns candidate indices and their per-member activities ``K x n`` for
``acquisition.select.select_batch``:

* ``N_eligible <= config.simulate_all_max``: every eligible candidate is simulated;
* otherwise:
  1. simulate a uniform random sample of ``sample_size`` eligible candidates;
  2. train the fingerprint surrogate (``acquisition.surrogate``) on those member values
     (plus measured activities when given);
  3. prescreen the rest by surrogate UCB to ``shortlist_size`` candidates (when every simulated
     and measured value is the same, the surrogate has nothing to rank: the shortlist is then a
     uniform random draw from the rest, seeded by the funnel's ``seed``, with a warning);
  4. simulate the shortlist.
  Candidates = sample + shortlist (both carry exact virtual-assay values, so the random
  sample doubles as an unbiased exploration pool for ``select_batch``).

Pending compounds (in the lab, never picked) are always simulated and returned, with their
positions, so ``select_batch(pending=...)`` can still condition on them. Every simulation
goes through ``acquisition.prediction_cache.predict_with_cache``: a (model version, InChIKey,
dose, settings) simulated once is never simulated again. Sizes and per-stage seconds are
logged and returned in ``FunnelResult.diagnostics``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from acquisition.greedy import as_bool_mask, as_index_array
from acquisition.prediction_cache import PredictionCache, SimulationSettings, predict_with_cache
from acquisition.surrogate import SurrogateConfig, prescreen, train_surrogate
from models.virtual_assay import VirtualAssay, check_doses, check_fingerprints

log = logging.getLogger(__name__)

__all__ = ["FunnelConfig", "FunnelResult", "funnel_predict", "simulate_activity"]


@dataclass(frozen=True)
class FunnelConfig:
    """Sizes and simulation options of the funnel (saved with each proposal).

    Attributes:
        sample_size: random eligible candidates simulated to train the surrogate.
        shortlist_size: further candidates simulated, chosen by surrogate UCB.
        simulate_all_max: simulate every eligible candidate when there are at most this many.
        beta: surrogate UCB weight on the head standard deviation.
        surrogate: ``SurrogateConfig``.
        n_cells, plate_id, profile_dims: virtual-assay simulation settings (cache key).
        simulation_seed: assay sampling seed (cache key); None: the ``seed`` of the call. Fix it
            (e.g. the campaign seed) so that rounds with the same model version share the cache.
        batch_size: compounds per ``predict_profiles`` forward batch.
        chunk_size: compounds simulated and cached per step (local executor).
        executor: ``'local'`` or ``'ray'`` (``n_shards`` tasks via ``models.ray_executor``).
        ray_address: Ray cluster address (None: ``RAY_ADDRESS`` or a local cluster).
        surrogate_measurements: the caller trains the surrogate on the lab's measurements too
            (``loop.propose`` passes them as ``measured_fingerprints`` / ``measured_activity``);
            False: on simulated values alone (a benchmark's comparison).
    """

    sample_size: int = 10_000
    shortlist_size: int = 5_000
    simulate_all_max: int = 20_000
    beta: float = 2.0
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    n_cells: int = 32
    plate_id: str | None = None
    profile_dims: int | None = 0
    simulation_seed: int | None = None
    batch_size: int = 256
    chunk_size: int = 4096
    executor: str = "local"
    ray_address: str | None = None
    n_shards: int = 2
    surrogate_measurements: bool = True

    def __post_init__(self) -> None:
        for name in ("sample_size", "shortlist_size", "simulate_all_max", "batch_size", "chunk_size", "n_shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not isinstance(self.surrogate_measurements, bool):
            raise ValueError(f"surrogate_measurements must be true or false, got {self.surrogate_measurements!r}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.sample_size < 2:
            raise ValueError(f"sample_size must be >= 2 (the surrogate learns from the sample), got {self.sample_size}")
        if isinstance(self.surrogate, dict):  # from_dict / JSON round trip
            object.__setattr__(self, "surrogate", SurrogateConfig(**self.surrogate))
        if self.simulation_seed is not None and (isinstance(self.simulation_seed, bool)
                                                 or int(self.simulation_seed) != self.simulation_seed):
            raise ValueError(f"simulation_seed must be an integer or null, got {self.simulation_seed!r}")
        # n_cells, plate_id and profile_dims are checked as the cache will see them.
        SimulationSettings(n_cells=self.n_cells, seed=self.simulation_seed or 0, plate_id=self.plate_id,
                           profile_dims=self.profile_dims)

    def prescreens(self, n_eligible: int) -> bool:
        """Whether ``n_eligible`` candidates go through the surrogate (else all are simulated)."""
        return n_eligible > self.simulate_all_max

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FunnelConfig":
        return cls(**data)


@dataclass(frozen=True)
class FunnelResult:
    """Candidates for ``select_batch``.

    Attributes:
        indices: ``int64 n`` candidate indices into the funnel's inputs (ascending).
        values: ``float32 K x n`` per-member phenotypic activity of those candidates (or the
            ``objective`` given to ``funnel_predict``).
        profiles: ``float32 K x n x d`` kept profile dims (``config.profile_dims``) or None.
        pending: positions in ``indices`` of the pending compounds (``select_batch(pending=...)``).
        from_shortlist: ``bool n``, True where the candidate came from the surrogate shortlist
            (False: random sample, pending, or everything simulated).
        diagnostics: mode ('all' | 'funnel'), sizes, per-stage seconds, surrogate diagnostics, config;
            a funnel's shortlist: 'surrogate_ucb', or 'random' when the surrogate had nothing to rank.
    """

    indices: np.ndarray
    values: np.ndarray
    profiles: np.ndarray | None
    pending: np.ndarray
    from_shortlist: np.ndarray
    diagnostics: dict[str, Any]


def _simulate(assay, fingerprints, inchikeys, dose_um, config: FunnelConfig, cache, seed: int):
    simulation_seed = seed if config.simulation_seed is None else config.simulation_seed
    return predict_with_cache(assay, fingerprints, inchikeys, dose_um, cache, seed=simulation_seed,
                              n_cells=config.n_cells, plate_id=config.plate_id, profile_dims=config.profile_dims,
                              batch_size=config.batch_size, chunk_size=config.chunk_size, executor=config.executor,
                              ray_address=config.ray_address, n_shards=config.n_shards)


def simulate_activity(
    assay: VirtualAssay,
    fingerprints: np.ndarray,
    inchikeys: Sequence[str],
    dose_um: np.ndarray,
    *,
    config: FunnelConfig = FunnelConfig(),
    cache: PredictionCache | None = None,
    seed: int = 0,
    objective: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Per-member activity ``K x n`` of given compounds with the funnel's simulation settings
    (e.g. the measured compounds, whose predictions ``acquisition.anchor`` compares with the lab's),
    or the ``objective`` of their profiles (as in ``funnel_predict``)."""
    fingerprints = check_fingerprints(fingerprints)
    dose = check_doses(np.asarray(dose_um, dtype=np.float64), len(fingerprints))
    _check_objective_settings(objective, config)
    prediction = _simulate(assay, fingerprints, np.asarray(inchikeys, dtype=object), dose, config, cache, seed)
    return prediction.activity if objective is None else np.asarray(objective(prediction.profiles), np.float32)


def _check_objective_settings(objective, config: FunnelConfig) -> None:
    """An objective reads whole profiles, which the cache keeps only with ``profile_dims=None``."""
    if objective is not None and config.profile_dims is not None:
        raise ValueError(f"an objective needs whole simulated profiles (profile_dims=None), got "
                         f"profile_dims={config.profile_dims}")


def _random_shortlist(rest: np.ndarray, shortlist_size: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random shortlist of the candidates ``rest``: what the funnel shortlists when the
    surrogate's targets are all equal, its UCB then ranking by nothing but its initialisation."""
    k = min(shortlist_size, len(rest))
    log.warning("funnel: every simulated (and measured) value is the same, so the surrogate has nothing to rank; "
                "the shortlist is %d candidates drawn at random from the %d not yet simulated", k, len(rest))
    return np.sort(rng.choice(rest, size=k, replace=False)).astype(np.int64)


def funnel_predict(
    assay: VirtualAssay,
    fingerprints: np.ndarray,
    inchikeys: Sequence[str],
    dose_um: float | np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    pending: np.ndarray | None = None,
    measured_fingerprints: np.ndarray | None = None,
    measured_activity: np.ndarray | None = None,
    config: FunnelConfig = FunnelConfig(),
    cache: PredictionCache | None = None,
    seed: int = 0,
    objective: Callable[[np.ndarray], np.ndarray] | None = None,
    min_eligible: int = 0,
) -> FunnelResult:
    """Simulate the candidates worth selecting from (see module docstring).

    Args:
        assay: trained ``VirtualAssay`` (K members).
        fingerprints: ``uint8 N x 256`` packed Morgan fingerprints of all candidates.
        inchikeys: ``N`` InChIKeys (cache keys).
        dose_um: scalar or ``N`` doses (micromolar). The surrogate is dose-blind.
        exclude: ``N`` boolean mask of candidates never simulated or returned (e.g. measured).
        pending: indices in flight: simulated and returned, never counted as picks.
        measured_fingerprints, measured_activity: ``m x 256`` / ``m`` lab labels for the surrogate.
        config: ``FunnelConfig``.
        cache: ``PredictionCache`` (None: simulate without storing).
        seed: the funnel's sampling/training seed, and the simulation seed (common random numbers)
            unless ``config.simulation_seed`` is set.
        objective: maps simulated profiles ``K x n x F`` to the values ``K x n`` that replace
            phenotypic activity everywhere, the surrogate's targets and the returned
            ``values`` included (e.g. ``ObjectiveConfig.member_values`` with the assay's features);
            needs ``config.profile_dims=None``, and ``measured_activity`` is then in its units.
        min_eligible: the batch size the result must fill: a shortlist that would leave fewer
            eligible candidates than this (small ``sample_size + shortlist_size``) is enlarged to
            it, with a warning.

    Returns:
        ``FunnelResult``.
    """
    t_start = time.perf_counter()
    fingerprints = check_fingerprints(fingerprints)
    n = len(fingerprints)
    inchikeys = np.asarray(inchikeys, dtype=object)
    if inchikeys.shape != (n,):
        raise ValueError(f"inchikeys must have shape ({n},) to match the fingerprints, got {inchikeys.shape}")
    dose = np.asarray(dose_um, dtype=np.float64)
    dose = check_doses(np.full(n, float(dose)) if dose.ndim == 0 else dose, n)
    exclude = as_bool_mask(exclude, n, "exclude")
    pending = as_index_array(pending, n, "pending")
    eligible = ~exclude
    eligible[pending] = False
    eligible_idx = np.flatnonzero(eligible)
    sample_rng, surrogate_ss = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    _check_objective_settings(objective, config)

    def simulate(rows: np.ndarray):
        return _simulate(assay, fingerprints[rows], inchikeys[rows], dose[rows], config, cache, seed)

    def values_of(prediction) -> np.ndarray:  # K x n
        if objective is None or prediction.activity.shape[1] == 0:  # an empty shortlist has no profiles to score
            return prediction.activity
        return np.asarray(objective(prediction.profiles), dtype=np.float32)

    timings: dict[str, float] = {}
    diagnostics: dict[str, Any] = dict(n_candidates=n, n_eligible=len(eligible_idx), n_pending=len(pending),
                                       n_members=int(assay.n_members), config=config.to_dict())
    if not config.prescreens(len(eligible_idx)):
        rows = np.union1d(eligible_idx, pending)
        t0 = time.perf_counter()
        result = simulate(rows)
        timings["simulate_all_s"] = time.perf_counter() - t0
        diagnostics.update(mode="all", n_simulated=result.n_simulated, n_cached=result.n_cached)
        values, profiles = values_of(result), result.profiles
        from_shortlist = np.zeros(len(rows), dtype=bool)
    else:
        # 1. random sample (+ pending, simulated anyway)
        sample = sample_rng.choice(eligible_idx, size=min(config.sample_size, len(eligible_idx)), replace=False)
        first = np.union1d(sample, pending)
        t0 = time.perf_counter()
        first_pred = simulate(first)
        timings["simulate_sample_s"] = time.perf_counter() - t0
        # 2. surrogate on the simulated values (+ measured labels)
        t0 = time.perf_counter()
        surrogate, surrogate_diag = train_surrogate(
            fingerprints[first], values_of(first_pred), config=config.surrogate,
            seed=int(surrogate_ss.integers(2**62)), measured_fingerprints=measured_fingerprints,
            measured_activity=measured_activity)
        timings["train_surrogate_s"] = time.perf_counter() - t0
        # 3. prescreen everything not yet simulated
        t0 = time.perf_counter()
        blocked = ~eligible
        blocked[first] = True
        shortlist_size = config.shortlist_size
        if len(sample) + shortlist_size < min_eligible:
            shortlist_size = min_eligible - len(sample)
            log.warning("funnel: sample_size %d + shortlist_size %d is less than the %d picks asked for; "
                        "shortlisting %d instead", len(sample), config.shortlist_size, min_eligible, shortlist_size)
        if surrogate_diag["constant_targets"]:
            shortlist = _random_shortlist(np.flatnonzero(~blocked), shortlist_size, sample_rng)
        else:
            shortlist = prescreen(surrogate, fingerprints, shortlist_size, beta=config.beta, exclude=blocked,
                                  batch_size=config.surrogate.inference_batch_size)
        timings["prescreen_s"] = time.perf_counter() - t0
        # 4. simulate the shortlist
        t0 = time.perf_counter()
        short_pred = simulate(shortlist)
        timings["simulate_shortlist_s"] = time.perf_counter() - t0
        rows = np.concatenate([first, shortlist])
        order = np.argsort(rows)
        rows = rows[order]
        from_shortlist = (np.arange(len(order)) >= len(first))[order]
        values = np.concatenate([values_of(first_pred), values_of(short_pred)], axis=1)[:, order]
        profiles = None
        if first_pred.profiles is not None:
            profiles = np.concatenate([first_pred.profiles, short_pred.profiles], axis=1)[:, order]
        diagnostics.update(mode="funnel", n_sample=len(sample), n_shortlist=len(shortlist),
                           shortlist="random" if surrogate_diag["constant_targets"] else "surrogate_ucb",
                           n_simulated=first_pred.n_simulated + short_pred.n_simulated,
                           n_cached=first_pred.n_cached + short_pred.n_cached, surrogate=surrogate_diag)
    timings["total_s"] = time.perf_counter() - t_start
    diagnostics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    diagnostics["n_returned"] = len(rows)
    log.info("funnel (%s): %d candidates, %d eligible, %d pending -> %d returned (%d simulated, %d cached); %s",
             diagnostics["mode"], n, len(eligible_idx), len(pending), len(rows), diagnostics["n_simulated"],
             diagnostics["n_cached"], ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return FunnelResult(indices=rows.astype(np.int64), values=values, profiles=profiles,
                        pending=np.searchsorted(rows, pending).astype(np.int64), from_shortlist=from_shortlist,
                        diagnostics=diagnostics)
