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
from sqlmodel import select

from acquisition.objectives import MIN_SHARED_FEATURES, ObjectiveConfig
from lab_io.profile_table import read_table_file
from lab_io.schema import META_COMPOUND, META_DOSE, META_ROLE, META_WELL, WellRole, feature_columns
from loop import store
from loop.campaign import Campaign
from loop.train import latest_model

__all__ = ["Target", "campaign_objective", "measured_objective_values", "measured_target", "set_objective",
           "table_target"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """A target profile: ``features`` -> ``values`` in control-normalised units, and its origin."""

    features: tuple[str, ...]
    values: tuple[float, ...]
    label: str


def campaign_objective(campaign: Campaign) -> ObjectiveConfig:
    return ObjectiveConfig.from_dict(campaign.config.objective)


def measured_target(campaign: Campaign, compound: str, dose_um: float | None = None) -> Target:
    """Median normalised profile of ``compound``'s measured treatment wells (id or library name)."""
    compound_id = _resolve_compound(campaign, compound)
    with campaign.session() as session:
        query = select(store.Measurement.well, store.Measurement.dose_um, store.Measurement.profiles_path).where(
            store.Measurement.compound_id == compound_id, store.Measurement.role == WellRole.treatment.value,
            store.Measurement.activity.is_not(None))
        rows = pd.DataFrame(session.exec(query).all(), columns=["well", "dose_um", "profiles_path"])
    if dose_um is not None:
        rows = rows[np.isclose(rows["dose_um"], dose_um)]
    if rows.empty:
        at = "" if dose_um is None else f" at {dose_um:g} uM"
        raise ValueError(f"compound {compound!r} ({compound_id}) has no measured treatment wells{at} in "
                         f"{campaign.root}: put it on a plate first, or give --target-profile FILE")
    wells = []
    for path, group in rows.groupby("profiles_path"):
        table = pd.read_parquet(campaign.absolute(path))
        wells.append(table[table[META_WELL].isin(group["well"]) & (table[META_COMPOUND] == compound_id)])
    profiles = pd.concat(wells)
    doses = ", ".join(f"{d:g}" for d in sorted(rows["dose_um"].unique()))
    return _median_target(profiles, f"{compound_id} measured: median of {len(profiles)} well(s) at {doses} uM",
                          source=f"measured wells of {compound_id}")


def table_target(path: Path, compound: str | None = None) -> Target:
    """Median row of a profile table (CSV, TSV or Parquet, features normalised to controls)."""
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
    return _median_target(table, f"{label}: median of {len(table)} row(s)", source=str(path))


def set_objective(campaign: Campaign, *, target: Target | None, activity_weight: float,
                  similarity_weight: float) -> ObjectiveConfig:
    """Validate and save the campaign's objective (checked against the current model's features)."""
    config = ObjectiveConfig(
        activity_weight=activity_weight, similarity_weight=similarity_weight,
        target_features=target.features if target else (), target_values=target.values if target else (),
        target_label=target.label if target else "")
    model = latest_model(campaign)
    if model is not None and config.uses_target:
        config.build(model.feature_names)  # the target must share features with the predictions
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


def describe(config: ObjectiveConfig) -> str:
    if not config.uses_target:
        return "phenotypic activity"
    terms = [f"{config.similarity_weight:g} x similarity to {config.target_label} "
             f"({len(config.target_features)} features)"]
    if config.activity_weight > 0:
        terms.insert(0, f"{config.activity_weight:g} x activity")
    return " + ".join(terms)


def _resolve_compound(campaign: Campaign, compound: str) -> str:
    with campaign.session() as session:
        by_id = session.exec(select(store.Compound.compound_id).where(store.Compound.compound_id == compound)).all()
        if by_id:
            return by_id[0]
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
    return Target(tuple(median.index), tuple(float(v) for v in median.to_numpy()), label)
