"""``loop train``: (re)train the campaign's virtual assay on everything ingested."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pandas as pd
from sqlmodel import select

from lab_io import profiles as profiling
from lab_io.schema import META_COMPOUND, CONTROL_COMPOUND_ID, WellRole, META_ROLE
from loop import store
from loop.campaign import Campaign
from loop.library import load_compounds
from models.config import FeatureAssayConfig, config_hash
from models.ensemble import FeatureAssayEnsemble, load_ensemble, train_ensemble
from models.training_data import FeatureTrainingSet

log = logging.getLogger(__name__)


# Cells per well used for training: enough to learn each well's distribution, few enough for 2 cores.
MAX_CELLS_PER_WELL = 64


class NothingToTrainOn(RuntimeError):
    """No measurements have been ingested yet."""


def load_measured_cells(campaign: Campaign) -> pd.DataFrame:
    """All ingested single cells (treatments and DMSO controls), one frame."""
    with campaign.session() as session:
        paths = sorted(set(session.exec(select(store.Measurement.cells_path)).all()))
    if not paths:
        raise NothingToTrainOn(f"{campaign.root}: no measurements ingested yet; run `loop ingest` first")
    frames = [pd.read_parquet(campaign.absolute(p)) for p in paths]
    cells = pd.concat(frames, ignore_index=True)
    keep = cells[META_ROLE].isin([WellRole.treatment.value, WellRole.negative_control.value])
    cells = cells.loc[keep].copy()
    cells.loc[cells[META_ROLE] == WellRole.negative_control.value, META_COMPOUND] = CONTROL_COMPOUND_ID
    return cells


def assay_config(campaign: Campaign, **overrides) -> FeatureAssayConfig:
    return FeatureAssayConfig(**{**campaign.config.assay, **overrides})


def train_assay(
    campaign: Campaign,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    config_overrides: dict | None = None,
) -> FeatureAssayEnsemble:
    """Train a new ensemble version on all ingested cells and register it."""
    cells = load_measured_cells(campaign)
    compounds = load_compounds(campaign)
    fps = np.asarray(campaign.load_fingerprints())
    treated = set(cells[META_COMPOUND]) - {CONTROL_COMPOUND_ID}
    rows = compounds[compounds["compound_id"].isin(treated)]
    fingerprint_lookup = {cid: fps[row] for cid, row in zip(rows["compound_id"], rows["fp_row"])}
    config = assay_config(campaign, **(config_overrides or {}))
    train_set = FeatureTrainingSet.from_dataframe(
        cells, fingerprint_lookup, max_cells_per_well=MAX_CELLS_PER_WELL, seed=campaign.config.seed,
        feature_names=profiling.feature_select(cells), source=f"{campaign.root} measurements",
    )
    version = config_hash(config, train_set.data_fingerprint)
    with campaign.session() as session:
        existing = session.exec(select(store.ModelVersion).where(store.ModelVersion.version == version)).first()
    if existing is not None:
        log.info("virtual assay %s was already trained on exactly these data and options; reusing it", version)
        return load_ensemble(campaign.absolute(existing.path))
    out_dir = campaign.models_dir / version  # an interrupted run resumes from its checkpoints
    ensemble = train_ensemble(train_set, config, out_dir, executor=executor, ray_address=ray_address)
    with campaign.session() as session:
        session.add(
            store.ModelVersion(
                version=ensemble.version,
                kind="feature",
                path=campaign.relative(out_dir),
                n_members=ensemble.n_members,
                n_training_cells=train_set.n_cells,
                data_fingerprint=train_set.data_fingerprint,
                config_json=json.dumps(dataclasses.asdict(config)),
            )
        )
        session.commit()
    log.info("trained virtual assay %s (%d members) on %d cells", ensemble.version, ensemble.n_members,
             train_set.n_cells)
    return ensemble


def latest_model(campaign: Campaign) -> FeatureAssayEnsemble | None:
    with campaign.session() as session:
        row = session.exec(select(store.ModelVersion).order_by(store.ModelVersion.id.desc())).first()
    return None if row is None else load_ensemble(campaign.absolute(row.path))
