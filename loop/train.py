"""``loop train``: (re)train the campaign's virtual assay on everything ingested.

The campaign's *current* virtual assay is the model version registered or used last: a feature
ensemble trained here (``kind='feature'``), or an image assay trained with ``loop assay train``
on crops and made current with ``loop use-assay MODEL_DIR`` (``kind='image'``). Both implement
``models.virtual_assay.VirtualAssay``, so ``propose`` works the same with either.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from sqlmodel import select

from lab_io import profiles as profiling
from lab_io.schema import CONTROL_COMPOUND_ID, META_COMPOUND, META_PLATE, META_ROLE, WellRole, feature_columns
from loop import store
from loop.campaign import TRAIN_LOCK_FILE, TRAIN_LOCK_TIMEOUT_S, Campaign
from loop.library import load_compounds
from models.config import FeatureAssayConfig, config_hash
from models.ensemble import FeatureAssayEnsemble, check_executor, load_ensemble, train_ensemble
from models.training_data import FeatureTrainingSet, cap_cells_per_well
from models.virtual_assay import VirtualAssay

log = logging.getLogger(__name__)


# Cells per well used for training: enough to learn each well's distribution, few enough for 2 cores.
MAX_CELLS_PER_WELL = 64


class NothingToTrainOn(RuntimeError):
    """No measurements have been ingested yet."""


def measured_cells_paths(campaign: Campaign) -> list[str]:
    """The ingested plates' single-cell files (relative); NothingToTrainOn when none is."""
    with campaign.session() as session:
        paths = sorted(set(session.exec(select(store.Measurement.cells_path)).all()))
    if not paths:
        raise NothingToTrainOn(f"{campaign.root}: no measurements ingested yet; run `loop ingest` first")
    return paths


def load_measured_cells(campaign: Campaign, max_cells_per_well: int | None = MAX_CELLS_PER_WELL) -> pd.DataFrame:
    """The ingested single cells (treatments and DMSO controls), one frame: at most
    ``max_cells_per_well`` a well, drawn plate by plate as each file is read (a seeded draw per
    plate file), so a campaign of real plates (~2,000 cells a well) is never in memory whole.
    FileNotFoundError naming a plate's file that is gone; NothingToTrainOn when no treated cell
    was ingested (DMSO alone holds no compound response to learn)."""
    frames = []
    for relative in measured_cells_paths(campaign):
        path = campaign.absolute(relative)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the single cells of an ingested plate are missing (moved or deleted?); "
                                    "put the file back to train")
        frame = pd.read_parquet(path)
        frame = frame.loc[frame[META_ROLE].isin([WellRole.treatment.value, WellRole.negative_control.value])]
        if max_cells_per_well is not None:
            frame = cap_cells_per_well(frame, max_cells_per_well, [campaign.config.seed, zlib.crc32(relative.encode())])
        frames.append(frame)
    cells = pd.concat(frames, ignore_index=True)
    if not (cells[META_ROLE] == WellRole.treatment.value).any():
        raise NothingToTrainOn(f"{campaign.root}: the ingested plates hold no treated cells (DMSO controls only): "
                               "there is no compound response to learn; proposals stay on the cold start until a "
                               "plate with treated wells is ingested")
    cells.loc[cells[META_ROLE] == WellRole.negative_control.value, META_COMPOUND] = CONTROL_COMPOUND_ID
    return cells


MAX_MISSING_FRACTION = 0.05  # a feature missing (NaN) in more of the cells is left out (pycytominer's drop_na_columns)


MAX_PLATE_MISSING_FRACTION = 0.5  # a feature most of one plate's cells lack is one that plate does not measure


def training_features(cells: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The features the assay models and the cells it trains on. CellProfiler leaves a measurement
    NaN where it is undefined (e.g. a texture of a one-pixel object): a feature is kept when it is
    missing or infinite in at most ``MAX_MISSING_FRACTION`` of the cells, and in at most
    ``MAX_PLATE_MISSING_FRACTION`` of any one plate's cells (a plate exported by another pipeline,
    without the feature, leaves the feature out rather than all its cells); the few cells missing
    one of the kept features are left out (a well whose every cell misses one goes with them).
    Both are logged."""
    candidates = feature_columns(cells.columns)
    if not candidates:
        return [], cells
    missing = pd.DataFrame(~np.isfinite(cells[candidates].to_numpy(np.float64)), columns=candidates,
                           index=cells.index)
    per_plate = missing.groupby(cells[META_PLATE].to_numpy()).mean().max(axis=0)
    too_sparse = [name for name in candidates if missing[name].mean() > MAX_MISSING_FRACTION
                  or per_plate[name] > MAX_PLATE_MISSING_FRACTION]
    if too_sparse:
        log.warning("%d feature(s) missing in more than %.0f %% of the cells, or in most of one plate's, are left out "
                    "(e.g. %s)", len(too_sparse), 100 * MAX_MISSING_FRACTION, ", ".join(too_sparse[:3]))
    kept = cells[[c for c in cells.columns if c not in set(too_sparse)]]
    features = profiling.feature_select(kept, max_nonfinite_fraction=MAX_MISSING_FRACTION)
    incomplete = missing[features].to_numpy().any(axis=1) if features else np.zeros(len(cells), bool)
    if incomplete.any():
        log.warning("%d of %d cells miss a value of a modelled feature (NaN or infinite) and are left out",
                    int(incomplete.sum()), len(cells))
        cells = cells.loc[~incomplete]
    return features, cells


def assay_config(campaign: Campaign, **overrides) -> FeatureAssayConfig:
    """The feature assay's config: the campaign's ``assay`` settings (``campaign.json``) with
    ``overrides``; ValueError naming ``campaign.json`` for an unknown key or a bad value."""
    try:
        return FeatureAssayConfig.from_dict({**campaign.config.assay, **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{campaign.root / 'campaign.json'}: its \"assay\" settings: {err}") from None


def train_assay(
    campaign: Campaign,
    *,
    executor: str = "local",
    ray_address: str | None = None,
    config_overrides: dict | None = None,
) -> FeatureAssayEnsemble:
    """Train a new ensemble version on all ingested cells and register it as current (reused
    when it was trained on exactly these data and options)."""
    ensemble, _ = _train(campaign, executor, ray_address, config_overrides, keep_image_assay=False)
    return ensemble


def _train(campaign: Campaign, executor: str, ray_address: str | None, config_overrides: dict | None, *,
           keep_image_assay: bool) -> tuple[FeatureAssayEnsemble | None, str]:
    """:func:`train_assay`; with ``keep_image_assay``, nothing is trained while an image assay is the
    campaign's current one (checked again once the train lock is held). Returns the ensemble (None
    when kept) and the current version.

    A version counts from when its training began (its ``created_at``): an image assay made current
    with ``loop use-assay`` while a training runs stays current after it."""
    check_executor(executor)  # before the data are read, and when a trained version is reused
    image = _current_image_assay(campaign) if keep_image_assay else None
    if image is not None:  # kept: spare reading the cells
        measured_cells_paths(campaign)  # nothing ingested is NothingToTrainOn, as for a feature ensemble
        return None, image
    started = store.utcnow()  # before the cells are read: a plate ingested from now on is not in them
    cells = load_measured_cells(campaign)
    compounds = load_compounds(campaign)
    fps = np.asarray(campaign.load_fingerprints())
    treated = set(cells[META_COMPOUND]) - {CONTROL_COMPOUND_ID}
    rows = compounds[compounds["compound_id"].isin(treated)]
    fingerprint_lookup = {cid: fps[row] for cid, row in zip(rows["compound_id"], rows["fp_row"])}
    config = assay_config(campaign, **(config_overrides or {}))
    features, cells = training_features(cells)
    train_set = FeatureTrainingSet.from_dataframe(
        cells, fingerprint_lookup, max_cells_per_well=MAX_CELLS_PER_WELL, seed=campaign.config.seed,
        feature_names=features, source=f"{campaign.root} measurements",
    )
    version = config_hash(config, train_set.data_fingerprint)
    # a second training of the campaign (a scheduled retrain beside `loop train`) waits for the first,
    # then finds its version registered instead of training into the same folder
    with campaign.writing("train", timeout_s=TRAIN_LOCK_TIMEOUT_S, lock_file=TRAIN_LOCK_FILE):
        kept = _current_image_assay(campaign) if keep_image_assay else None
        if kept is not None:
            return None, kept
        ensemble = _train_or_reuse(campaign, train_set, config, version, executor, ray_address, started)
        image = _current_image_assay(campaign)
        if image is not None:
            log.warning("image assay %s was made the campaign's virtual assay (`loop use-assay`) while ensemble %s "
                        "trained; it stays current (`loop train` again makes the ensemble current)", image,
                        ensemble.version)
        return ensemble, image or ensemble.version


def _current_image_assay(campaign: Campaign) -> str | None:
    """The campaign's current virtual assay's version when it is an image assay (``loop use-assay``)."""
    with campaign.session() as session:
        current = store.current_model_version(session)
    return current.version if current is not None and current.kind == "image" else None


def retrain_current(campaign: Campaign, *, executor: str = "local", ray_address: str | None = None) -> str:
    """The scheduled retrain (the Prefect flows): :func:`train_assay` on everything ingested,
    unless the campaign's current virtual assay is an image assay chosen with ``loop use-assay``.

    That choice is kept, with a warning saying how to retrain it: an image assay is trained on
    crops by ``loop assay train`` (up to an hour a member on CPU), not by a scheduled round.
    Returns the current model version."""
    ensemble, version = _train(campaign, executor, ray_address, None, keep_image_assay=True)
    if ensemble is None:
        log.warning("%s: the campaign's virtual assay is image assay %s (`loop use-assay`), kept as it is; to retrain "
                    "it on what was ingested: `loop assay train --data %s --out NEW_DIR` and `loop use-assay "
                    "NEW_DIR` (`loop train` goes back to a feature ensemble)", campaign.root, version,
                    campaign.measurements_dir)
    return version


def train_if_measured(campaign: Campaign, *, executor: str = "local", ray_address: str | None = None) -> str | None:
    """:func:`retrain_current` when anything is ingested (the current version is reused when it
    was trained on all of it); None when nothing is. Returns the model version."""
    try:
        return retrain_current(campaign, executor=executor, ray_address=ray_address)
    except NothingToTrainOn:
        return None


def _train_or_reuse(campaign: Campaign, train_set: FeatureTrainingSet, config, version: str, executor: str,
                    ray_address: str | None, started) -> FeatureAssayEnsemble:
    with campaign.session() as session:
        existing = session.exec(select(store.ModelVersion).where(store.ModelVersion.version == version)).first()
    if existing is not None:
        log.info("virtual assay %s was already trained on exactly these data and options; reusing it", version)
        _make_current(campaign, existing.version, started)
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
                created_at=started,
            )
        )
        session.commit()
    log.info("trained virtual assay %s (%d members) on %d cells", ensemble.version, ensemble.n_members,
             train_set.n_cells)
    return ensemble


def register_image_assay(campaign: Campaign, model_dir: str | Path) -> VirtualAssay:
    """Make a trained image assay folder (``loop assay train``) the campaign's current virtual assay.

    The folder stays where it is (its path is recorded: relative when inside the campaign, else
    absolute). Registering the same version again makes it current again. Raises
    FileNotFoundError naming the folder when it holds no trained image assay."""
    from models.image_assay import ImageAssay

    model_dir = Path(model_dir).resolve()
    assay = ImageAssay.load(model_dir)
    _warn_on_other_channels(campaign, assay, model_dir)
    _warn_without_analogues(campaign, assay, model_dir)
    with campaign.session() as session:
        existing = session.exec(select(store.ModelVersion).where(store.ModelVersion.version == assay.version)).first()
        if existing is not None and existing.kind != "image":
            raise ValueError(f"{model_dir}: version {assay.version} is already registered as a {existing.kind} model")
        if existing is None:
            session.add(store.ModelVersion(
                version=assay.version, kind="image", path=campaign.relative(model_dir), n_members=assay.n_members,
                n_training_cells=int(assay.meta.get("n_train_cells", 0)),
                data_fingerprint=str(assay.meta.get("data_fingerprint", "")),
                config_json=json.dumps(assay.config.to_dict()),
            ))
        else:
            existing.created_at = store.utcnow()  # current again
            if campaign.absolute(existing.path).resolve() != model_dir:
                log.info("image assay %s: recorded at %s now (was %s)", assay.version, model_dir, existing.path)
                existing.path = campaign.relative(model_dir)  # the same model, moved or copied
            session.add(existing)
        session.commit()
    log.info("image assay %s (%d members, %s) is now the campaign's virtual assay", assay.version, assay.n_members,
             model_dir)
    return assay


def _warn_on_other_channels(campaign: Campaign, assay, model_dir: Path) -> None:
    """Warn when the campaign's ingested crops name other channels than the image assay was trained on."""
    from lab_io.crops import CHANNELS_FILE, CropsError, channel_key, read_channel_names

    theirs, by_position = {}, []
    for path in sorted(campaign.measurements_dir.glob(f"*.crops/{CHANNELS_FILE}")):
        try:
            names, named = read_channel_names(path)
        except (OSError, CropsError) as err:  # the image assay reads it again and says what is wrong
            log.warning("cannot read %s (%s)", path, err)
            continue
        if not named or not getattr(assay.channel_names, "declared", True):
            by_position.append(path.parent.name)  # guessed names (or a positional model): nothing to compare
            continue
        theirs.setdefault(tuple(map(channel_key, names)), path.parent.name)
    if by_position:
        folders = ", ".join(by_position[:3]) + (" ..." if len(by_position) > 3 else "")
        if getattr(assay.channel_names, "declared", True):
            log.warning("%s: the channels of %s are taken by position (their stains were not named); check that they "
                        "are the model's stains %s in that order", model_dir, folders, list(assay.channel_names))
        else:
            log.warning("%s: the model's channels are positional (trained on crops whose stains were not named; its "
                        "record says %s only as an order), so the channels of %s are taken in their own order: "
                        "check that it is the order of the crops the model was trained on", model_dir,
                        list(assay.channel_names), folders)
    ours = tuple(map(channel_key, assay.channel_names))
    for names, folder in theirs.items():
        if names != ours:
            log.warning("%s: image assay trained on channels %s, but the campaign's %s has %s; its predictions are "
                        "not measurements of these plates' stains", model_dir, list(assay.channel_names), folder,
                        list(names))


ANALOGUE_SAMPLE = 5000  # library compounds checked for analogues of the image assay's training compounds


def _warn_without_analogues(campaign: Campaign, assay, model_dir: Path) -> None:
    """Warn when (a seeded sample of) the library holds no analogue of the image assay's training
    compounds: for those it can only predict the response it learned for its own compounds."""
    from lab_io.chem import tanimoto_max
    from models.image_assay import ANALOGUE_TANIMOTO

    path = campaign.fingerprints_path
    if not assay.meta["compounds"] or not path.is_file():
        return
    fps = campaign.load_fingerprints()
    if len(fps) == 0:
        return
    rows = np.random.default_rng(0).choice(len(fps), min(len(fps), ANALOGUE_SAMPLE), replace=False)
    best = tanimoto_max(fps[np.sort(rows)], assay.training_fingerprints())
    share = float((best >= ANALOGUE_TANIMOTO).mean())
    if share < 0.01:
        log.warning("%s: %.1f %% of the campaign's library (a sample of %d) is an analogue (Morgan Tanimoto >= %.1f) "
                    "of the image assay's training compounds %s; for the others it predicts the response it learned "
                    "for those compounds, not their own", model_dir, 100 * share, len(rows), ANALOGUE_TANIMOTO,
                    assay.meta["compounds"][:5])


def _make_current(campaign: Campaign, version: str, at) -> None:
    with campaign.session() as session:
        row = session.exec(select(store.ModelVersion).where(store.ModelVersion.version == version)).one()
        row.created_at = at
        session.add(row)
        session.commit()


def load_model(campaign: Campaign, row: store.ModelVersion) -> VirtualAssay:
    """The virtual assay of a registered model version (feature ensemble or image assay)."""
    path = campaign.absolute(row.path)
    if row.kind == "image":
        from models.image_assay import ImageAssay

        try:
            assay = ImageAssay.load(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err} (the campaign's image assay {row.version} was registered there: train "
                                    "it again, or `loop use-assay` its new folder)") from None
        if assay.version != row.version:
            raise ValueError(f"{path}: holds image assay {assay.version} now, not the campaign's registered "
                             f"{row.version} (retrained in place?); `loop use-assay {path}` makes it the "
                             "campaign's assay")
        return assay
    if row.kind != "feature":
        raise ValueError(f"model version {row.version}: unknown kind {row.kind!r}")
    return load_ensemble(path)


def plates_not_in_model(campaign: Campaign, session, current) -> list[str]:
    """Barcodes of the campaign's returned plates the current virtual assay has not learned from: a
    feature ensemble, those ingested after it was trained (``store.plates_after_model``); an image
    assay, trained outside the campaign on crops folders, those with crops (``ingest --crops-px``:
    the only plates one can learn from) not among its training plates (``assay.json``
    ``train_plates``; a model trained on other data has learned from none)."""
    if current is None or current.kind != "image":
        return store.plates_after_model(session, current)
    try:
        trained_on = set(json.loads((campaign.absolute(current.path) / "assay.json").read_text())["train_plates"])
    except (OSError, ValueError, KeyError, TypeError):
        return store.plates_after_model(session, current)
    returned = session.exec(select(store.Plate.barcode).where(store.Plate.status == "returned")).all()
    with_crops = {b for b in returned if (campaign.measurements_dir / f"{b}.crops").is_dir()}
    return sorted(b for b in with_crops if b not in trained_on)  # a plate without crops cannot train one


def warn_if_model_behind(campaign: Campaign) -> list[str]:
    """Log a warning naming the plates the current virtual assay has not learned from; returns them."""
    with campaign.session() as session:
        current = store.current_model_version(session)
        behind = plates_not_in_model(campaign, session, current)
    if behind:
        how = ("`loop assay train --data <campaign>/measurements` and `loop use-assay` to use them (`loop train` would "
               "make a feature ensemble current instead)" if current.kind == "image" else "`loop train` first to use them")
        log.warning("the virtual assay %s has not learned from plate(s) %s (%s); %s", current.version,
                    ", ".join(behind[:10]) + (", ..." if len(behind) > 10 else ""),
                    "not among its training plates" if current.kind == "image" else "ingested after it was trained",
                    how)
    return behind


def latest_model(campaign: Campaign) -> VirtualAssay | None:
    """The current virtual assay: the version registered or (re)used last; None before any."""
    with campaign.session() as session:
        row = store.current_model_version(session)
    return None if row is None else load_model(campaign, row)
