"""``loop objective``: what proposals maximise — phenotypic activity, or a target phenotype.

By default the loop screens for phenotypic activity. A lab hunting for compounds that act like a
reference (a known mechanism, a tool compound, a disease-rescue phenotype) sets a **target
profile**; proposals then maximise ``activity_weight x activity + similarity_weight x cosine``
of each candidate's predicted profile to it (``acquisition.objectives.ObjectiveConfig``).

A target lives in the normalised space of the lab's well profiles (robust z against the
plate's DMSO wells, ``loop.ingest.well_profiles``), from either

- ``measured_target``: the median of a measured compound's treatment wells in this campaign
  (by compound id or library name; one dose or all of them), or
- ``table_target``: the median row of a pycytominer-style profile table (CSV or Parquet whose
  features are already normalised to controls), optionally only the rows of one
  ``Metadata_compound``.

The profile is frozen into ``campaign.json`` (feature names and values), so every round's
``round_config.json`` records exactly the target it chased.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sqlmodel import select

from acquisition.objectives import MIN_SHARED_FEATURES, ObjectiveConfig
from lab_io.profile_table import read_table_file
from lab_io.schema import CONTROL_COMPOUND_ID, META_COMPOUND, META_DOSE, META_ROLE, META_WELL, WellRole, feature_columns
from loop import store
from loop.campaign import Campaign
from loop.train import latest_model

__all__ = ["Target", "campaign_objective", "measured_objective_values", "measured_target", "set_objective",
           "table_target", "target_progress"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """A target profile: ``features`` -> ``values`` in control-normalised units, and its origin."""

    features: tuple[str, ...]
    values: tuple[float, ...]
    label: str


def campaign_objective(campaign: Campaign) -> ObjectiveConfig:
    return ObjectiveConfig.from_dict(campaign.config.objective)


TARGET_ROLES = (WellRole.treatment.value, WellRole.positive_control.value)  # wells a target compound is read from


def measured_target(campaign: Campaign, compound: str, dose_um: float | None = None) -> Target:
    """Median normalised profile of ``compound``'s measured wells (id or library name): its
    treatment wells, or its positive-control wells when it is the plates' positive control."""
    compound_id = _resolve_compound(campaign, compound)
    with campaign.session() as session:
        query = select(store.Measurement.well, store.Measurement.dose_um, store.Measurement.profiles_path).where(
            store.Measurement.compound_id == compound_id, store.Measurement.role.in_(TARGET_ROLES),
            store.Measurement.activity.is_not(None))
        rows = pd.DataFrame(session.exec(query).all(), columns=["well", "dose_um", "profiles_path"])
        pending = session.exec(select(store.Well.barcode).join(store.Plate, store.Plate.barcode == store.Well.barcode)
                               .where(store.Well.compound_id == compound_id, store.Plate.status == "pending")).first()
    measured_doses = sorted(rows["dose_um"].unique())
    if dose_um is not None:
        rows = rows[np.isclose(rows["dose_um"], dose_um)]
    if rows.empty:
        at = "" if dose_um is None else f" at {dose_um:g} uM"
        if measured_doses:
            why = f"it was measured at {', '.join(f'{d:g}' for d in measured_doses)} uM"
        elif pending is not None:
            why = f"it is on plate {pending}, still in the lab: ingest its results first"
        else:
            why = "put it on a plate first"
        raise ValueError(f"compound {compound!r} ({compound_id}) has no measured wells{at} in {campaign.root}: "
                         f"{why}, or give --target-profile FILE")
    wells = []
    for path, group in rows.groupby("profiles_path"):
        table = pd.read_parquet(campaign.absolute(path))
        wells.append(table[table[META_WELL].isin(group["well"]) & (table[META_COMPOUND] == compound_id)])
    profiles = pd.concat(wells)
    doses = ", ".join(f"{d:g}" for d in sorted(rows["dose_um"].unique()))
    return _median_target(profiles, f"{compound_id} measured: median of {len(profiles)} well(s) at {doses} uM",
                          source=f"measured wells of {compound_id}")


CONTROL_NAMES = ("dmso", "control", "negative_control", "negcon")  # control rows a table target never pools


def table_target(path: Path, compound: str | None = None) -> Target:
    """Median row of a profile table (CSV, TSV or Parquet, features normalised to controls), of the
    rows of ``compound`` when given. Without it, control rows (``Metadata_role`` negative_control,
    or a ``Metadata_compound`` such as DMSO) are left out, and pooling several compounds is logged
    as a warning: a whole plate's export is no one phenotype."""
    path = Path(path)
    table = read_table_file(path)
    label = str(path)
    if compound is not None:
        if META_COMPOUND not in table.columns:
            raise ValueError(f"{path}: no {META_COMPOUND} column to find compound {compound!r} in")
        table = table[table[META_COMPOUND].astype(str) == compound]
        if table.empty:
            raise ValueError(f"{path}: no rows with {META_COMPOUND} == {compound!r}")
        label = f"{path} ({compound})"
    else:
        table = _without_controls(table, path)
        if META_COMPOUND in table.columns and table[META_COMPOUND].nunique(dropna=False) > 1:
            names = sorted(table[META_COMPOUND].astype(str).unique())
            log.warning("%s: the target pools %d compounds (%s); give --profile-compound NAME for one compound's "
                        "phenotype", path, len(names), ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""))
    return _median_target(table, f"{label}: median of {len(table)} row(s)", source=str(path))


def _without_controls(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    control = np.zeros(len(table), dtype=bool)
    if META_ROLE in table.columns:
        control |= (table[META_ROLE].astype(str) == WellRole.negative_control.value).to_numpy()
    if META_COMPOUND in table.columns:
        control |= table[META_COMPOUND].astype(str).str.strip().str.lower().isin(CONTROL_NAMES).to_numpy()
    if "Metadata_control_type" in table.columns:  # JUMP / pycytominer platemap metadata
        control |= (table["Metadata_control_type"].astype(str).str.lower() == "negcon").to_numpy()
    if control.all():
        raise ValueError(f"{path}: every row is a control (DMSO) row: a target needs a compound's phenotype")
    if control.any():
        log.info("%s: %d control row(s) left out of the target", path, int(control.sum()))
    return table[~control]


def set_objective(campaign: Campaign, *, target: Target | None, activity_weight: float,
                  similarity_weight: float) -> ObjectiveConfig:
    """Validate and save the campaign's objective (checked against the current model's features)."""
    for name, weight in (("activity", activity_weight), ("similarity", similarity_weight)):
        if weight > MAX_WEIGHT:
            raise ValueError(f"--{name}-weight {weight:g} is above {MAX_WEIGHT:g}: only the weights' ratio matters, "
                             "and weights near 1e37 overflow the float32 objective")
    config = ObjectiveConfig(
        activity_weight=activity_weight, similarity_weight=similarity_weight,
        target_features=target.features if target else (), target_values=target.values if target else (),
        target_label=target.label if target else "")
    model = latest_model(campaign)
    if model is not None and config.uses_target:
        config.build(model.feature_names)  # the target must share features with the predictions
    elif config.uses_target:
        log.warning("no virtual assay yet: the target is checked against its features at the first proposal after "
                    "`loop train`; a cold-start round does not use it")
    campaign.save_config(dataclasses.replace(campaign.config, objective=config.to_dict()))
    log.info("objective: %s", describe(config))
    return config


def measured_objective_values(campaign: Campaign, measured: pd.DataFrame, config: ObjectiveConfig,
                              feature_names: list[str]) -> np.ndarray:
    """The objective of each measured condition (rows of ``loop.propose.measured_conditions``:
    ``compound_id``, ``dose_um``): the median normalised profile of its treatment wells, on the
    virtual assay's ``feature_names`` (a feature one plate's wells lack, which ingest could not
    normalise there, counts as 0, the control centre). ValueError when the wells share fewer than
    ``MIN_SHARED_FEATURES`` features with the assay (another pipeline's names: every value would be 0)."""
    with campaign.session() as session:
        paths = sorted(set(session.exec(select(store.Measurement.profiles_path)).all()))
    wells = pd.concat([pd.read_parquet(campaign.absolute(path)) for path in paths], ignore_index=True)
    wells = wells[wells[META_ROLE] == WellRole.treatment.value]
    shared = [f for f in feature_names if f in wells.columns]
    if len(shared) < MIN_SHARED_FEATURES:
        raise ValueError(f"the measured wells in {campaign.measurements_dir} share {len(shared)} of the virtual "
                         f"assay's {len(feature_names)} features (e.g. wells {feature_columns(wells.columns)[:3]}, "
                         f"assay {list(feature_names[:3])}): their objective cannot be compared with its predictions")
    profiles = (wells.reindex(columns=[META_COMPOUND, META_DOSE, *feature_names]).fillna({f: 0.0 for f in feature_names})
                .groupby([META_COMPOUND, META_DOSE])[feature_names].median())
    keys = pd.MultiIndex.from_arrays([measured["compound_id"], measured["dose_um"].astype(float)])
    missing = ~keys.isin(profiles.index)
    if missing.any():
        first = keys[missing][0]
        raise ValueError(f"measured condition {first[0]} at {first[1]:g} uM has no treatment well profile in "
                         f"{campaign.measurements_dir}")
    values = profiles.loc[keys].to_numpy(np.float32)
    return config.member_values(values[None], feature_names)[0].astype(np.float64)


def target_progress(campaign: Campaign, config: ObjectiveConfig, top: int = 3) -> dict | None:
    """How close the measured compounds came to the campaign's target phenotype: the ``top``
    measured (compound, dose) conditions by similarity to the target (the objective's similarity
    term: cosine of clipped profiles with the control-noise floor, over the features the target and
    the wells share), and how many conditions were measured. None without a target or wells."""
    if not config.uses_target:
        return None
    with campaign.session() as session:
        measured = pd.DataFrame(session.exec(select(store.Measurement.compound_id, store.Measurement.dose_um).where(
            store.Measurement.role == WellRole.treatment.value, store.Measurement.activity.is_not(None))
            .distinct()).all(), columns=["compound_id", "dose_um"])
    if measured.empty:
        return None
    try:
        with campaign.session() as session:
            paths = sorted(set(session.exec(select(store.Measurement.profiles_path)).all()))
        measured_features = set().union(*(pq.read_schema(campaign.absolute(p)).names for p in paths))
        shared = [f for f in config.target_features if f in measured_features]
        if len(shared) < MIN_SHARED_FEATURES:
            return {"error": f"the measured wells share {len(shared)} of the target's {len(config.target_features)} "
                             "features"}
        keep = [i for i, f in enumerate(config.target_features) if f in measured_features]
        similarity_only = dataclasses.replace(
            config, activity_weight=0.0, similarity_weight=1.0, target_features=tuple(shared),
            target_values=tuple(config.target_values[i] for i in keep))
        values = measured_objective_values(campaign, measured, similarity_only, shared)
    except (OSError, ValueError) as err:  # a file being replaced or gone: status still reports the rest
        return {"error": str(err)}
    order = np.argsort(-values, kind="stable")[:top]
    return {"n_conditions": int(len(measured)),
            "closest": [{"compound_id": str(measured["compound_id"].iloc[i]), "dose_um": float(measured["dose_um"].iloc[i]),
                         "similarity": round(float(values[i]), 4)} for i in order]}


def describe(config: ObjectiveConfig) -> str:
    if not config.uses_target:
        return "phenotypic activity"
    terms = [f"{config.similarity_weight:g} x similarity to {config.target_label} "
             f"({len(config.target_features)} features)"]
    if config.activity_weight > 0:
        terms.insert(0, f"{config.activity_weight:g} x activity")
    return " + ".join(terms)


def _resolve_compound(campaign: Campaign, compound: str) -> str:
    if compound == CONTROL_COMPOUND_ID or compound.strip().lower() in CONTROL_NAMES:
        raise ValueError(f"{compound!r} is the negative control: a target is a compound's phenotype against it")
    with campaign.session() as session:
        by_id = session.exec(select(store.Compound.compound_id).where(store.Compound.compound_id == compound)).all()
        if by_id:
            return by_id[0]
        # a measured id: the plates' positive control (layout.positive_control_id), also when the library lacks it
        # or one of its names is the same
        if session.exec(select(store.Measurement.compound_id).where(store.Measurement.compound_id == compound)).first():
            return compound
        by_name = session.exec(select(store.Compound.compound_id).where(store.Compound.name == compound)).all()
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise ValueError(f"compound name {compound!r} matches {len(by_name)} library compounds "
                         f"({', '.join(by_name[:5])}); give the compound id")
    raise ValueError(f"compound {compound!r} is neither a compound id nor a name in the library of {campaign.root}")


def _median_target(profiles: pd.DataFrame, label: str, *, source: str) -> Target:
    features = feature_columns(profiles.columns)
    if not features:
        raise ValueError(f"{source}: no feature columns (compartment-prefixed, e.g. Cells_AreaShape_Area)")
    median = profiles[features].apply(pd.to_numeric, errors="coerce").median(skipna=True).dropna()
    if median.empty:
        raise ValueError(f"{source}: every feature is missing")
    _check_target_scale(median.to_numpy(np.float64), source)
    return Target(tuple(median.index), tuple(float(v) for v in median.to_numpy()), label)


MAX_WEIGHT = 1e6  # objective weights above this are refused when set (only their ratio matters)
TARGET_CLIP_Z = ObjectiveConfig().clip_z  # the similarity clips profiles at +-10 z
ZERO_TARGET = 1e-6  # a target whose every value is below this is rounding residue (a median of control wells)
WEAK_TARGET_ACTIVITY = 2.0  # below: within about the spread of single DMSO wells (~1), a warning
RAW_UNITS_Z = 3 * TARGET_CLIP_Z  # most values beyond this: not robust z, a warning


def _check_target_scale(values: np.ndarray, source: str) -> None:
    """A target must be a phenotype: refused when it is rounding residue (every value below
    ``ZERO_TARGET``: cosine ignores scale, so the residue would steer the loop); a warning when it
    is weak in robust z (its clipped RMS, the activity, below ``WEAK_TARGET_ACTIVITY``; a target
    stored in other units, e.g. unit norm, steers the loop alike) or when most values look like raw
    units."""
    if np.max(np.abs(values)) < ZERO_TARGET:
        raise ValueError(f"{source}: the target profile is control-like (every value below {ZERO_TARGET:g}, e.g. a "
                         "median of DMSO wells): there is no phenotype to match")
    activity = float(np.sqrt(np.mean(np.clip(values, -TARGET_CLIP_Z, TARGET_CLIP_Z) ** 2)))
    if activity < WEAK_TARGET_ACTIVITY:
        log.warning("%s: the target's activity is %.2f: if it is in robust z against controls, that is within about "
                    "the spread of DMSO wells (about 1), and similarity to a weak phenotype is mostly similarity to "
                    "noise", source, activity)
    if np.mean(np.abs(values) > RAW_UNITS_Z) > 0.5:
        log.warning("%s: %.0f %% of the target's values are beyond %g: it looks like raw measurements, not robust z "
                    "against the plate's controls (normalise the table to its DMSO wells first)", source,
                    100 * np.mean(np.abs(values) > RAW_UNITS_Z), RAW_UNITS_Z)
