"""A lab replaced by a lookup table of real measured profiles (``loop backtest --profiles``).

Candidates are the (compound, dose) conditions of a pycytominer-style profile table that
have a SMILES. "Running" a condition reveals its real wells. Profiles are normalised per
plate to the plate's control wells (robust z, ``lab_io.profiles.normalize_to_controls``)
over the table's usable features (``feature_select``: at most 5% of the wells missing, not
constant, no bookkeeping; the few missing values left are set to the plate's control median).
Treated wells without a SMILES, with one RDKit cannot parse, or without a positive dose are
skipped and counted; a compound listed with different structures takes its most frequent one
(logged).
A condition's activity is ``phenotypic_activity`` of the mean normalised profile of its wells:
the RMS of its robust z over the usable features, each z clipped to +-10 (``ACTIVITY_CLIP_Z``;
with a handful of control wells a plate's MADs are small and unclipped z of a few features
would decide the ranking), so a control-like condition scores about 1. A **hit** is a treated
condition in the top 10% of activity among *all* the table's treated (compound, dose)
conditions (on plates with at least two control wells, which a robust z needs), those skipped
as candidates (no usable SMILES or dose) included: their hits
(``n_hits_unreachable``) count in every hit fraction's denominator and can never be found, so
the fraction is of all hits in the table. Conditions tied at the threshold are all hits (a
warning names how many tie). Wells are read in (plate, well) order, so the file's row order
changes nothing.

Each round, a policy picks ``batch_size`` conditions:
  - ``random``: uniformly at random;
  - ``diversity_only``: the cold-start selection every round, no model (default: a
    representative subset by greedy facility location on Morgan fingerprints, measured
    conditions counted as covered; ``acquisition.coverage``);
  - ``greedy_mean``: the virtual assay's mean predicted activity, top-k (no diversity);
  - ``loop``: the default proposal policy: believer-UCB on a GP over the measured conditions
    whose prior mean is the virtual assay's predicted log activity, weighted by how well the
    members predicted the measured conditions their bootstrap left out (``acquisition.anchor``);
    with ``selection={"measurement_anchor": False}`` the ensemble-only ``select_batch`` (qUCB
    over the members with a Tanimoto penalty and an exploration fraction);
  - ``gp_ucb``: a reference without a virtual assay: the loop's cold start, then believer-UCB
    on a GP of measured log activity (Tanimoto x log-dose kernel, fixed hyperparameters, beta 1;
    ``acquisition.tanimoto_gp``; ignores ``selection`` and the seed after round 1). It shows
    whether the virtual assay beats a plain small-data optimiser on this table;
  - ``random_top_dose``: a reference without a model: the random cold start every round (a seeded
    random sample of the compounds, each at its highest dose not yet measured). Round 1 of the model
    policies is this batch, so it separates what the top-dose rule finds from what the model adds.
Round 1 of the model-based policies is the cold-start batch (no data yet), which takes
each compound at its highest dose (identical fingerprints tie; ``log10 dose`` breaks the tie).
By default it is a seeded random sample of those (``SelectionConfig.cold_start_method``,
``loop backtest --cold-start``), different in every seed. The ``coverage`` cold start is
deterministic for tables up to ``DEFAULT_MAX_POOL`` conditions, so all seeds would share
round 1 and each table would be one bet (it was the default until that bet was measured to
lose on 3 of 10 tables); ``stratified`` draws one compound per coverage stratum.
``diversity_only`` runs the cold start every round, with coverage unless ``maxmin``.
Between rounds the virtual assay is retrained on every revealed well plus all control wells
(which a lab measures on every plate), each well profile playing the part of one cell; a
profile table has many more control wells than revealed ones, so half of each training batch
is drawn from the controls and half from the revealed wells (``control_fraction=0.5``). Well
profiles are modelled in linear control units (``feature_transform='none'``): the asinh
squashing that single cells need made the BBBC021 backtest worse (loop 0.17 of the hits after
round 3 in two of the first four seeds, against 0.67 and 0.83 in linear units).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from acquisition.anchor import anchored_ucb_batch, log_activity
from acquisition.objectives import phenotypic_activity as member_activity
from acquisition.select import SelectionConfig, select_batch, select_cold_start
from acquisition.tanimoto_gp import gp_ucb_batch
from lab_io import chem
from lab_io import profiles as profiling
from lab_io.profile_table import ProfileTable
from lab_io.schema import CONTROL_COMPOUND_ID, META_COMPOUND, META_DOSE, META_PLATE, META_SMILES, META_WELL
from loop.propose import POLICY_SELECTION, diversity_method
from models.config import FeatureAssayConfig, config_hash
from models.ensemble import train_ensemble
from models.training_data import FeatureTrainingSet

log = logging.getLogger(__name__)

HIT_QUANTILE = 0.90
ACTIVITY_CLIP_Z = 10.0  # robust z clipped to +-10 in a condition's activity (lab_io.profiles.phenotypic_activity)
MAX_MISSING_FRACTION = 0.05  # a feature missing in more wells is dropped (pycytominer's drop_na_columns cutoff)
LOOKUP_POLICIES = ("loop", "random", "greedy_mean", "diversity_only", "gp_ucb", "random_top_dose")


@dataclass(frozen=True)
class LookupBacktestConfig:
    n_rounds: int = 3
    batch_size: int = 8
    n_seeds: int = 5
    policies: tuple[str, ...] = LOOKUP_POLICIES
    control_label: str = "DMSO"
    assay: dict = field(default_factory=lambda: dict(n_members=5, n_steps=400, hidden_dim=128, batch_size=128,
                                                     p_drop_plate=0.5, control_fraction=0.5,
                                                     feature_transform="none"))
    selection: dict = field(default_factory=dict)
    n_predict_cells: int = 16


@dataclass(frozen=True)
class LookupLab:
    """Conditions, their wells (normalised) and the hidden hit labels."""

    conditions: pd.DataFrame  # compound, smiles, dose_um, activity, is_hit
    fingerprints: np.ndarray  # uint8 n_conditions x 256
    wells: pd.DataFrame  # normalised well profiles with Metadata_condition (-1 for controls)
    features: list[str]
    n_skipped_no_smiles: int
    n_skipped_no_dose: int = 0
    n_skipped_bad_smiles: int = 0
    n_skipped_no_controls: int = 0  # treated wells on plates with fewer than two control wells
    n_hits_unreachable: int = 0  # hits among the conditions skipped as candidates (no usable SMILES or dose)
    n_tied_at_threshold: int = 0  # conditions whose activity equals the hit threshold (all are hits)

    @property
    def log10_dose(self) -> np.ndarray:
        """``N`` log10 dose (uM) of every condition: the cold start's priority, the GP's dose input."""
        return np.log10(self.conditions[META_DOSE].to_numpy(dtype=float))

    @property
    def n_hits(self) -> int:
        """Every hit of the table: the candidates' and those of the skipped conditions."""
        return int(self.conditions["is_hit"].sum()) + self.n_hits_unreachable


def build_lookup_lab(table: ProfileTable, control_label: str = "DMSO") -> LookupLab:
    frame = table.frame.sort_values([META_PLATE, META_WELL], kind="stable").reset_index(drop=True)
    is_control = (frame[META_COMPOUND].astype(str) == control_label).to_numpy()
    if not is_control.any():
        raise ValueError(f"{table.source}: no control wells ({META_COMPOUND} == {control_label!r})")
    n_controls = frame.loc[is_control, META_PLATE].value_counts()
    plates_without = sorted(p for p in set(frame[META_PLATE]) if n_controls.get(p, 0) < 2)
    n_skipped_plates = int((frame[META_PLATE].isin(plates_without).to_numpy() & ~is_control).sum())
    if plates_without:  # a robust z needs the spread of at least two control wells
        log.warning("%s: %d plate(s) with fewer than two %s wells are dropped, with their %d treated well(s): %s",
                    table.source, len(plates_without), control_label, n_skipped_plates,
                    ", ".join(map(str, plates_without[:5])))
        keep = ~frame[META_PLATE].isin(plates_without).to_numpy()
        if not keep.any():
            raise ValueError(f"{table.source}: every plate has fewer than two {control_label} wells; the robust z "
                             f"of a plate needs the spread of at least two (plates: "
                             f"{', '.join(map(str, plates_without[:5]))})")
        frame, is_control = frame[keep].reset_index(drop=True), is_control[keep]
    features = profiling.feature_select(frame, table.features, max_nonfinite_fraction=MAX_MISSING_FRACTION)
    if not features:
        raise ValueError(f"{table.source}: no usable feature column (each is constant or more than "
                         f"{MAX_MISSING_FRACTION:.0%} missing)")
    normalized = profiling.normalize_to_controls(frame, is_control, features=features)
    missing = ~np.isfinite(normalized[features].to_numpy(dtype=float))
    if missing.any():  # missing values, or a plate's controls without spread: the plate's control centre (z = 0)
        log.warning("%s: %d feature value(s) in %d well(s) missing, or of a feature their plate's controls do "
                    "not vary in, set to their plate's control median",
                    table.source, int(missing.sum()), int(missing.any(axis=1).sum()))
        normalized[features] = normalized[features].fillna(0.0).replace([np.inf, -np.inf], 0.0)
    smiles = frame[META_SMILES].fillna("").astype(str).str.strip()
    treated = ~is_control
    no_smiles = treated & (smiles == "").to_numpy()
    n_skipped = int(no_smiles.sum())
    if n_skipped:
        log.info("%s: %d treated wells without SMILES skipped", table.source, n_skipped)
    canonical, fingerprint_of = _parse_smiles(table.source, frame, treated & ~no_smiles, smiles)
    bad_smiles = treated & ~no_smiles & canonical.isna().to_numpy()
    n_skipped_bad = int(bad_smiles.sum())
    dose = frame[META_DOSE].to_numpy(dtype=float)
    no_dose = treated & ~no_smiles & ~bad_smiles & ~(np.isfinite(dose) & (dose > 0))
    n_skipped_dose = int(no_dose.sum())
    if n_skipped_dose:
        first = np.flatnonzero(no_dose)[0]
        log.warning("%s: %d treated wells with SMILES but no positive %s skipped (first: plate %s well %s)",
                    table.source, n_skipped_dose, META_DOSE, frame[META_PLATE].iloc[first],
                    frame[META_WELL].iloc[first])
    usable = treated & ~no_smiles & ~bad_smiles & ~no_dose
    if not usable.any():
        raise ValueError(f"{table.source}: no treated well has a parseable SMILES and a positive {META_DOSE} "
                         f"({n_skipped} without SMILES, {n_skipped_bad} unparseable, {n_skipped_dose} without a dose)")
    compound_smiles = _one_smiles_per_compound(table.source, frame[usable], canonical[usable])
    keys = frame.loc[usable, [META_COMPOUND, META_DOSE]].astype({META_DOSE: float})
    conditions = (keys.drop_duplicates([META_COMPOUND, META_DOSE]).sort_values([META_COMPOUND, META_DOSE])
                  .reset_index(drop=True))
    conditions["smiles"] = conditions[META_COMPOUND].map(compound_smiles)
    if len(conditions) < 2:
        raise ValueError(f"{table.source}: fewer than 2 treated (compound, dose) conditions with SMILES")
    index = {(c, d): i for i, (c, d) in enumerate(zip(conditions[META_COMPOUND], conditions[META_DOSE]))}
    condition = np.full(len(frame), -1, dtype=np.int64)
    condition[usable] = [index[(c, float(d))] for c, d in keys.itertuples(index=False)]
    normalized = normalized.copy()  # consolidated: adding a column to a fragmented frame warns
    normalized["Metadata_condition"] = condition
    wells = normalized[(condition >= 0) | is_control].reset_index(drop=True)
    z = wells.loc[wells["Metadata_condition"] >= 0].groupby("Metadata_condition")[features].mean()
    activity = profiling.phenotypic_activity(z.to_numpy(), None, clip=ACTIVITY_CLIP_Z)
    if np.ptp(activity) == 0:  # e.g. no feature varies across any plate's controls: every z is 0
        raise ValueError(f"{table.source}: every condition has the same phenotypic activity ({activity[0]:.3g}); "
                         f"no feature varies across the {control_label} wells of a plate, so no hit can be defined")
    conditions["activity"] = activity[np.argsort(z.index.to_numpy())]
    unreachable = _unreachable_activity(normalized, treated & ~usable, set(index), features)
    every = np.concatenate([conditions["activity"].to_numpy(), unreachable])
    threshold = np.quantile(every, HIT_QUANTILE)
    conditions["is_hit"] = conditions["activity"] >= threshold
    n_tied = int((every == threshold).sum())
    if n_tied > 1:
        log.warning("%s: %d conditions tie at the hit threshold (activity %.4g); all count as hits, %d in all",
                    table.source, n_tied, threshold, int((every >= threshold).sum()))
    fingerprints = np.stack([fingerprint_of[s] for s in conditions["smiles"]])
    return LookupLab(conditions=conditions, fingerprints=fingerprints, wells=wells, features=features,
                     n_skipped_no_smiles=n_skipped, n_skipped_no_dose=n_skipped_dose,
                     n_skipped_bad_smiles=n_skipped_bad, n_skipped_no_controls=n_skipped_plates,
                     n_hits_unreachable=int((unreachable >= threshold).sum()), n_tied_at_threshold=n_tied)


def _unreachable_activity(normalized: pd.DataFrame, skipped: np.ndarray, candidates: set, features: list[str]
                          ) -> np.ndarray:
    """Activity of each treated (compound, dose) condition that is no candidate (its wells lack a
    usable SMILES or dose; a missing dose is a condition of its own): it counts towards the hit
    threshold and, when a hit, towards the hits no policy can find."""
    wells = normalized.loc[skipped, [META_COMPOUND, META_DOSE, *features]]
    if wells.empty:
        return np.zeros(0)
    wells = wells.assign(**{META_DOSE: pd.to_numeric(wells[META_DOSE], errors="coerce")})
    z = wells.groupby([META_COMPOUND, META_DOSE], dropna=False)[features].mean()
    keep = [(c, float(d)) not in candidates for c, d in z.index]
    return profiling.phenotypic_activity(z.to_numpy()[keep], None, clip=ACTIVITY_CLIP_Z)


def _parse_smiles(source: str, frame: pd.DataFrame, rows: np.ndarray, smiles: pd.Series
                  ) -> tuple[pd.Series, dict[str, np.ndarray]]:
    """Standardised canonical SMILES of every row in ``rows`` (NaN elsewhere and where RDKit cannot
    parse it) and the packed fingerprint of each canonical SMILES. Unparseable SMILES are logged
    with their compound and first plate / well; their wells are skipped by the caller."""
    unique = sorted(set(smiles[rows]))
    parsed = chem.featurize_smiles(unique, n_jobs=1)
    canonical_of = {s: c for s, c in zip(unique, parsed.smiles) if c is not None}
    fingerprint_of = {c: parsed.fingerprints[i] for i, c in enumerate(parsed.smiles) if c is not None}
    canonical = pd.Series(np.nan, index=frame.index, dtype=object)
    canonical[rows] = smiles[rows].map(canonical_of)
    bad = rows & canonical.isna().to_numpy()
    if bad.any():
        names = frame.loc[bad, META_COMPOUND].astype(str).unique().tolist()
        first = np.flatnonzero(bad)[0]
        log.warning("%s: %d treated well(s) of %d compound(s) with a SMILES RDKit cannot parse skipped: %s "
                    "(first: plate %s well %s, SMILES %r)", source, int(bad.sum()), len(names),
                    ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""), frame[META_PLATE].iloc[first],
                    frame[META_WELL].iloc[first], smiles.iloc[first])
    return canonical, fingerprint_of


def _one_smiles_per_compound(source: str, frame: pd.DataFrame, canonical: pd.Series) -> dict[str, str]:
    """compound -> its canonical SMILES. A compound whose wells carry different structures (after
    standardisation, so salt forms agree) is logged with each SMILES and a plate / well of it, and
    takes its most frequent SMILES (the first listed on a tie) for every dose."""
    out = {}
    table = pd.DataFrame({"compound": frame[META_COMPOUND].to_numpy(), "smiles": canonical.to_numpy(),
                          "plate": frame[META_PLATE].to_numpy(), "well": frame[META_WELL].to_numpy()})
    for name, group in table.groupby("compound", sort=False):
        counts = group["smiles"].value_counts(sort=False)  # in order of first appearance
        chosen = max(counts.items(), key=lambda item: item[1])[0]  # max keeps the first of equal counts
        out[name] = chosen
        if len(counts) > 1:
            where = "; ".join(f"{s} ({n} well(s), e.g. plate {group.loc[group.smiles == s, 'plate'].iloc[0]} well "
                              f"{group.loc[group.smiles == s, 'well'].iloc[0]})" for s, n in counts.items())
            log.warning("%s: compound %s has %d different structures: %s; using %s for all its wells",
                        source, name, len(counts), where, chosen)
    return out


def _training_cells(lab: LookupLab, measured: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Revealed wells + every control well, as a single-'cell' table for the feature assay."""
    cond = lab.wells["Metadata_condition"].to_numpy()
    keep = (cond < 0) | np.isin(cond, np.flatnonzero(measured))
    cells = lab.wells.loc[keep, [META_PLATE, "Metadata_Well", *lab.features]].copy()
    cid = np.where(cond[keep] < 0, CONTROL_COMPOUND_ID, np.char.add("cond-", cond[keep].astype(str)))
    cells[META_COMPOUND] = cid
    doses = lab.conditions[META_DOSE].to_numpy()
    cells[META_DOSE] = np.where(cond[keep] < 0, 0.0, doses[np.maximum(cond[keep], 0)])
    lookup = {f"cond-{i}": lab.fingerprints[i] for i in np.flatnonzero(measured)}
    return cells, lookup


def predict_conditions(lab: LookupLab, measured: np.ndarray, config: LookupBacktestConfig, seed: int,
                       work_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train the virtual assay on the ``measured`` conditions' wells (plus every control well) and
    return per-member activity ``K x N`` and predicted profiles ``K x N x F`` (``lab.features``) of
    every condition, and ``K x n`` True where a member's bootstrap left measured condition ``i``'s
    compound out."""
    cells, lookup = _training_cells(lab, measured)
    train_set = FeatureTrainingSet.from_dataframe(cells, lookup, seed=seed, feature_names=lab.features,
                                                  normalization="standard", source="profile table")
    assay_config = FeatureAssayConfig(**{**config.assay, "base_seed": seed})
    version = config_hash(assay_config, train_set.data_fingerprint)  # same data and options -> reuse
    ensemble = train_ensemble(train_set, assay_config, work_dir / f"model-{version}")
    profiles = ensemble.predict_profiles(lab.fingerprints, lab.conditions[META_DOSE].to_numpy(),
                                         n_cells=config.n_predict_cells, seed=seed)
    return member_activity(torch.from_numpy(profiles)).numpy(), profiles, _compound_out_of_bag(lab, measured, ensemble)


def _compound_out_of_bag(lab: LookupLab, measured: np.ndarray, ensemble) -> np.ndarray:
    """``K x n``: member ``k`` left out every measured condition of condition ``i``'s compound.

    Members bootstrap conditions (the training unit here), but a member that left out one dose
    of a compound and trained on another has seen that compound: its prediction is not out of
    sample, so a condition counts as out of bag only when its whole compound was left out."""
    index = np.flatnonzero(measured)
    left_out = ensemble.out_of_bag([f"cond-{i}" for i in index])  # K x n, per condition
    compound = lab.conditions[META_COMPOUND].to_numpy()[index]
    out = left_out.copy()
    for name in np.unique(compound):
        rows = compound == name
        out[:, rows] = left_out[:, rows].all(axis=1, keepdims=True)
    return out


def _pick(policy: str, lab: LookupLab, measured: np.ndarray, q: int, config: LookupBacktestConfig, seed: int,
          work_dir: Path, rng: np.random.Generator) -> np.ndarray:
    eligible = np.flatnonzero(~measured)
    q = min(q, len(eligible))
    if q == 0:  # every condition of the table is measured: nothing left to pick
        return np.zeros(0, dtype=np.int64)
    if policy == "random":
        return rng.choice(eligible, size=q, replace=False)
    if policy == "random_top_dose":  # the random cold start every round: round 1's top-dose rule without a model
        return select_cold_start(lab.fingerprints, q, seed=seed, exclude=measured, priority=lab.log10_dose,
                                 method="random").indices
    selection_config = SelectionConfig(**{**config.selection, **POLICY_SELECTION.get(policy, {}), "seed": seed})
    if policy == "diversity_only" or not measured.any():
        method = selection_config.cold_start_method  # log10 dose as priority: a compound's first look, top dose
        return select_cold_start(lab.fingerprints, q, seed=seed, exclude=measured, priority=lab.log10_dose,
                                 method=diversity_method(method) if policy == "diversity_only" else method).indices
    activity = lab.conditions["activity"].to_numpy()[measured]
    if policy == "gp_ucb":
        return gp_ucb_batch(lab.fingerprints, lab.log10_dose, measured, log_activity(activity), q)
    values, profiles, out_of_bag = predict_conditions(lab, measured, config, seed, work_dir)
    scaffold_ids = None
    if selection_config.max_per_scaffold is not None:  # unparseable SMILES: a scaffold of their own
        scaffold_ids = chem.murcko_scaffold_ids(lab.conditions["smiles"].tolist(), strict=False)
    if selection_config.measurement_anchor:  # the cap counts conditions, as select_batch's does
        batch = anchored_ucb_batch(values, lab.fingerprints, lab.log10_dose, measured, activity, q,
                                   out_of_bag=out_of_bag, beta=selection_config.anchor_beta,
                                   prior_weight=selection_config.anchor_prior_weight,
                                   prior_sd=selection_config.anchor_prior_sd,
                                   attenuation=selection_config.anchor_attenuation,
                                   scaffold_ids=scaffold_ids, max_per_scaffold=selection_config.max_per_scaffold)
        log.debug("anchored GP: ensemble weight %.2f, %d out-of-bag conditions, dilution x%.2f",
                  batch.anchor.weight, batch.anchor.n_out_of_bag, batch.anchor.dilution)
        return batch.indices
    return select_batch(values, lab.fingerprints, q, selection_config, exclude=measured, scaffold_ids=scaffold_ids,
                        profiles=profiles).indices


def random_expected_fraction(n_conditions: int, batch_size: int, n_rounds: int,
                             reachable_share: float = 1.0) -> list[float]:
    """Expected cumulative fraction of the hits that uniform random batches (without replacement)
    have measured after each round: ``min(r B, N) / N`` of the hits among the ``N`` candidates,
    whatever they are, times ``reachable_share``, the share of all hits that are candidates."""
    return [reachable_share * min(r * batch_size, n_conditions) / n_conditions for r in range(1, n_rounds + 1)]


def run_lookup_backtest(table: ProfileTable, config: LookupBacktestConfig) -> dict:
    """Cumulative fraction of the table's hits found after each round, mean and sd over seeds."""
    unknown = [p for p in config.policies if p not in LOOKUP_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(LOOKUP_POLICIES)}")
    lab = build_lookup_lab(table, config.control_label)
    hits = lab.conditions["is_hit"].to_numpy()
    log.info("%s: %d conditions with SMILES, %d hits (top %d%% activity of all treated conditions; %d of them "
             "without a usable SMILES, out of reach), %d treated wells without SMILES skipped", table.source,
             len(lab.conditions), lab.n_hits, round(100 * (1 - HIT_QUANTILE)), lab.n_hits_unreachable,
             lab.n_skipped_no_smiles)
    curves: dict[str, list[list[float]]] = {p: [] for p in config.policies}
    with tempfile.TemporaryDirectory(prefix="loop-lookup-") as tmp:
        for seed in range(config.n_seeds):
            for policy in config.policies:
                rng = np.random.default_rng(seed)
                measured = np.zeros(len(lab.conditions), dtype=bool)
                found = []
                for round_index in range(config.n_rounds):
                    picks = _pick(policy, lab, measured, config.batch_size, config, seed * 100 + round_index,
                                  Path(tmp), rng)
                    measured[picks] = True
                    found.append(float(hits[measured].sum() / max(lab.n_hits, 1)))  # of all hits in the table
                curves[policy].append(found)
                log.info("seed %d %-14s hits found: %s", seed, policy, ", ".join(f"{f:.2f}" for f in found))
    return {
        "source": table.source,
        "config": dataclasses.asdict(config),
        "n_conditions": len(lab.conditions),
        "n_hits": lab.n_hits,
        "n_skipped_no_smiles": lab.n_skipped_no_smiles,
        "n_skipped_no_dose": lab.n_skipped_no_dose,
        "n_skipped_bad_smiles": lab.n_skipped_bad_smiles,
        "n_skipped_no_controls": lab.n_skipped_no_controls,
        "n_hits_unreachable": lab.n_hits_unreachable,
        "n_tied_at_threshold": lab.n_tied_at_threshold,
        "hit_definition": (f"condition activity (RMS over the usable features of the mean robust z of its wells, "
                           f"each z clipped to +-{ACTIVITY_CLIP_Z:g}) >= the {HIT_QUANTILE:.0%} quantile over all "
                           "treated conditions, those without a usable SMILES or dose included; the hit fractions "
                           "are of all n_hits, n_hits_unreachable of which no policy can pick"),
        # what the random policy finds on average (each condition is picked by round r with
        # probability r B / N): the yardstick its few seeded draws scatter around
        "random_expected_hit_fraction": random_expected_fraction(
            len(lab.conditions), config.batch_size, config.n_rounds,
            reachable_share=float(hits.sum()) / max(lab.n_hits, 1)),
        "policies": {
            p: {
                "hit_fraction_mean": np.mean(c, axis=0).tolist(),
                "hit_fraction_sd": (np.std(c, axis=0, ddof=1) if len(c) > 1 else np.zeros(config.n_rounds)).tolist(),
                "per_seed": c,
            }
            for p, c in curves.items()
        },
    }
